"""Richness parameterizations as data: per-layer multipliers, init and learning rates.

A :class:`Parametrization` says, for each layer *role* (``"readin"``, ``"hidden"``,
``"readout"``), three numbers as functions of the layer's fan-in and of the width
ratio ``m = width / base_width``:

* the **forward multiplier** ``c`` (the layer computes ``c W x + c_b b``),
* the **initialization scale** (std of the raw Gaussian weights; ``None`` keeps
  PyTorch's default init, the standard parameterization),
* the **learning-rate scale** ``eta_l / eta_0``, separately for SGD and Adam.

Each is a :class:`Scale`, ``const * fan_in**a * m**b``. Biases and norm gains use
the rule of their layer's role with ``fan_in = 1`` (a bias is a weight on the
constant input 1); gains of normalization layers follow the hidden rule.

The richness family of Karkada's tutorial (``alpha = m**r``, ``0 <= r <= 1/2``) in
the two gauges of docs/theory.md section 1 (``fan_in`` is ``d`` for the read-in and
``n`` otherwise)::

                         read-in / hidden          read-out
    table:   init std    fan_in^-1/2               m^-r fan_in^-1/2
             SGD lr      m^2r / fan_in             1 / fan_in
             Adam lr     m^(r-1/2) / fan_in        1 / fan_in
    multiplier gauge:    weights N(0,1), multipliers fan_in^-1/2 and
                         m^-r fan_in^-1/2, SGD lr m^2r (one global rate)

The Adam rates follow from Adam's per-coordinate normalization (an update of
size ``eta`` per entry); in the multiplier gauge a multiplier ``c`` maps them as
``c eta`` (not ``c^2 eta``). They are checked by a coordinate check
(tests/test_science.py: hidden ``||dh|| ~ n^(1/2)`` at muP, and ``~ n^(3/2)`` with
the SGD rates under Adam). Embeddings have fan-in 1 (one row per token).

**Depth.** A :class:`DepthRule` says how residual branches scale with the
depth ``L`` (the number of residual blocks), as powers of ``L / base_depth``:
the branch multiplier ``L**-alpha`` on the output of the last layer of every
residual branch (``h + L**-alpha F(h)``) and the learning-rate scale of every
layer inside a branch, ``L**lr_sgd`` or ``L**lr_adam``. A branch's gradient
carries its multiplier, so SGD needs ``L**(2 alpha - 1)`` and Adam (per-coordinate
updates) ``L**(alpha - 1)`` for each block to move the residual stream by
``Theta(1/L)`` (:data:`DEPTH_RULES`: ``"depth-mup"``, ``alpha = 1/2``, the
default, and ``"completep"``, ``alpha = 1``, arXiv 2505.01618; ``"none"``
leaves branches unscaled). Which layers form the branches is the model's
:class:`Branches` (its ``branches`` attribute, or ``branches=`` to
:func:`apply_parametrization`); a model without branches ignores the rule.

Presets: :func:`ntk` (multiplier gauge, r = 0), :func:`mup` (table gauge, r = 1/2),
:func:`mean_field` (multiplier gauge, r = 1/2), :func:`standard` (PyTorch default
init, one rate), :func:`richness` (any r, either gauge) and :func:`gamma_family`.
Biases start at 0 (PyTorch's default under SP); norm gains keep their init.
Attention logits are scaled by ``d_head**-(1/2 + r)`` (``1/sqrt(d_head)`` at NTK,
``1/d_head`` at muP; in between an interpolation, not a derived rule).

How the multipliers are applied without renaming parameters: every parametrized
module (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``) gets one forward
hook, a :class:`LayerScale` object that maps the module's output ``y = W x + b``
to ``c y + (c_b - c) b`` (exactly ``c W x + c_b b``; a no-op while both
multipliers are 1) and holds the layer's role, fan-in and multipliers, and the
:class:`Applied` record (parametrization and width) shared by the model's
layers. Nothing else is stored on the modules: :func:`layer_scales` and
:func:`applied_parametrization` read those hook objects back. :func:`rescale`
adds an :class:`OutputScale` hook to the root module. The hooks run under
``torch.func.functional_call``, so rdiag's functional view and every
eNTK/Hessian see the parametrized function.
"""

from rdiag.parametrization.application import (
    Applied,
    Centered,
    LayerScale,
    OutputScale,
    applied_parametrization,
    apply_parametrization,
    effective_weights,
    layer_scale,
    layer_scales,
    model_width,
    rescale,
)
from rdiag.roles import ROLES, Role, fan_in, infer_roles
from rdiag.parametrization.optimizers import OPTIMIZERS, lr_multipliers, make_optimizer
from rdiag.parametrization.rules import (
    DEPTH_RULES,
    Branches,
    DepthRule,
    Gauge,
    Parametrization,
    Rule,
    Scale,
    depth_rule,
    gamma_family,
    gamma_for_richness,
    mean_field,
    mup,
    ntk,
    parse_depth_rule,
    parse_parametrization,
    richness,
    standard,
)

__all__ = [
    "DEPTH_RULES",
    "OPTIMIZERS",
    "ROLES",
    "Applied",
    "Branches",
    "Centered",
    "DepthRule",
    "Gauge",
    "LayerScale",
    "OutputScale",
    "Parametrization",
    "Role",
    "Rule",
    "Scale",
    "applied_parametrization",
    "apply_parametrization",
    "depth_rule",
    "effective_weights",
    "fan_in",
    "gamma_family",
    "gamma_for_richness",
    "infer_roles",
    "layer_scale",
    "layer_scales",
    "lr_multipliers",
    "make_optimizer",
    "mean_field",
    "model_width",
    "mup",
    "ntk",
    "parse_depth_rule",
    "parse_parametrization",
    "rescale",
    "richness",
    "standard",
]
