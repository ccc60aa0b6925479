"""A model as a pure function ``f(params, x)`` of a selected set of its parameters.

Every diagnostic in rdiag starts here: :func:`functionalize` turns an ``nn.Module``
into a :class:`FunctionalModel` holding the selected parameters, the rest of the
state (frozen parameters and buffers), the per-layer grouping of the selected
parameters, and the mode (eval or train semantics) under which it is evaluated.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rdiag._checks import check_choice, check_module, check_tensor
from rdiag._typing import Params, ParamSelector, Weights

Mode = Literal["eval", "train"]
MODES = ("eval", "train")
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_DROPOUTS = (nn.modules.dropout._DropoutNd,)


def select_parameters(
    model: nn.Module, params: ParamSelector = None, exclude: ParamSelector = None
) -> list[str]:
    """Names of the parameters picked by a selector, in ``named_parameters()`` order.

    Args:
        model: The module.
        params: ``None`` (every parameter with ``requires_grad=True``), a name glob
            (``"fc*.weight"``), a list of globs or exact names, a module type or tuple
            of types (the parameters owned directly by such modules), or a predicate
            ``(name, parameter) -> bool``.
        exclude: A selector of the same kinds whose matches are removed.

    Returns:
        The selected names; tied parameters appear once, under their first name.

    Raises:
        ValueError: Nothing is selected, or an explicit selector picked parameters
            with ``requires_grad=False``.
        TypeError: The selector is of an unsupported kind.
    """
    check_module(model)
    named = list(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
    else:
        chosen = _match(model, named, params)
        frozen = [n for n in chosen if not dict(named)[n].requires_grad]
        if frozen:
            raise ValueError(
                f"the parameter selector picked parameters with requires_grad=False: "
                f"{frozen[:5]}; call p.requires_grad_(True) on them or exclude them"
            )
    if exclude is not None:
        dropped = set(_match(model, named, exclude))
        chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        names = [n for n, _ in named][:8]
        raise ValueError(
            f"no trainable parameters selected (params={params!r}, exclude={exclude!r}); "
            f"the model's parameters start with {names}; widen the selector or set "
            "requires_grad=True"
        )
    return chosen


def _match(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], selector: ParamSelector
) -> list[str]:
    if isinstance(selector, str):
        selector = [selector]
    if isinstance(selector, type) or (
        isinstance(selector, tuple) and all(isinstance(s, type) for s in selector)
    ):
        owned = {
            id(p)
            for m in model.modules()
            if isinstance(m, selector)
            for p in m.parameters(recurse=False)
        }
        return [n for n, p in named if id(p) in owned]
    if isinstance(selector, Sequence):
        if not all(isinstance(s, str) for s in selector):
            raise TypeError(f"expected a list of name globs, got {selector!r}")
        return [n for n, _ in named if any(fnmatch.fnmatchcase(n, s) for s in selector)]
    if callable(selector):
        return [n for n, p in named if selector(n, p)]
    raise TypeError(
        f"expected a parameter selector (glob, list of globs, module type, or "
        f"predicate(name, param)), got {type(selector).__name__}"
    )


def layer_of(name: str) -> str:
    """The layer (owning module path) of a parameter name: ``"net.0.weight" -> "net.0"``."""
    return name.rsplit(".", 1)[0] if "." in name else name


class FunctionalModel:
    """A module seen as ``f(params, x) -> (N, O)`` over its selected parameters.

    The output of the wrapped module, of shape ``(N, *out)``, is flattened to
    ``(N, O)`` with ``O = prod(out)`` (e.g. a language model's ``(N, T, V)`` becomes
    ``O = T * V``).

    Modes:
        ``"eval"`` (default): every module in eval mode: dropout off, batch norm uses
        its running statistics; the function acts on each sample separately.
        ``"train"``: every module in train mode: batch norm uses the statistics of
        the batch passed in (its running statistics are not updated) and dropout is
        active with a mask fixed by ``dropout_seed``, so repeated evaluations see the
        same function. If the model has batch norm or dropout, the function is then
        one of the whole batch (``batch_coupled``): ``R^{N x d} -> R^{N x O}``.

    Attributes:
        module: The wrapped module (never modified; its mode is restored after calls).
        names: Selected parameter names, ``named_parameters()`` order.
        params: The selected parameters as detached tensors (in ``dtype``).
        others: Every other parameter and buffer, by name.
        groups: Layer name -> names of its selected parameters.
        mode: ``"eval"`` or ``"train"``.
        batch_coupled: Whether outputs depend on other samples of the batch.
    """

    def __init__(
        self,
        module: nn.Module,
        names: Sequence[str],
        *,
        mode: Mode = "eval",
        dtype: torch.dtype | None = None,
        dropout_seed: int = 0,
        output_fn: Callable[[object], Tensor] | None = None,
    ) -> None:
        check_choice(mode, "mode", MODES)
        self.module = module
        self.names = tuple(names)
        self.mode = mode
        self.dtype = dtype
        self.dropout_seed = dropout_seed
        self.output_fn = output_fn
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

        def cast(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.detach().to(dtype)
            return t.detach()

        self.params: Params = {n: cast(state[n]) for n in self.names}
        self.others: dict[str, Tensor] = {
            n: cast(t) for n, t in state.items() if n not in self.params
        }
        groups: dict[str, list[str]] = {}
        for n in self.names:
            groups.setdefault(layer_of(n), []).append(n)
        self.groups = {k: tuple(v) for k, v in groups.items()}
        stochastic = any(
            isinstance(m, _BATCH_NORMS + _DROPOUTS) for m in module.modules()
        )
        # A batch norm without running statistics uses batch statistics in eval mode too.
        stats_free = any(
            isinstance(m, _BATCH_NORMS) and not m.track_running_stats
            for m in module.modules()
        )
        self.batch_coupled = (mode == "train" and stochastic) or stats_free
        first = self.params[self.names[0]]
        self.device = first.device
        self.param_dtype = first.dtype

    # ---- sizes and flat vectors -------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        """Number of entries of each selected parameter."""
        return {n: p.numel() for n, p in self.params.items()}

    @property
    def num_params(self) -> int:
        """P, the number of selected scalar parameters."""
        return sum(self.sizes.values())

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate a dict over the selected names into a flat ``(P,)`` vector."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(
                f"expected entries for every selected parameter, missing {missing[:5]}"
            )
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vector: Tensor) -> Params:
        """Split a flat ``(P,)`` (or ``(P, K)``) tensor into a dict of parameter shapes."""
        out, start = {}, 0
        for n in self.names:
            p = self.params[n]
            stop = start + p.numel()
            out[n] = vector[start:stop].reshape(*p.shape, *vector.shape[1:])
            start = stop
        return out

    def param_weights(self, weights: Weights) -> dict[str, float]:
        """Resolve a per-layer weighting to one scalar per selected parameter.

        Args:
            weights: ``None`` (all 1), a float, a dict whose keys are layer names,
                parameter names or globs (the first match in dict order wins;
                unmatched parameters get 1), or a callable ``name -> float``.

        Returns:
            Parameter name -> weight.

        Raises:
            ValueError: A weight is negative or not finite, or a dict key matches nothing.
        """
        if weights is None:
            resolved = {n: 1.0 for n in self.names}
        elif isinstance(weights, (int, float)):
            resolved = {n: float(weights) for n in self.names}
        elif isinstance(weights, Mapping):
            resolved = {}
            for n in self.names:
                keys = [
                    k
                    for k in weights
                    if k in (n, layer_of(n)) or fnmatch.fnmatchcase(n, k)
                ]
                resolved[n] = float(weights[keys[0]]) if keys else 1.0
            unused = [
                k
                for k in weights
                if not any(
                    k in (n, layer_of(n)) or fnmatch.fnmatchcase(n, k)
                    for n in self.names
                )
            ]
            if unused:
                raise ValueError(
                    f"weights keys {unused} match no selected parameter or layer; "
                    f"layers are {list(self.groups)[:8]}"
                )
        elif callable(weights):
            resolved = {n: float(weights(n)) for n in self.names}
        else:
            raise TypeError(
                f"expected weights as None, float, dict or callable, got {weights!r}"
            )
        bad = {n: w for n, w in resolved.items() if not (w >= 0 and w < float("inf"))}
        if bad:
            raise ValueError(f"expected finite non-negative weights, got {bad}")
        return resolved

    # ---- evaluation ---------------------------------------------------------------
    @contextlib.contextmanager
    def _mode_context(self) -> Iterator[None]:
        saved = [(m, m.training) for m in self.module.modules()]
        tracked = [
            (m, m.track_running_stats)
            for m in self.module.modules()
            if isinstance(m, _BATCH_NORMS)
        ]
        try:
            self.module.train(self.mode == "train")
            if self.mode == "train":
                for m, _ in tracked:
                    m.track_running_stats = False
            if self.mode == "train" and self.batch_coupled:
                with torch.random.fork_rng(
                    devices=[self.device] if self.device.type == "cuda" else []
                ):
                    torch.manual_seed(self.dropout_seed)
                    yield
            else:
                yield
        finally:
            for m, flag in saved:
                m.training = flag
            for m, flag in tracked:
                m.track_running_stats = flag

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Evaluate the model on a batch.

        Args:
            params: Selected parameters by name (any subset overrides; others as held).
            x: Input batch ``(N, ...)``; floating inputs are cast to the parameters' dtype.

        Returns:
            Outputs flattened to ``(N, O)``.
        """
        if x.is_floating_point() and x.dtype != self.param_dtype:
            x = x.to(self.param_dtype)
        with self._mode_context():
            out = functional_call(self.module, (dict(params), self.others), (x,))
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"expected the model to return a tensor, got {type(out).__name__}; pass "
                "output_fn= to pick the tensor (e.g. lambda out: out.logits)"
            )
        return out.reshape(out.shape[0], -1)

    def single(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Evaluate on one sample ``x`` (no batch axis); returns ``(O,)``."""
        return self(params, x.unsqueeze(0))[0]

    def cast_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate a batch; move it to the parameters' device (and dtype, if floating)."""
        check_tensor(x, name)
        if x.is_floating_point():
            return x.to(device=self.device, dtype=self.param_dtype)
        return x.to(self.device)


def functionalize(
    model: nn.Module | FunctionalModel,
    params: ParamSelector = None,
    *,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | None = None,
    dropout_seed: int = 0,
    output_fn: Callable[[object], Tensor] | None = None,
) -> FunctionalModel:
    """Build the functional view of ``model`` over the selected parameters.

    Args:
        model: An ``nn.Module`` (or a ``FunctionalModel``, returned unchanged).
        params: Parameter selector (see :func:`select_parameters`); default every
            parameter with ``requires_grad=True``.
        exclude: Selector of parameters to leave out.
        mode: ``"eval"`` (dropout off, batch norm running statistics) or ``"train"``
            (batch statistics, fixed-seed dropout; see :class:`FunctionalModel`).
        dtype: Cast parameters, buffers and floating inputs to this dtype
            (e.g. ``torch.float64``); default keeps the model's dtype.
        dropout_seed: Seed of the dropout masks in train mode.
        output_fn: Maps the module's raw output to a tensor (e.g. ``lambda o: o.logits``).

    Returns:
        The :class:`FunctionalModel`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> fm = functionalize(net, params="2.*")
        >>> fm.names, fm.num_params
        (('2.weight', '2.bias'), 10)
        >>> torch.allclose(fm(fm.params, torch.ones(5, 3)), net(torch.ones(5, 3)))
        True
    """
    if isinstance(model, FunctionalModel):
        return model
    names = select_parameters(model, params, exclude)
    return FunctionalModel(
        model,
        names,
        mode=mode,
        dtype=dtype,
        dropout_seed=dropout_seed,
        output_fn=output_fn,
    )
