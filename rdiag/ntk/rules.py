r"""Structured eNTK rules: how a layer's per-sample gradients factor, per module type.

For a layer applied at positions ``t = 1..T`` of one sample (tokens, or the output
pixels of a convolution) the per-sample gradient of output unit ``a`` w.r.t. one of
its parameters is a sum of outer products

.. math:: J[i, a] = \sum_t G[i, a, t] \otimes X[i, t],

``G`` the cotangent of the layer output for unit ``a``, ``X`` the layer input (an
unfolded patch for a convolution, a one-hot row for an embedding, the constant 1
for a bias or a norm gain, whose ``G`` is then multiplied by the normalized
input). A :class:`StructuredRule` says, for one module type, where the
cotangents are tapped during the forward pass and how ``(G, X)`` factors are built
from them; the structured eNTK (:mod:`rdiag.ntk.structured`) only sees
:class:`Factor` objects.

Rules are looked up along the module's class hierarchy (a subclass of
``nn.LayerNorm`` gets the LayerNorm rule), or by the dotted class name for
classes rdiag does not import (Hugging Face's ``Conv1D``). A subclass that
changes the computation is caught by the one-time autograd check of every plan
and goes to the generic path. Users add rules with
:func:`register_structured_rule`.

Built-in rules: ``nn.Linear``; ``nn.Conv1d/2d/3d`` (any padding mode, groups,
dilation, stride); ``nn.Embedding``; ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GroupNorm``; eval-mode ``nn.BatchNorm1d/2d/3d``; Hugging Face ``Conv1D``
(a transposed linear); ``nn.MultiheadAttention`` (``batch_first=True``, packed
projections).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Factor",
    "StructuredRule",
    "layer_rule",
    "register_structured_rule",
    "rule_for",
]

#: ``tap(t) -> t + eps``: marks a tensor whose cotangent a rule needs.
Tap = Callable[[Tensor], Tensor]


@dataclass
class Factor:
    """Per-sample gradients of one parameter as ``J[i, a] = sum_t G[i, a, t] (x) X[i, t]``.

    Attributes:
        g: ``(N, O, T, Dg)`` cotangent side.
        x: ``(N, T, Dx)`` floating input side; ``(N, T)`` integer token ids (one-hot
            rows of the embedding table); or ``None`` for the constant 1 (``Dx = 1``).
        transposed: The parameter stores the gradient as ``(Dx, Dg)`` rather than
            ``(Dg, Dx)`` (an embedding table, Hugging Face ``Conv1D``). Only the
            pairing of two uses of one tied parameter depends on it.
        groups: ``Dg`` and ``Dx`` split into this many blocks that pair block by
            block (a grouped convolution: the gradient is block diagonal).
    """

    g: Tensor
    x: Tensor | None
    transposed: bool = False
    groups: int = 1

    @property
    def tokens(self) -> bool:
        """Whether ``x`` holds token ids."""
        return self.x is not None and not self.x.is_floating_point()

    def rows(self, sl: slice) -> Factor:
        """The factor of samples ``sl``."""
        x = None if self.x is None else self.x[sl]
        return Factor(self.g[sl], x, self.transposed, self.groups)

    def gradient(self, v: Tensor, shape: torch.Size) -> Tensor:
        """``sum_{i,a} v[i, a] J[i, a]`` in the parameter's own ``shape``."""
        gv = torch.einsum("na,natg->ntg", v, self.g)
        if self.x is None:
            return gv.sum((0, 1)).reshape(shape)
        if self.tokens:
            table = gv.new_zeros(shape[0], gv.shape[-1])
            table.index_add_(0, self.x.reshape(-1), gv.reshape(-1, gv.shape[-1]))
            return table.reshape(shape)
        k = self.groups
        g = gv.reshape(*gv.shape[:2], k, -1)
        x = self.x.reshape(*self.x.shape[:2], k, -1)
        grad = torch.einsum("ntkg,ntkx->kgx", g, x)
        if self.transposed:
            grad = grad.transpose(1, 2)
        return grad.reshape(shape)


@dataclass(frozen=True)
class StructuredRule:
    """How the parameters of one module type get :class:`Factor` s.

    Attributes:
        capture: ``(module, args, kwargs, output, tap) -> (output, saved)``, run in
            a forward hook (the module's parameters are those of the functional
            call). ``tap(t)`` returns ``t + eps`` and marks ``t`` as a tensor
            whose cotangent is needed; the returned output replaces the module's
            (it must equal it). ``saved`` is what ``factors`` needs.
        factors: ``(module, saved, cotangents) -> {local name: Factor}``;
            ``cotangents`` holds, in tap order, ``(N, O, *t.shape[1:])`` tensors.
        reason: ``module -> str | None``: why an instance is not supported.
        params: ``module -> local names`` of the parameters the rule covers
            (default: the module's own); dotted names claim a child's parameters.
    """

    capture: Callable[[nn.Module, tuple, dict, Any, Tap], tuple[Any, Any]]
    factors: Callable[[nn.Module, Any, list[Tensor]], dict[str, Factor]]
    reason: Callable[[nn.Module], str | None] = field(default=lambda module: None)
    params: Callable[[nn.Module], list[str]] = field(
        default=lambda module: [n for n, _ in module.named_parameters(recurse=False)]
    )


def layer_rule(
    prepare: Callable[[nn.Module, Tensor], Any],
    factors: Callable[[nn.Module, Any, Tensor], dict[str, Factor]],
    reason: Callable[[nn.Module], str | None] | None = None,
) -> StructuredRule:
    """The rule of a layer ``y = layer(x)``: the output is tapped, ``x`` prepared.

    Args:
        prepare: ``(module, x) -> saved`` with ``x`` the first positional input.
        factors: ``(module, saved, cotangent) -> {local name: Factor}``, the
            cotangent of the output being ``(N, O, *out)``.
        reason: Why an instance is not supported (default: always supported).

    Returns:
        The :class:`StructuredRule`.
    """

    def capture(module, args, kwargs, output, tap):
        with torch.no_grad():
            saved = prepare(module, args[0].detach())
        return tap(output), saved

    return StructuredRule(
        capture=capture,
        factors=lambda module, saved, cots: factors(module, saved, cots[0]),
        reason=reason or (lambda module: None),
    )


_RULES: dict[type | str, StructuredRule] = {}


def register_structured_rule(module_type: type | str, rule: StructuredRule) -> None:
    """Make the structured eNTK capture ``module_type`` (and its subclasses) by ``rule``.

    Args:
        module_type: An ``nn.Module`` subclass, or its dotted class name
            (``"package.module.Class"``) to avoid importing its package.
        rule: The :class:`StructuredRule` (often made with :func:`layer_rule`).

    Raises:
        TypeError: Neither a module class nor a dotted name, or not a rule.

    Example:
        >>> import torch
        >>> class Scale(torch.nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> def factors(module, x, cot):  # y = w * x: the gain rule with x itself
        ...     n, o = cot.shape[:2]
        ...     g = cot.reshape(n, o, -1, x.shape[-1]) * x.reshape(n, 1, -1, x.shape[-1])
        ...     return {"weight": Factor(g, None)}
        >>> register_structured_rule(Scale, layer_rule(lambda m, x: x, factors))
        >>> rule_for(Scale(3)) is not None
        True
    """
    if not (
        (isinstance(module_type, type) and issubclass(module_type, nn.Module))
        or (isinstance(module_type, str) and "." in module_type)
    ):
        raise TypeError(
            f"expected an nn.Module subclass or a dotted class name, got {module_type!r}"
        )
    if not isinstance(rule, StructuredRule):
        raise TypeError(
            f"expected a StructuredRule (see rdiag.ntk.rules.layer_rule), got "
            f"{type(rule).__name__}"
        )
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> StructuredRule | None:
    """The rule of the nearest class in ``type(module).__mro__`` that has one."""
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _RULES:
                return _RULES[key]
    return None


# ---- Linear, HF Conv1D ---------------------------------------------------------------
def _linear_factors(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    g = cot.reshape(cot.shape[0], cot.shape[1], -1, module.out_features)
    return {"weight": Factor(g, saved), "bias": Factor(g, None)}


def _hf_conv1d_factors(
    module: nn.Module, saved: Tensor, cot: Tensor
) -> dict[str, Factor]:
    """``y = x W + b`` with ``W (in, out)``: a linear whose weight is stored transposed."""
    g = cot.reshape(cot.shape[0], cot.shape[1], -1, module.nf)
    return {"weight": Factor(g, saved, transposed=True), "bias": Factor(g, None)}


# ---- convolutions ---------------------------------------------------------------------
def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input patches ``(N, L, C_in * prod(kernel))`` of a 1d/2d/3d convolution.

    The patch layout is ``(group, channel in group, kernel...)``, the weight's own.
    """
    d = len(module.kernel_size)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module.padding, str):
        total = [
            dl * (k - 1) if module.padding == "same" else 0
            for k, dl in zip(kernel, dilation)
        ]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in module.padding]
    flat = [side for pair in reversed(pads) for side in pair]
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    n, c = x.shape[:2]
    if d == 2:
        return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    for axis, (k, s, dl) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + axis, dl * (k - 1) + 1, s)
        if dl > 1:
            x = x[..., ::dl]
    # (N, C, out_1..out_d, k_1..k_d) -> (N, L, C * prod(k))
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(n, -1, c * math.prod(kernel))


def _conv_factors(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    n, o = cot.shape[:2]
    g = cot.reshape(n, o, module.out_channels, -1).transpose(2, 3)
    k = module.groups
    return {"weight": Factor(g, saved, groups=k), "bias": Factor(g, None)}


# ---- embeddings -------------------------------------------------------------------------
def _embedding_factors(
    module: nn.Module, saved: Tensor, cot: Tensor
) -> dict[str, Factor]:
    g = cot.reshape(cot.shape[0], cot.shape[1], -1, module.embedding_dim)
    if module.padding_idx is not None:
        g = g * (saved != module.padding_idx)[:, None, :, None].to(g.dtype)
    return {"weight": Factor(g, saved, transposed=True)}


def _embedding_reason(module: nn.Module) -> str | None:
    if module.max_norm is not None:
        return "max_norm renormalizes the table in place"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq couples the samples"
    return None


# ---- normalization gains ------------------------------------------------------------------
def _last_dims_norm(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    """Gain and bias over the trailing ``normalized_shape`` (LayerNorm, RMSNorm)."""
    n, o = cot.shape[:2]
    d = math.prod(module.normalized_shape)
    g = cot.reshape(n, o, -1, d)
    return {
        "weight": Factor(g * saved.reshape(n, 1, -1, d), None),
        "bias": Factor(g, None),
    }


def _channel_norm(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    """Gain and bias per channel (axis 1): BatchNorm in eval mode, GroupNorm."""
    n, o, c = cot.shape[:3]
    g = cot.reshape(n, o, c, -1).transpose(2, 3)
    xhat = saved.reshape(n, 1, c, -1).transpose(2, 3)
    return {"weight": Factor(g * xhat, None), "bias": Factor(g, None)}


def _batchnorm_hat(module: nn.Module, x: Tensor) -> Tensor:
    mean, var = module.running_mean, module.running_var
    return F.batch_norm(x, mean, var, None, None, False, 0.0, module.eps)


def _batchnorm_reason(module: nn.Module) -> str | None:
    if module.running_mean is None:
        return "batch norm without running statistics normalizes by the batch"
    return None


# ---- multi-head attention ------------------------------------------------------------------
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_reason(module: nn.Module) -> str | None:
    if not module.batch_first:
        return "batch_first=False (the sample axis is not axis 0)"
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    if module.training and module.dropout > 0:
        return "attention dropout in train mode"
    return None


def _mha_params(module: nn.Module) -> list[str]:
    names = ["in_proj_weight", "out_proj.weight"]
    if module.in_proj_bias is not None:
        names.append("in_proj_bias")
    if module.out_proj.bias is not None:
        names.append("out_proj.bias")
    return names


def _mha_mask(
    module: nn.Module, args: dict, n: int, tq: int, tk: int, like: Tensor
) -> Tensor | None:
    """The additive ``(N, H, Tq, Tk)`` mask of ``attn_mask``, ``key_padding_mask``, ``is_causal``."""
    mask = torch.zeros(
        n, module.num_heads, tq, tk, dtype=like.dtype, device=like.device
    )
    used = False
    attn_mask = args.get("attn_mask")
    if args.get("is_causal") and attn_mask is None:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=like.device).triu(1)
    for m, shape in ((attn_mask, None), (args.get("key_padding_mask"), "keys")):
        if m is None:
            continue
        used = True
        add = (
            torch.zeros_like(m, dtype=like.dtype).masked_fill(m, float("-inf"))
            if (m.dtype == torch.bool)
            else m.to(like.dtype)
        )
        if shape == "keys":
            add = add.reshape(n, 1, 1, tk)
        elif add.dim() == 3:
            add = add.reshape(n, module.num_heads, tq, tk)
        mask = mask + add
    return mask if used else None


def _mha_capture(module, args, kwargs, output, tap):
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    e, h = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    parts = []
    for k, inp in enumerate((query, key, value)):
        bias = None if b is None else b[k * e : (k + 1) * e]
        parts.append(tap(F.linear(inp, w[k * e : (k + 1) * e], bias)))
    q, kk, v = parts
    n, tq, tk = q.shape[0], q.shape[1], kk.shape[1]
    heads = [t.reshape(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, kk, v)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(e // h)
    mask = _mha_mask(module, a, n, tq, tk, scores)
    attn = (scores if mask is None else scores + mask).softmax(-1)
    ctx = (attn @ heads[2]).transpose(1, 2).reshape(n, tq, e)
    out = tap(F.linear(ctx, module.out_proj.weight, module.out_proj.bias))
    weights = None
    if a["need_weights"]:
        weights = attn.mean(1) if a["average_attn_weights"] else attn
    saved = tuple(t.detach() for t in (query, key, value, ctx))
    return (out, weights), saved


def _mha_factors(module, saved, cots) -> dict[str, Factor]:
    query, key, value, ctx = saved
    e = module.embed_dim
    gq, gk, gv, go = cots
    # The packed in-projection (3E, E): each of q, k, v writes its own row block.
    blocks = [F.pad(g, (k * e, (2 - k) * e)) for k, g in enumerate((gq, gk, gv))]
    g_in = torch.cat(blocks, dim=2)
    x_in = torch.cat([query, key, value], dim=1)
    out = {
        "in_proj_weight": Factor(g_in, x_in),
        "out_proj.weight": Factor(go, ctx),
    }
    if module.in_proj_bias is not None:
        out["in_proj_bias"] = Factor(g_in, None)
    if module.out_proj.bias is not None:
        out["out_proj.bias"] = Factor(go, None)
    return out


def _conv_reason(module: nn.Module) -> str | None:
    return None


def _builtin_rules() -> dict[type | str, StructuredRule]:
    linear = layer_rule(
        lambda m, x: x.reshape(len(x), -1, m.in_features), _linear_factors
    )
    conv = layer_rule(_conv_patches, _conv_factors, _conv_reason)
    rules: dict[type | str, StructuredRule] = {
        nn.Linear: linear,
        nn.Conv1d: conv,
        nn.Conv2d: conv,
        nn.Conv3d: conv,
        nn.Embedding: layer_rule(
            lambda m, x: x.reshape(len(x), -1), _embedding_factors, _embedding_reason
        ),
        nn.LayerNorm: layer_rule(
            lambda m, x: F.layer_norm(x, m.normalized_shape, None, None, m.eps),
            _last_dims_norm,
        ),
        nn.GroupNorm: layer_rule(
            lambda m, x: F.group_norm(x, m.num_groups, None, None, m.eps),
            _channel_norm,
        ),
        nn.modules.batchnorm._BatchNorm: layer_rule(
            _batchnorm_hat, _channel_norm, _batchnorm_reason
        ),
        "transformers.pytorch_utils.Conv1D": layer_rule(
            lambda m, x: x.reshape(len(x), -1, x.shape[-1]), _hf_conv1d_factors
        ),
        nn.MultiheadAttention: StructuredRule(
            capture=_mha_capture,
            factors=_mha_factors,
            reason=_mha_reason,
            params=_mha_params,
        ),
    }
    if hasattr(nn, "RMSNorm"):
        rules[nn.RMSNorm] = layer_rule(
            lambda m, x: F.rms_norm(x, m.normalized_shape, None, m.eps),
            _last_dims_norm,
        )
    return rules


_RULES.update(_builtin_rules())


def covered_names(module: nn.Module, rule: StructuredRule) -> Sequence[str]:
    """The local parameter names ``rule`` covers on ``module`` (that exist)."""
    return [n for n in rule.params(module) if _has_param(module, n)]


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False
