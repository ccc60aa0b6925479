"""Per-sample gradient factors of supported layers, captured with forward hooks.

For a layer applied to one sample at positions ``t = 1..T`` (tokens, or the output
pixels of a convolution) the per-sample gradient of output unit ``a`` w.r.t. one of
its parameters is a sum of outer products ``sum_t G[a, t] (x) X[t]``: ``G`` the
cotangent of the layer output for unit ``a``, ``X`` the layer input (an unfolded
patch for a convolution, a one-hot row for an embedding, the constant 1 for a bias
or a norm gain, whose ``G`` is then multiplied by the normalized input).

One forward pass records ``X`` with forward hooks and adds a zero tensor ``eps``
to each layer output; one backward pass, batched over the ``O`` output units,
gives ``G = d f_a / d eps`` for every layer at once. A module called ``k`` times
has its calls concatenated along ``T``, which is exact (the gradient sums over
uses). Memory: ``N * O * sum_layers(T * Dg)`` floats for the cotangents.

The factors are checked against autograd once per plan (:func:`verify_sites`:
the gradient of a random output projection on a few samples, rebuilt from the
factors); a parameter whose factors do not reproduce it (used outside its
module's ``forward``, a batch-first assumption broken) is reported as failed and
goes to the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._inputs import Inputs, batch_size, rows
from rdiag.functional import FunctionalModel
from rdiag.parametrization import layer_scale

__all__ = ["Factor", "Site", "capture", "cotangent_floats", "sites_of", "verify_sites"]

#: Samples used by the one-time check of the factors against autograd.
CHECK_SAMPLES = 4
#: Output units used by that check (the structure does not depend on the unit).
CHECK_OUTPUTS = 16


@dataclass
class Factor:
    """Per-sample gradients of one parameter as ``J[i, a] = sum_t G[i, a, t] (x) X[i, t]``.

    Attributes:
        g: ``(N, O, T, Dg)`` cotangent side.
        x: ``(N, T, Dx)`` floating input side; ``(N, T)`` integer token ids (one-hot
            rows of the embedding table); or ``None`` for the constant 1 (``Dx = 1``).
    """

    g: Tensor
    x: Tensor | None

    @property
    def tokens(self) -> bool:
        """Whether ``x`` holds token ids."""
        return self.x is not None and not self.x.is_floating_point()

    def rows(self, sl: slice) -> Factor:
        """The factor of samples ``sl``."""
        return Factor(self.g[sl], None if self.x is None else self.x[sl])


class _Handler(NamedTuple):
    """How one module type is captured.

    ``prepare(module, input)`` runs inside the forward hook (the module's buffers
    are those of the functional call) and returns what ``factors`` needs;
    ``factors(module, saved, cot)`` maps the cotangent ``(N, O, *out)`` to
    ``{local parameter name: Factor}``; ``reason(module)`` says why a module
    instance is not supported, or ``None``.
    """

    prepare: Callable[[nn.Module, Tensor], Tensor]
    factors: Callable[[nn.Module, Tensor, Tensor], dict[str, Factor]]
    reason: Callable[[nn.Module], str | None]


def _with_multipliers(site: Site, facs: dict[str, Factor]) -> dict[str, Factor]:
    """Apply a parametrization's forward multipliers (``Site.scales``).

    The capture hook runs after the multiplier hook, so the cotangent is that of
    ``c W x + c_b b``: the weight's Jacobian is ``c G (x) X`` and the bias's ``c_b G``.
    """
    return {
        k: f if site.scales.get(k, 1.0) == 1.0 else Factor(site.scales[k] * f.g, f.x)
        for k, f in facs.items()
    }


def _always(module: nn.Module) -> str | None:
    return None


def _linear_factors(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    g = cot.reshape(cot.shape[0], cot.shape[1], -1, module.out_features)
    return {"weight": Factor(g, saved), "bias": Factor(g, None)}


def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input patches ``(N, L, C * prod(kernel))`` of a 1d/2d convolution."""
    spatial = len(module.kernel_size)
    if spatial == 1:
        x = x.unsqueeze(2)
    kernel = (1,) * (2 - spatial) + tuple(module.kernel_size)
    dilation = (1,) * (2 - spatial) + tuple(module.dilation)
    stride = (1,) * (2 - spatial) + tuple(module.stride)
    if isinstance(module.padding, str):
        total = [
            d * (k - 1) if module.padding == "same" else 0
            for k, d in zip(kernel, dilation)
        ]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(0, 0)] * (2 - spatial) + [(p, p) for p in module.padding]
    x = F.pad(x, [side for pair in reversed(pads) for side in pair])
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _conv_factors(module: nn.Module, saved: Tensor, cot: Tensor) -> dict[str, Factor]:
    n, o = cot.shape[:2]
    g = cot.reshape(n, o, module.out_channels, -1).transpose(2, 3)
    return {"weight": Factor(g, saved), "bias": Factor(g, None)}


def _conv_reason(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def _embedding_factors(
    module: nn.Module, saved: Tensor, cot: Tensor
) -> dict[str, Factor]:
    g = cot.reshape(cot.shape[0], cot.shape[1], -1, module.embedding_dim)
    if module.padding_idx is not None:
        g = g * (saved != module.padding_idx)[:, None, :, None].to(g.dtype)
    return {"weight": Factor(g, saved)}


def _embedding_reason(module: nn.Module) -> str | None:
    if module.max_norm is not None:
        return "max_norm renormalizes the table in place"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq couples the samples"
    return None


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


_HANDLERS: dict[type, _Handler] = {
    nn.Linear: _Handler(
        lambda m, x: x.reshape(len(x), -1, m.in_features), _linear_factors, _always
    ),
    nn.Conv1d: _Handler(_conv_patches, _conv_factors, _conv_reason),
    nn.Conv2d: _Handler(_conv_patches, _conv_factors, _conv_reason),
    nn.Embedding: _Handler(
        lambda m, x: x.reshape(len(x), -1), _embedding_factors, _embedding_reason
    ),
    nn.LayerNorm: _Handler(
        lambda m, x: F.layer_norm(x, m.normalized_shape, None, None, m.eps),
        _last_dims_norm,
        _always,
    ),
    nn.GroupNorm: _Handler(
        lambda m, x: F.group_norm(x, m.num_groups, None, None, m.eps),
        _channel_norm,
        _always,
    ),
    nn.BatchNorm1d: _Handler(_batchnorm_hat, _channel_norm, _batchnorm_reason),
    nn.BatchNorm2d: _Handler(_batchnorm_hat, _channel_norm, _batchnorm_reason),
}
if hasattr(nn, "RMSNorm"):
    _HANDLERS[nn.RMSNorm] = _Handler(
        lambda m, x: F.rms_norm(x, m.normalized_shape, None, m.eps),
        _last_dims_norm,
        _always,
    )


@dataclass
class Site:
    """A supported module owning selected parameters.

    Attributes:
        name: Module path (``""`` for the root module).
        module: The module.
        params: Local parameter name (``"weight"``) -> selected full name.
        scales: Local parameter name -> forward multiplier of a parametrization
            (:class:`rdiag.parametrization.LayerScale`); absent means 1.
    """

    name: str
    module: nn.Module
    params: dict[str, str]
    scales: dict[str, float]


def sites_of(fm: FunctionalModel) -> tuple[list[Site], dict[str, str]]:
    """Split the selected parameters into captured sites and the rest (static rules).

    A parameter is captured when its module's exact type has a handler (subclasses
    may override ``forward``), the module instance is supported, and no other
    module holds the same parameter object (tied weights go to the generic path).

    Args:
        fm: Functional model.

    Returns:
        The sites, and uncovered selected name -> reason (the module type and why).
    """
    selected = set(fm.names)
    owners: dict[int, set[int]] = {}
    for module in fm.module.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    sites, rest = [], {}
    for mname, module in fm.module.named_modules():
        local = {
            k: f"{mname}.{k}" if mname else k
            for k, p in module.named_parameters(recurse=False)
            if (f"{mname}.{k}" if mname else k) in selected
        }
        if not local:
            continue
        handler = _HANDLERS.get(type(module))
        reason = "no structured rule" if handler is None else handler.reason(module)
        kind = type(module).__name__
        for k, full in list(local.items()):
            if len(owners[id(getattr(module, k))]) > 1:
                rest[full] = f"{kind} (tied with another module)"
                del local[k]
            elif reason is not None:
                rest[full] = f"{kind} ({reason})"
                del local[k]
        if local:
            scale = layer_scale(module)
            scales = (
                {} if scale is None else {"weight": scale.weight, "bias": scale.bias}
            )
            sites.append(Site(mname, module, local, scales))
    return sites, rest


def capture(
    fm: FunctionalModel,
    sites: list[Site],
    x: Inputs,
    chunk: int,
    *,
    outputs: slice | None = None,
) -> tuple[dict[str, Factor], dict[str, str]]:
    """Factors of every parameter of ``sites`` on the batch ``x``.

    Args:
        fm: Functional model (not batch-coupled).
        sites: From :func:`sites_of` (checked by :func:`verify_sites`).
        x: Inputs ``(N, ...)``.
        chunk: Samples per forward/backward pass.
        outputs: Only these output units (the ``O`` axis of the factors); default all.

    Returns:
        Full parameter name -> :class:`Factor` over all ``N`` samples, and the names
        that could not be captured -> reason (their sites are dropped).
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
        n: _join([p[n] for p in parts], 0, memo) for n in parts[0] if n not in failed
    }
    return factors, failed


def verify_sites(
    fm: FunctionalModel, sites: list[Site], x: Inputs, num_outputs: int
) -> dict[str, str]:
    """Capture on a few samples and check the factors against autograd (once per plan).

    Args:
        fm: Functional model.
        sites: From :func:`sites_of`.
        x: A batch; its first ``CHECK_SAMPLES`` samples are used.
        num_outputs: ``O``; at most ``CHECK_OUTPUTS`` output units are checked.

    Returns:
        Selected names whose factors could not be captured or do not reproduce
        autograd's ``J^T v`` -> reason.
    """
    first = rows(x, slice(0, min(CHECK_SAMPLES, batch_size(x))))
    outputs = slice(0, min(num_outputs, CHECK_OUTPUTS))
    params = fm.params
    factors, failed = _capture_chunk(fm, params, sites, first, outputs)
    failed.update(_verify(fm, params, factors, first, outputs))
    return failed


def cotangent_floats(fm: FunctionalModel, sites: list[Site], x: Inputs) -> int:
    """Floats the captured factors take per sample and output unit (a no-grad probe).

    Args:
        fm: Functional model.
        sites: From :func:`plan`.
        x: A batch; only its first sample is run.

    Returns:
        ``sum`` over captured calls of the layer output size (twice for norm layers,
        whose gain and bias have separate cotangent factors).
    """
    sizes: list[int] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, Tensor):
            norm = _HANDLERS[type(module)].factors in (_last_dims_norm, _channel_norm)
            sizes.append(output[:1].numel() * (2 if norm else 1))

    handles = [s.module.register_forward_hook(hook) for s in sites]
    try:
        with torch.no_grad():
            fm(fm.params, rows(x, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes)


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
    return Factor(cat([p.g for p in parts], g_dim), x)


def _capture_chunk(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    sites: list[Site],
    x: Inputs,
    outputs: slice | None,
) -> tuple[dict[str, Factor], dict[str, str]]:
    n = batch_size(x)
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {s.name: [] for s in sites}
    failed: dict[str, str] = {}

    def hook_for(site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> Tensor | None:
            inp = args[0] if args else None
            batched = isinstance(inp, Tensor) and isinstance(output, Tensor)
            if not batched or inp.shape[:1] != (n,) or output.shape[:1] != (n,):
                failed[site.name] = (
                    f"{type(module).__name__} (input or output not batch-first)"
                )
                return None
            with torch.no_grad():
                saved = _HANDLERS[type(module)].prepare(module, inp.detach())
            eps = torch.zeros_like(output, requires_grad=True)
            calls[site.name].append((saved, eps))
            return output + eps

        return hook

    handles = [s.module.register_forward_hook(hook_for(s)) for s in sites]
    try:
        with torch.enable_grad():
            out = fm(params, x)
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        if not calls[s.name] and s.name not in failed:
            failed[s.name] = f"{type(s.module).__name__} (forward never called)"
    live = [(s, c) for s in sites if s.name not in failed for c in calls[s.name]]
    cots = _cotangents(out, [eps for _, (_, eps) in live], outputs)
    per_site: dict[str, list[dict[str, Factor]]] = {}
    for (site, (saved, _)), cot in zip(live, cots):
        facs = _HANDLERS[type(site.module)].factors(
            site.module, saved, cot.movedim(0, 1)
        )
        facs = _with_multipliers(site, facs)
        per_site.setdefault(site.name, []).append(facs)
    memo: dict = {}
    factors = {
        full: _join([f[local] for f in per_site[site.name]], 2, memo)
        for site in sites
        if site.name not in failed
        for local, full in site.params.items()
    }
    names_failed = {
        full: failed[s.name]
        for s in sites
        if s.name in failed
        for full in s.params.values()
    }
    return factors, names_failed


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
    grads = torch.autograd.grad(
        out, eps, basis, is_grads_batched=True, allow_unused=True
    )
    return [
        torch.zeros(o, *e.shape, dtype=e.dtype, device=e.device) if g is None else g
        for g, e in zip(grads, eps)
    ]


def gradient_from_factor(f: Factor, v: Tensor, shape: torch.Size) -> Tensor:
    """``sum_{i,a} v[i, a] J[i, a]`` reshaped to the parameter's ``shape``."""
    gv = torch.einsum("na,natg->ntg", v, f.g)
    if f.x is None:
        return gv.sum((0, 1)).reshape(shape)
    if f.tokens:
        table = gv.new_zeros(shape[0], gv.shape[-1])
        return table.index_add_(
            0, f.x.reshape(-1), gv.reshape(-1, gv.shape[-1])
        ).reshape(shape)
    return torch.einsum("ntg,ntx->gx", gv, f.x).reshape(shape)


def _verify(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    factors: dict[str, Factor],
    x: Inputs,
    outputs: slice | None,
) -> dict[str, str]:
    """Names whose factors do not reproduce autograd's ``J^T v`` for a random ``v``.

    ``v`` is zero outside the captured output units ``outputs``.
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
    bad = {}
    for (name, leaf), true in zip(leaves.items(), grads):
        rebuilt = gradient_from_factor(factors[name], kept, leaf.shape)
        scale = max(float(true.norm()), float(rebuilt.norm()), 1e-30)
        if float((rebuilt - true).norm()) > tol * scale:
            bad[name] = (
                "gradient check failed (parameter used outside its module's forward?)"
            )
    return bad
