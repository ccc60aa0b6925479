"""A model as a pure function ``f(params, x)`` of a selected set of its parameters.

Every diagnostic in rdiag starts here: :func:`functionalize` turns an ``nn.Module``
into a :class:`FunctionalModel`: the *structure* of the computation (which
parameters are selected and how they group into layers, the mode, the dtype
policy, the output adapter). Values are read live from the module, so the view
never goes stale when the model trains.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rdiag._checks import check_choice, check_dtype, check_module
from rdiag._inputs import Inputs, check_inputs, describe, tree_map
from rdiag._optional import Notices
from rdiag._typing import Params, ParamSelector, LRMultipliers

Mode = Literal["eval", "train"]
_T = TypeVar("_T")

#: The selection keywords, described once for every entry point that takes them
#: (:func:`document_selection` appends this section to their docstrings).
SELECTION = ("params", "exclude", "mode", "dtype", "output_fn")
SELECTION_DOC = """
Selection keywords:
    params: Parameter selector: a glob, a list of names or globs, a module type,
        or a predicate ``(name, parameter) -> bool``; default every parameter
        with ``requires_grad=True``.
    exclude: Selector of parameters to leave out (same forms as ``params``).
    mode: ``"eval"`` (default: dropout off, batch norm running statistics) or
        ``"train"`` (batch statistics, fixed-seed dropout; a batch-norm model is
        then a function of the whole batch).
    dtype: Compute in this dtype (e.g. ``torch.float64``); default the model's,
        except that half-precision (bf16/fp16) models compute and accumulate in
        float32 (eNTKs and curvature products; ``dtype=torch.bfloat16`` keeps the
        model's own).
    output_fn: Picks the output tensor from a non-tensor model output (default: a
        tensor as is, a ``ModelOutput``'s ``logits``).

They build the functional view (:func:`rdiag.functionalize`), with the same
names, defaults and meaning on every entry point. A prepared
:class:`~rdiag.functional.FunctionalModel` is accepted wherever a model is; it
already fixes these, so passing a different value with it is an error.
"""
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

    The view holds *structure* only: the selected names and their per-layer
    groups, the mode, the dtype policy and the output adapter. Parameter and buffer
    *values* are read live from the module at every access (or passed in
    explicitly), so a view, and anything built on it, stays valid across optimizer
    steps: it never holds a copy that can go stale.

    The output of the wrapped module, of shape ``(N, *out)``, is flattened to
    ``(N, O)`` with ``O = prod(out)`` (e.g. a language model's ``(N, T, V)`` becomes
    ``O = T * V``). Inputs are a tensor, a tuple of tensors (``forward(*x)``) or a
    dict of tensors (``forward(**x)``, e.g. ``input_ids`` and ``attention_mask``);
    axis 0 of every tensor is the sample axis.

    Modes:
        ``"eval"`` (default): every module in eval mode: dropout off, batch norm uses
        its running statistics; the function acts on each sample separately.
        ``"train"``: every module in train mode: batch norm uses the statistics of
        the batch passed in (its running statistics are not updated) and dropout is
        active with a mask fixed by ``dropout_seed`` (the global RNG state is
        restored afterwards), so repeated evaluations see the same function. If the
        model has batch norm or dropout, the function is then one of the whole batch
        (``batch_coupled``): ``R^{N x d} -> R^{N x O}``.

    Outputs: ``output_fn`` maps the module's raw output to a tensor; without it a
    tensor is taken as is and a mapping or Hugging Face ``ModelOutput`` with a
    ``logits`` entry gives its logits (said once).

    Attributes:
        module: The wrapped module (never modified; its mode is restored after calls).
        names: Selected parameter names, ``named_parameters()`` order.
        shapes: Name -> shape of each selected parameter.
        groups: Layer name -> names of its selected parameters.
        mode: ``"eval"`` or ``"train"``.
        dtype: The requested compute dtype, or ``None`` (the model's own).
        batch_coupled: Whether outputs depend on other samples of the batch.
        skipped_modules: Modules the view's forward never enters (none here; a
            view that stops early, the read-out identity's, names them), so their
            parameter uses are not capture sites.
    """

    skipped_modules: frozenset[str] = frozenset()

    def __init__(
        self,
        module: nn.Module,
        names: Sequence[str],
        *,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        dropout_seed: int = 0,
        output_fn: Callable[[object], Tensor] | None = None,
    ) -> None:
        check_choice(mode, "mode", MODES)
        self.module = module
        self.names = tuple(names)
        self.mode = mode
        self.dtype = check_dtype(dtype)
        self.dropout_seed = dropout_seed
        if output_fn is not None and not callable(output_fn):
            raise TypeError(
                f"expected output_fn to be a callable raw output -> tensor, got "
                f"{type(output_fn).__name__}; e.g. output_fn=lambda out: out.logits"
            )
        self.output_fn = output_fn
        self.notices = Notices()
        named = dict(module.named_parameters())
        self.shapes = {n: named[n].shape for n in self.names}
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

    # ---- live values --------------------------------------------------------------
    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            return t.to(self.dtype)
        return t

    @property
    def params(self) -> Params:
        """The selected parameters now, detached (cast to ``dtype`` if one is set)."""
        named = dict(self.module.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(
                f"the model no longer has the selected parameters {missing[:5]}; "
                "build a new view (or handle) after changing the model's structure"
            )
        return {n: self._cast(named[n]) for n in self.names}

    @property
    def others(self) -> dict[str, Tensor]:
        """Every other parameter and buffer now, detached (and cast), by name."""
        selected = set(self.names)
        state = {
            **dict(self.module.named_parameters()),
            **dict(self.module.named_buffers()),
        }
        return {n: self._cast(t) for n, t in state.items() if n not in selected}

    @property
    def device(self) -> torch.device:
        """Device of the selected parameters."""
        return self.module.get_parameter(self.names[0]).device

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype computations run in: ``dtype``, or the parameters' own."""
        return self.dtype or self.module.get_parameter(self.names[0]).dtype

    # ---- sizes and flat vectors -------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        """Number of entries of each selected parameter."""
        return {n: math.prod(s) for n, s in self.shapes.items()}

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
            stop = start + math.prod(self.shapes[n])
            out[n] = vector[start:stop].reshape(*self.shapes[n], *vector.shape[1:])
            start = stop
        return out

    def param_weights(self, weights: LRMultipliers) -> dict[str, float]:
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
        elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
            resolved = {n: float(weights) for n in self.names}
        elif isinstance(weights, Mapping):
            resolved = {}
            for n in self.names:
                keys = [k for k in weights if _weight_key_matches(k, n)]
                resolved[n] = float(weights[keys[0]]) if keys else 1.0
            unused = [
                k
                for k in weights
                if not any(_weight_key_matches(k, n) for n in self.names)
            ]
            if unused:
                raise ValueError(
                    f"weights keys {unused} match no selected parameter or layer; "
                    f"layers are {list(self.groups)[:8]}"
                )
        elif isinstance(weights, (Tensor, torch.optim.Optimizer)):
            raise TypeError(
                f"expected one lr_multiplier per parameter here (None, float, dict or "
                f"callable), got a per-coordinate {type(weights).__name__}; a tensor or "
                "an optimizer is a diagonal for the curvature functions only: pass "
                "rdiag.lr_multipliers(model) (per-layer rates)"
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
                device = self.device
                with torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else []
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

    def forward(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """Evaluate the model on a batch, keeping the output's shape.

        Args:
            params: Selected parameters by name (any subset overrides; the rest are
                read from the module).
            x: Input batch (tensor, tuple or dict); floating tensors are cast to the
                computation dtype.

        Returns:
            The output tensor ``(N, *out)`` (after ``output_fn`` or the logits rule).
        """
        dtype = self.param_dtype
        x = tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, x)
        state = (dict(params), self.others)
        with self._mode_context():
            if isinstance(x, Tensor):
                out = functional_call(self.module, state, (x,))
            elif isinstance(x, Mapping):
                out = functional_call(self.module, state, (), dict(x))
            else:
                out = functional_call(self.module, state, tuple(x))
        return output_tensor(out, self.output_fn, self.notices)

    def __call__(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """Evaluate the model on a batch; returns outputs flattened to ``(N, O)``."""
        out = self.forward(params, x)
        return out.reshape(out.shape[0], -1)

    def single(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """Evaluate on one sample ``x`` (no batch axis); returns ``(O,)``."""
        return self(params, tree_map(lambda t: t.unsqueeze(0), x))[0]

    def cast_input(self, x: object, name: str = "x") -> Inputs:
        """Validate a batch; move it to the parameters' device (and dtype, if floating).

        Raises:
            TypeError: Not a tensor, tuple or dict of tensors.
            ValueError: An empty batch, mismatched sample axes or non-finite values.
        """
        x = check_inputs(x, name)
        device, dtype = self.device, self.param_dtype
        return tree_map(
            lambda t: (
                t.to(device=device, dtype=dtype)
                if t.is_floating_point()
                else t.to(device)
            ),
            x,
        )

    def probe(self, x: Inputs) -> Tensor:
        """Check the model runs on ``x`` and is differentiable in the selected parameters.

        Runs one forward pass with the selected parameters as fresh leaves.

        Args:
            x: A prepared batch (see :meth:`cast_input`).

        Returns:
            The output ``(N, *out)``, attached to the graph of those leaves.

        Raises:
            ValueError: The model fails on ``x`` (the message names the input
                shapes and the model's own error), or its output does not depend
                differentiably on the selected parameters.
        """
        leaves = {n: p.requires_grad_() for n, p in self.params.items()}
        try:
            with torch.enable_grad():
                out = self.forward(leaves, x)
        except (RuntimeError, ValueError, IndexError, AssertionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(
                f"the model failed on inputs {describe(x)}: {first}; check the input "
                "size and dtype its forward expects (token ids are integer tensors)"
            ) from err
        if not out.is_floating_point() or out.grad_fn is None:
            raise ValueError(
                f"expected the model's output to be differentiable in the selected "
                f"parameters, got a {out.dtype} output "
                f"{'without' if out.grad_fn is None else 'with'} a gradient; remove "
                "detach()/no_grad()/argmax from forward or select other parameters"
            )
        return out


def _weight_key_matches(key: str, name: str) -> bool:
    return key in (name, layer_of(name)) or fnmatch.fnmatchcase(name, key)


def output_tensor(
    out: object,
    output_fn: Callable[[object], Tensor] | None = None,
    notices: Notices | None = None,
) -> Tensor:
    """The output tensor ``(N, *out)`` of a model's raw output (the output adapter).

    Args:
        out: What the model returned.
        output_fn: Maps it to a tensor; without it a tensor is taken as is and a
            mapping or Hugging Face ``ModelOutput`` with ``logits`` gives its logits.
        notices: Owner of the one-time notice that the logits were picked.

    Returns:
        The tensor.

    Raises:
        TypeError: No tensor could be picked.
        ValueError: A scalar output (no sample axis).
    """
    if output_fn is not None:
        out = output_fn(out)
    elif not isinstance(out, Tensor):
        logits = _logits(out)
        if logits is not None:
            (notices or Notices()).say(
                "logits",
                f"rdiag: the model returns {type(out).__name__}; its 'logits' are "
                "measured (pass output_fn= to pick another tensor)",
            )
            out = logits
    if not isinstance(out, Tensor):
        raise TypeError(
            f"expected the model to return a tensor, got {type(out).__name__}; pass "
            "output_fn= to pick the tensor (e.g. lambda out: out.logits)"
        )
    if out.dim() == 0:
        raise ValueError(
            "expected the model output to have a leading sample axis, got a "
            "scalar; return one row per sample (or pick it with output_fn=)"
        )
    return out


def _logits(out: object) -> Tensor | None:
    """The ``logits`` of a mapping or Hugging Face ``ModelOutput``, if it has them."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` or ``DataParallel`` wrapper holds.

    Diagnostics run on the replica itself: through the wrapper, a forward pass
    would enter DDP's collectives (buffer broadcasts) and its gradient hooks.
    Any other module is returned as is.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantities of a model in ``dtype`` accumulate in: at least float32.

    Half-precision (bf16/fp16) parameters give float32; any other dtype is kept.
    """
    return torch.float32 if dtype in HALF_DTYPES else dtype


def document_selection(obj: _T) -> _T:
    """Append :data:`SELECTION_DOC` to ``obj``'s docstring (what ``help()`` shows).

    Every entry point that takes the selection keywords lists them in its
    signature and describes them in one line of its ``Args``; the description
    itself lives here once.
    """
    indent = " " * 4
    section = "\n".join(
        indent + line if line else line for line in SELECTION_DOC.splitlines()
    )
    obj.__doc__ = (obj.__doc__ or "").rstrip() + "\n" + section + "\n"
    return obj


def _check_prepared(
    fm: FunctionalModel,
    params: ParamSelector,
    exclude: ParamSelector,
    mode: Mode,
    dtype: torch.dtype | str | None,
    output_fn: Callable[[object], Tensor] | None,
) -> None:
    """Refuse selection keywords that a prepared view would silently ignore."""
    given = {
        "params": params is not None,
        "exclude": exclude is not None,
        "mode": mode != "eval" and mode != fm.mode,
        "dtype": dtype is not None and check_dtype(dtype) != fm.param_dtype,
        "output_fn": output_fn is not None and output_fn is not fm.output_fn,
    }
    clashing = [k for k, v in given.items() if v]
    if clashing:
        raise ValueError(
            f"got a prepared FunctionalModel together with {clashing}; the view "
            "already fixes its parameters, mode, dtype and output function: pass "
            "them to rdiag.functionalize, or pass the nn.Module instead"
        )


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
        model: An ``nn.Module`` (or a ``FunctionalModel``, returned unchanged: then
            the other selection keywords must be left at their defaults or agree
            with it); a ``DistributedDataParallel`` model is viewed through its
            ``module``.
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

    Raises:
        ValueError: A prepared view together with selection keywords that differ
            from what it fixes.

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
        _check_prepared(model, params, exclude, mode, dtype, output_fn)
        return model
    model = unwrap_parallel(model)
    names = select_parameters(model, params, exclude)
    return FunctionalModel(
        model,
        names,
        mode=mode,
        dtype=dtype,
        dropout_seed=dropout_seed,
        output_fn=output_fn,
    )


def check_per_sample(model: nn.Module, mode: Mode) -> None:
    """Refuse a model whose outputs couple the samples of a batch in ``mode``.

    Width experiments compare per-input representations and per-sample kernels,
    which a batch-coupled network (batch norm, or dropout in ``"train"`` mode) does
    not have.

    Raises:
        ValueError: The model is batch-coupled in ``mode``.
    """
    if functionalize(model, mode=mode).batch_coupled:
        raise ValueError(
            f"expected a model that acts on each sample separately, got "
            f"{type(model).__name__} with batch norm or dropout; a coordinate check "
            "compares per-input representations and per-sample kernels, which a "
            "batch-coupled network does not have; remove those layers or study it "
            "with rdiag.empirical_ntk(..., mode='train') on a fixed batch"
        )
