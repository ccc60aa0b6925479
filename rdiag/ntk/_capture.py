"""Capture of per-sample gradient factors with forward hooks (see :mod:`rdiag.ntk.rules`).

One forward pass runs each supported module's rule in a forward hook: the rule
records what its factors need (the layer input, an unfolded patch...) and taps
the tensors whose cotangents it needs (``t + eps`` with a zero ``eps``). A
parameter used directly in a parent's ``forward`` with a leading axis of size 1
(a class token, a positional table added to activations) is tapped by
substitution: it enters as ``p.expand(N, ...) + eps``. One backward pass, batched
over the ``O`` output units, gives ``G = d f_a / d eps`` for every tap at once.

A module called ``k`` times has its calls concatenated along ``T``, which is exact
(the gradient sums over uses). One parameter used by several modules (tied
weights) keeps one factor per module; the kernel sums over every pair of them. A
module whose input and output have batch size 1 while the batch has ``N``
samples (an embedding of position ids broadcast over the batch) is expanded to
``N`` so that each sample gets its own cotangent. Memory: ``N * O *
sum_taps(T * D)`` floats for the cotangents.

The factors are checked against autograd once per plan (:func:`verify_sites`:
the gradient of a random output projection on a few samples, rebuilt from the
factors); a parameter whose factors do not reproduce it (used outside its
module's ``forward``, a batch-first assumption broken) is reported as failed and
goes to the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from rdiag._autodiff import math_attention
from rdiag._inputs import Inputs, batch_size, rows
from rdiag.functional import FunctionalModel
from rdiag.ntk.rules import Factor, StructuredRule, covered_names, rule_for
from rdiag.parametrization import layer_scale

__all__ = ["Site", "capture", "sites_of", "verify_sites"]

#: Samples used by the one-time check of the factors against autograd.
CHECK_SAMPLES = 4
#: Output units used by that check (the structure does not depend on the unit).
CHECK_OUTPUTS = 16
#: Errors a capture pass can raise when a rule or a substitution does not fit a model.
CAPTURE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)

Factors = dict[str, list[Factor]]


@dataclass
class Site:
    """A captured place: a supported module, or a parameter tapped by substitution.

    Attributes:
        name: Module path (``""`` for the root), or the parameter's name.
        module: The module, or ``None`` for a substituted parameter.
        rule: The module's :class:`~rdiag.ntk.rules.StructuredRule`.
        params: Local parameter name (``"weight"``, ``"out_proj.bias"``) -> the
            selected full name (a tied parameter's first name).
        scales: Local name -> forward multiplier of a parametrization
            (:class:`rdiag.parametrization.LayerScale`); absent means 1.
    """

    name: str
    module: nn.Module | None
    rule: StructuredRule | None
    params: dict[str, str]
    scales: dict[str, float]


def sites_of(fm: FunctionalModel) -> tuple[list[Site], dict[str, str]]:
    """Split the selected parameters into captured sites and the rest (static rules).

    A module is captured when a rule is found along its class hierarchy and the
    instance is supported; a rule may claim parameters of its children
    (``nn.MultiheadAttention``'s ``out_proj``). A selected parameter that no
    module captures and whose first axis has size 1 is tapped by substitution.
    Tied parameters get one site per module that uses them.

    Args:
        fm: Functional model.

    Returns:
        The sites, and uncovered selected name -> reason (the module type and why).
    """
    selected = set(fm.names)
    canonical = {id(p): n for n, p in fm.module.named_parameters()}
    sites: list[Site] = []
    rest: dict[str, str] = {}
    claimed: dict[
        str, str
    ] = {}  # full name -> path of the module whose rule claimed it
    skipped = fm.skipped_modules
    for mname, module in fm.module.named_modules():
        if any(mname == m or mname.startswith(f"{m}.") for m in skipped):
            continue
        own = {
            k: canonical[id(p)]
            for k, p in module.named_parameters(recurse=False)
            if canonical.get(id(p)) in selected
        }
        rule = rule_for(module)
        kind = type(module).__name__
        if rule is None:
            for full in own.values():
                rest.setdefault(full, f"{kind} (no structured rule)")
            continue
        local = {
            k: canonical[id(module.get_parameter(k))]
            for k in covered_names(module, rule)
            if canonical.get(id(module.get_parameter(k))) in selected
        }
        # A parameter an ancestor's rule already covers is not this module's.
        local = {
            k: n
            for k, n in local.items()
            if not _claimed_by_ancestor(claimed.get(n), mname)
        }
        if not local:
            continue
        reason = rule.reason(module)
        if reason is not None:
            for full in local.values():
                rest[full] = f"{kind} ({reason})"
            continue
        scale = layer_scale(module)
        scales = {} if scale is None else {"weight": scale.weight, "bias": scale.bias}
        sites.append(Site(mname, module, rule, local, scales))
        for full in local.values():
            claimed.setdefault(full, mname)
    covered = {n for s in sites for n in s.params.values()}
    for name in fm.names:
        if name in covered or name in rest and "no structured rule" not in rest[name]:
            continue
        shape = fm.shapes[name]
        if len(shape) >= 2 and shape[0] == 1:
            sites.append(Site(name, None, None, {"": name}, {}))
            rest.pop(name, None)
        elif name not in rest:
            rest[name] = "used outside any module's forward"
    # A parameter is structured only if every module using it is (tied weights).
    sites = [
        replace(s, params={k: n for k, n in s.params.items() if n not in rest})
        for s in sites
    ]
    return [s for s in sites if s.params], rest


def _claimed_by_ancestor(owner: str | None, path: str) -> bool:
    if owner is None or owner == path:
        return False
    return owner == "" or path.startswith(owner + ".")


def capture(
    fm: FunctionalModel,
    sites: list[Site],
    x: Inputs,
    chunk: int,
    *,
    outputs: slice | None = None,
) -> tuple[Factors, dict[str, str]]:
    """Factors of every parameter of ``sites`` on the batch ``x``.

    Args:
        fm: Functional model (not batch-coupled).
        sites: From :func:`sites_of` (checked by :func:`verify_sites`).
        x: Inputs ``(N, ...)``.
        chunk: Samples per forward/backward pass.
        outputs: Only these output units (the ``O`` axis of the factors); default all.

    Returns:
        Full parameter name -> its :class:`~rdiag.ntk.rules.Factor` s (one per
        module using it) over all ``N`` samples, and the names that could not be
        captured -> reason.
    """
    params = fm.params
    parts, failed = [], {}
    for start in range(0, batch_size(x), chunk):
        part, bad = _capture_chunk(
            fm, params, sites, rows(x, slice(start, start + chunk)), outputs
        )
        failed.update(bad)
        parts.append(part)
    memo: dict = {}
    factors = {
        n: [_join([p[n][k] for p in parts], 0, memo) for k in range(len(parts[0][n]))]
        for n in parts[0]
        if n not in failed
    }
    del parts
    for name, uses in factors.items():
        factors[name] = list(_laid_out(dict(enumerate(uses))).values())
    return factors, failed


def _laid_out(facs: dict, /) -> dict:
    """The factors with ``g (N, O, T, Dg)`` laid out as ``(N, T, O, Dg)`` in memory.

    The traced kernel contracts each sample's ``(O, Dg)`` block per position as one
    vector, which this layout makes a view; the vmapped backward leaves the output
    units outermost (and a concatenation, the logical order), so ``g`` is copied
    where it is not laid out so. Factors sharing a ``g`` (a weight and its bias)
    keep sharing one.
    """
    laid: dict[int, Tensor] = {}
    out = {}
    for key, f in facs.items():
        g = laid.get(id(f.g))
        if g is None:
            moved = f.g.permute(0, 2, 1, 3)
            g = f.g if moved.is_contiguous() else moved.contiguous().permute(0, 2, 1, 3)
            laid[id(f.g)] = g
        out[key] = f if g is f.g else replace(f, g=g)
    return out


@dataclass(frozen=True)
class TermShape:
    """The per-sample shape of one use of a parameter, as the cost model sees it.

    Attributes:
        t: Positions ``T`` of the use.
        dx: Input side ``Dx`` (the vocabulary for token ids; 1 for ``x=None``).
        dg: Cotangent side ``Dg``.
        tokens: ``x`` holds token ids.
        bare: ``x`` is the constant 1 (a bias, a norm gain).
        groups: Block-diagonal groups (grouped convolutions).
        uses: How many uses the parameter has (tied weights: more than one).
    """

    t: int
    dx: int
    dg: int
    tokens: bool
    bare: bool
    groups: int
    uses: int


@dataclass(frozen=True)
class CaptureCheck:
    """What the one-time capture and autograd check of a plan found.

    Attributes:
        failed: Selected names that could not be captured or failed the check -> why.
        cotangent_floats: Floats of the cotangents per sample and output unit.
        shapes: Captured name -> the :class:`TermShape` of each of its uses.
    """

    failed: dict[str, str]
    cotangent_floats: int
    shapes: dict[str, list[TermShape]]


def verify_sites(
    fm: FunctionalModel, sites: list[Site], x: Inputs, num_outputs: int
) -> CaptureCheck:
    """Capture on a few samples and check the factors against autograd (once per plan).

    Args:
        fm: Functional model.
        sites: From :func:`sites_of`.
        x: A batch; its first ``CHECK_SAMPLES`` samples are used.
        num_outputs: ``O``; at most ``CHECK_OUTPUTS`` output units are checked.

    Returns:
        The :class:`CaptureCheck`.
    """
    first = rows(x, slice(0, min(CHECK_SAMPLES, batch_size(x))))
    outputs = slice(0, min(num_outputs, CHECK_OUTPUTS))
    params = fm.params
    try:
        factors, failed = _capture_chunk(fm, params, sites, first, outputs)
    except CAPTURE_ERRORS as err:
        substituted = [s for s in sites if s.module is None]
        if not substituted:
            why = f"capture failed ({str(err).splitlines()[0][:120]})"
            return CaptureCheck(
                {n: why for s in sites for n in s.params.values()}, 0, {}
            )
        kept = [s for s in sites if s.module is not None]
        check = verify_sites(fm, kept, x, num_outputs)
        why = "used in a way a tapped parameter does not fit"
        check.failed.update({s.name: why for s in substituted})
        return check
    failed.update(_verify(fm, params, factors, first, outputs))
    seen = {id(f.g): f.g.numel() for fs in factors.values() for f in fs}
    units = batch_size(first) * (outputs.stop - outputs.start)
    shapes = {
        name: [_shape(f, fm.shapes[name], len(fs)) for f in fs]
        for name, fs in factors.items()
        if name not in failed
    }
    return CaptureCheck(failed, math.ceil(sum(seen.values()) / units), shapes)


def _shape(f: Factor, param_shape: torch.Size, uses: int) -> TermShape:
    t, dg = f.g.shape[2], f.g.shape[3]
    if f.x is None:
        dx = 1
    elif f.tokens:
        dx = param_shape[0]
    else:
        dx = f.x.shape[2]
    return TermShape(t, dx, dg, f.tokens, f.x is None, f.groups, uses)


def _join(parts: list[Factor], g_dim: int, memo: dict) -> Factor:
    """Concatenate factors over samples (``g_dim=0``) or uses (``g_dim=2``).

    Parameters sharing a cotangent (a weight and its bias) keep sharing one tensor:
    equal inputs give the one result kept in ``memo``.
    """

    def cat(tensors: list[Tensor], dim: int) -> Tensor:
        if len(tensors) == 1:
            return tensors[0]
        key = (tuple(id(t) for t in tensors), dim)
        if key not in memo:
            memo[key] = torch.cat(tensors, dim)
        return memo[key]

    xs = [p.x for p in parts]
    x = None if xs[0] is None else cat(xs, 0 if g_dim == 0 else 1)
    first = parts[0]
    return Factor(cat([p.g for p in parts], g_dim), x, first.transposed, first.groups)


def _hook_for(
    site: Site, n: int, calls: dict[str, list], failed: dict[str, str]
) -> Callable:
    """The forward hook that runs ``site``'s rule on one call of its module."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        inp = args[0] if args else None
        main = output[0] if isinstance(output, tuple) and output else output
        if not (isinstance(inp, Tensor) and isinstance(main, Tensor)):
            failed[site.name] = (
                f"{type(module).__name__} (input or output not a tensor)"
            )
            return None
        if n > 1 and inp.shape[:1] == (1,) and main.shape[:1] == (1,):
            if not isinstance(output, Tensor):
                failed[site.name] = (
                    f"{type(module).__name__} (broadcast over the batch)"
                )
                return None
            # Broadcast over the batch (position ids): one copy per sample.
            args = (inp.expand(n, *inp.shape[1:]), *args[1:])
            output = main = output.expand(n, *output.shape[1:])
        if inp.shape[:1] not in ((n,), (1,)) or main.shape[:1] != (n,):
            failed[site.name] = (
                f"{type(module).__name__} (input or output not batch-first)"
            )
            return None
        taps: list[Tensor] = []

        def tap(t: Tensor) -> Tensor:
            eps = torch.zeros_like(t, requires_grad=True)
            taps.append(eps)
            return t + eps

        new_output, saved = site.rule.capture(module, args, kwargs, output, tap)
        calls[site.name].append((saved, taps))
        return new_output

    return hook


def _capture_chunk(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    sites: list[Site],
    x: Inputs,
    outputs: slice | None,
) -> tuple[Factors, dict[str, str]]:
    n = batch_size(x)
    calls: dict[str, list] = {s.name: [] for s in sites}
    failed: dict[str, str] = {}
    handles = [
        s.module.register_forward_hook(_hook_for(s, n, calls, failed), with_kwargs=True)
        for s in sites
        if s.module is not None
    ]
    substituted = {}
    for s in sites:
        if s.module is None:
            p = params[s.name]
            eps = torch.zeros(n, *p.shape[1:], dtype=p.dtype, device=p.device)
            eps.requires_grad_(True)
            substituted[s.name] = (p.expand(n, *p.shape[1:]) + eps, eps)
            calls[s.name].append((None, [eps]))
    try:
        # Math attention: its backward is batched over output units by vmap (the
        # fused kernels' backwards have no batching rule and would loop).
        with torch.enable_grad(), math_attention():
            out = fm({**params, **{k: v for k, (v, _) in substituted.items()}}, x)
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        if not calls[s.name] and s.name not in failed:
            failed[s.name] = f"{type(s.module).__name__} (forward never called)"
    live = [(s, c) for s in sites if s.name not in failed for c in calls[s.name]]
    flat = [eps for _, (_, taps) in live for eps in taps]
    cots = _cotangents(out, flat, outputs)
    per_site: dict[str, list[dict[str, Factor]]] = {}
    used = 0
    for site, (saved, taps) in live:
        site_cots = [c.movedim(0, 1) for c in cots[used : used + len(taps)]]
        cots[used : used + len(taps)] = [None] * len(taps)  # freed once laid out
        used += len(taps)
        if site.module is None:
            g = site_cots[0]
            facs = {"": Factor(g.reshape(n, g.shape[1], 1, -1), None)}
        else:
            facs = _with_multipliers(
                site, site.rule.factors(site.module, saved, site_cots)
            )
        del site_cots
        per_site.setdefault(site.name, []).append(_laid_out(facs))
    memo: dict = {}
    factors: Factors = {}
    for site in sites:
        if site.name in failed:
            continue
        for local, full in site.params.items():
            joined = _join([f[local] for f in per_site[site.name]], 2, memo)
            factors.setdefault(full, []).append(joined)
    names_failed = {
        full: failed[s.name]
        for s in sites
        if s.name in failed
        for full in s.params.values()
    }
    return {k: v for k, v in factors.items() if k not in names_failed}, names_failed


def _with_multipliers(site: Site, facs: dict[str, Factor]) -> dict[str, Factor]:
    """Apply a parametrization's forward multipliers (``Site.scales``).

    The capture hook runs after the multiplier hook, so the cotangent is that of
    ``c W x + c_b b``: the weight's Jacobian is ``c G (x) X`` and the bias's ``c_b G``.
    """
    out = {}
    for k, f in facs.items():
        scale = site.scales.get(k, 1.0)
        out[k] = f if scale == 1.0 else Factor(scale * f.g, f.x, f.transposed, f.groups)
    return out


def _cotangents(out: Tensor, eps: list[Tensor], outputs: slice | None) -> list[Tensor]:
    """``d out[:, a] / d eps`` for the output units ``a`` in ``outputs``: ``(O', *eps.shape)``."""
    if not eps:
        return []
    n, width = out.shape
    basis = torch.eye(width, dtype=out.dtype, device=out.device)[outputs or slice(None)]
    o = len(basis)
    if not out.requires_grad:
        return [torch.zeros(o, *e.shape, dtype=e.dtype, device=e.device) for e in eps]
    basis = basis[:, None, :].expand(o, n, width)

    def pullback(v: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            out, eps, v, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    return list(torch.func.vmap(pullback)(basis))


def _verify(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    factors: Factors,
    x: Inputs,
    outputs: slice | None,
) -> dict[str, str]:
    """Names whose factors do not reproduce autograd's ``J^T v`` for a random ``v``.

    ``v`` is zero outside the captured output units ``outputs``. A parameter whose
    true gradient is zero to round-off (a key bias before a softmax) passes when
    its rebuilt gradient is too.
    """
    if not factors:
        return {}
    gen = torch.Generator(device=fm.device).manual_seed(0)
    leaves = {n: params[n].detach().clone().requires_grad_() for n in factors}
    with torch.enable_grad():
        out = fm({**params, **leaves}, x)
        v = torch.zeros_like(out)
        kept = v[:, outputs or slice(None)]
        kept.copy_(
            torch.randn(kept.shape, generator=gen, dtype=v.dtype, device=v.device)
        )
        grads = torch.autograd.grad(
            (out * v).sum(),
            list(leaves.values()),
            allow_unused=True,
            materialize_grads=True,
        )
    tol = math.sqrt(torch.finfo(out.dtype).eps)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    bad = {}
    for (name, leaf), true in zip(leaves.items(), grads):
        rebuilt = sum(f.gradient(kept, leaf.shape) for f in factors[name])
        scale = max(float(true.norm()), float(rebuilt.norm()), tol * total, 1e-30)
        if float((rebuilt - true).norm()) > tol * scale:
            bad[name] = (
                "gradient check failed (parameter used outside its module's forward?)"
            )
    return bad


@dataclass(frozen=True)
class StructuredPlan:
    """What the structured path captures for one input signature, checked once.

    Attributes:
        sites: Supported modules whose factors passed the autograd check.
        rest: Selected parameter name -> why it goes through ``"jacobian"``
            (no rule, an unsupported instance, tied, or a failed check).
        rest_view: The functional view of the ``rest`` parameters with a non-zero
            weight (``None`` if there are none), built once.
        cotangent_floats: Floats of the captured cotangents per sample and output
            unit (measured by the autograd check).
        shapes: Captured name -> the shapes of its uses (for the cost model).
    """

    sites: list[Site]
    rest: dict[str, str]
    rest_view: FunctionalModel | None = None
    cotangent_floats: int = 0
    shapes: dict[str, list[TermShape]] = field(default_factory=dict)

    def coverage(self, fm: FunctionalModel) -> float:
        """Fraction of the selected scalar parameters that run structured."""
        names = {n for s in self.sites for n in s.params.values()}
        return sum(fm.sizes[n] for n in names) / fm.num_params


def plan_structured(
    fm: FunctionalModel, x: Inputs, num_outputs: int, weights: dict[str, float]
) -> StructuredPlan:
    """Split the parameters by the static rules, then check the captured factors.

    Args:
        fm: Functional model (not batch-coupled).
        x: A prepared batch of the planned signature (a few samples are used).
        num_outputs: ``O``.
        weights: Parameter name -> weight of the kernel (zero-weight ones are skipped).

    Returns:
        The :class:`StructuredPlan`.
    """
    sites, rest = sites_of(fm)
    sites = [s for s in sites if any(weights[n] != 0.0 for n in s.params.values())]
    check = verify_sites(fm, sites, x, num_outputs) if sites else None
    failed = {} if check is None else check.failed
    rest.update(failed)
    kept = []
    for site in sites:
        params = {k: n for k, n in site.params.items() if n not in failed}
        if params:
            kept.append(replace(site, params=params))
    view = sub_view(fm, [n for n in rest if weights[n]])
    if check is None:
        return StructuredPlan(kept, rest, view)
    return StructuredPlan(kept, rest, view, check.cotangent_floats, check.shapes)


def sub_view(fm: FunctionalModel, names: list[str]) -> FunctionalModel | None:
    """The view of ``names`` alone, sharing ``fm``'s settings."""
    if not names:
        return None
    return FunctionalModel(
        fm.module,
        [n for n in fm.names if n in names],
        mode=fm.mode,
        dtype=fm.dtype,
        dropout_seed=fm.dropout_seed,
        output_fn=fm.output_fn,
    )
