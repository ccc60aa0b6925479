"""Built-in model families whose width is one knob.

Every family is an ``nn.Module`` with

* ``width``: the width ``n`` (hidden units, channels, ``d_model``),
* ``roles``: module name -> ``"readin"`` | ``"hidden"`` | ``"readout"``,
* ``sample_inputs(n, generator) -> Tensor`` and ``output_dim``,
* residual families (``resmlp``, ``transformer``): ``branches``, the
  :class:`~rdiag.parametrization.Branches` the depth rule scales,

and is built with plain ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` layers, so
:func:`rdiag.parametrization.apply_parametrization` gives each layer its forward
multiplier and role (one :class:`~rdiag.parametrization.LayerScale` hook per
layer). Residual branches are unscaled in the bare model: the branch multiplier
is the parametrization's depth rule.
Pass ``parametrization=`` to :func:`make_model` to build and parametrize in
one call; the return value is then what ``apply_parametrization``
returns (a :class:`~rdiag.parametrization.Centered` wrapper for centered ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._checks import check_choice, check_positive_int
from rdiag._tiling import available_memory, check_fits
from rdiag.parametrization import Branches, Parametrization, apply_parametrization

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "sin": torch.sin,
    "linear": lambda x: x,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[check_choice(name, "activation", tuple(ACTIVATIONS))]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive_int(value, name)


def _gaussian(
    n: int, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    return torch.randn(n, *shape, generator=generator)


def _dense_readin(
    model: nn.Module, width: int, d_in: int, d_out: int, activation: str, bias: bool
) -> None:
    """Sizes, activation and read-in ``d_in -> width`` of a dense family (its first module)."""
    model.width, model.d_in, model.output_dim = width, d_in, d_out
    model.act = _activation(activation)
    model.readin = nn.Linear(d_in, width, bias=bias)
    model.roles = {"readin": "readin", "readout": "readout"}


class MLP(nn.Module):
    """Fully connected network: read-in ``d_in -> width``, hidden ``width -> width``, read-out ``width -> d_out``.

    Layers: ``readin`` (read-in), ``hidden.0 ... hidden.{depth-3}``, ``readout``;
    ``depth`` counts weight layers (>= 2). Input ``(N, d_in)``, output ``(N, d_out)``.

    Args:
        width: Hidden width ``n``.
        d_in: Input dimension.
        d_out: Output dimension.
        depth: Number of weight layers (>= 2).
        activation: One of :data:`ACTIVATIONS`.
        bias: Whether layers have biases.
    """

    def __init__(
        self,
        width: int,
        *,
        d_in: int = 8,
        d_out: int = 1,
        depth: int = 3,
        activation: str = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(width=width, d_in=d_in, d_out=d_out, depth=depth)
        if depth < 2:
            raise ValueError(f"expected depth >= 2 (read-in and read-out), got {depth}")
        _dense_readin(self, width, d_in, d_out, activation, bias)
        self.hidden = nn.ModuleList(
            nn.Linear(width, width, bias=bias) for _ in range(depth - 2)
        )
        self.readout = nn.Linear(width, d_out, bias=bias)
        self.roles.update({f"hidden.{i}": "hidden" for i in range(depth - 2)})

    def forward(self, x: Tensor) -> Tensor:
        """``(N, d_in) -> (N, d_out)``."""
        h = self.readin(x)
        for layer in self.hidden:
            h = layer(self.act(h))
        return self.readout(self.act(h))

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` standard Gaussian inputs ``(n, d_in)``."""
        return _gaussian(n, (self.d_in,), generator)


class ResidualBlock(nn.Module):
    """One residual block ``h + linear(act(h))`` of :class:`ResMLP` (``(N, n) -> (N, n)``)."""

    def __init__(self, width: int, act: Callable[[Tensor], Tensor], bias: bool) -> None:
        super().__init__()
        self.act = act
        self.linear = nn.Linear(width, width, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        """``(N, n) -> (N, n)``."""
        return h + self.linear(self.act(h))


class ResMLP(nn.Module):
    """Residual MLP ``h_0 = readin(x)``, ``h_l = h_(l-1) + W_l act(h_(l-1))``, ``readout(act(h_L))``.

    The depth axis of the depth check: ``depth`` residual blocks ``blocks.0 ...
    blocks.{depth-1}``, each one hidden layer ``blocks.{l}.linear`` that ends its
    branch (``branches``: the depth rule puts its multiplier ``L**-alpha`` there).
    The block modules' outputs are the residual stream. Input ``(N, d_in)``,
    output ``(N, d_out)``.

    Args:
        width: Stream width ``n``.
        d_in: Input dimension.
        d_out: Output dimension.
        depth: Number of residual blocks ``L`` (>= 1).
        activation: One of :data:`ACTIVATIONS`.
        bias: Whether layers have biases.
    """

    def __init__(
        self,
        width: int,
        *,
        d_in: int = 8,
        d_out: int = 1,
        depth: int = 4,
        activation: str = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(width=width, d_in=d_in, d_out=d_out, depth=depth)
        _dense_readin(self, width, d_in, d_out, activation, bias)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, self.act, bias) for _ in range(depth)
        )
        self.readout = nn.Linear(width, d_out, bias=bias)
        self.roles.update({f"blocks.{i}.linear": "hidden" for i in range(depth)})
        names = tuple(f"blocks.{i}.linear" for i in range(depth))
        self.branches = Branches(depth, outputs=names, layers=names)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, d_in) -> (N, d_out)``."""
        h = self.readin(x)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.act(h))

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` standard Gaussian inputs ``(n, d_in)``."""
        return _gaussian(n, (self.d_in,), generator)


class CNN(nn.Module):
    """Convolutional network with channels as width, global average pool, linear read-out.

    Layers: ``readin`` (``Conv2d(in_channels, width)``), ``hidden.i``
    (``Conv2d(width, width)``, same padding), ``readout`` (``Linear(width, d_out)``
    after global average pooling, so its fan-in is ``width``). Conv fan-in is
    ``C_in * k**2``. Input ``(N, in_channels, image_size, image_size)``.

    Args:
        width: Number of channels.
        in_channels: Input channels.
        image_size: Input height and width.
        d_out: Output dimension.
        depth: Number of conv layers (>= 1); the read-out comes on top.
        kernel_size: Odd kernel size.
        activation: One of :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        width: int,
        *,
        in_channels: int = 3,
        image_size: int = 6,
        d_out: int = 1,
        depth: int = 2,
        kernel_size: int = 3,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        _check_sizes(
            width=width,
            in_channels=in_channels,
            image_size=image_size,
            d_out=d_out,
            depth=depth,
        )
        if kernel_size % 2 != 1:
            raise ValueError(f"expected an odd kernel_size, got {kernel_size}")
        self.width, self.output_dim = width, d_out
        self.input_shape = (in_channels, image_size, image_size)
        self.act = _activation(activation)
        pad = kernel_size // 2
        self.readin = nn.Conv2d(in_channels, width, kernel_size, padding=pad)
        self.hidden = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size, padding=pad) for _ in range(depth - 1)
        )
        self.readout = nn.Linear(width, d_out)
        self.roles = {"readin": "readin", "readout": "readout"}
        self.roles.update({f"hidden.{i}": "hidden" for i in range(depth - 1)})

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, d_out)``."""
        h = self.readin(x)
        for layer in self.hidden:
            h = layer(self.act(h))
        return self.readout(self.act(h).mean(dim=(2, 3)))

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` standard Gaussian images ``(n, C, H, W)``."""
        return _gaussian(n, self.input_shape, generator)


class Block(nn.Module):
    """Pre-norm transformer block ``x + proj(attn(norm1 x))``, then ``+ fc2(gelu(fc1(norm2 x)))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor, scale: float) -> Tensor:
        """``(N, T, width) -> (N, T, width)`` with causal attention logits x ``scale``."""
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads)
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """Small causal transformer with ``d_model`` as width and a fixed number of heads.

    Layers: ``embed`` and ``pos`` (read-in embeddings, fan-in 1), per block ``qkv``,
    ``proj``, ``fc1``, ``fc2`` (hidden), ``unembed`` (read-out, fan-in ``d_model``).
    ``d_head = width / heads`` grows with width; logits are scaled by
    ``d_head**-attention_exponent`` (set by the parameterization: 1/2 standard, 1
    for muP) through ``F.scaled_dot_product_attention(scale=...)``; the two
    branches of every block end in ``proj`` and ``fc2`` (``branches``: the depth
    rule's multiplier, ``1/sqrt(depth)`` by default). Input token ids ``(N, seq_len)``, output
    ``(N, seq_len, d_out)`` (``d_out`` defaults to ``vocab``).

    Args:
        width: ``d_model`` (a multiple of ``heads``).
        vocab: Vocabulary size.
        seq_len: Sequence length.
        depth: Number of blocks.
        heads: Number of heads (fixed across widths).
        mlp_ratio: MLP hidden size / ``d_model``.
        d_out: Output dimension per token.
    """

    def __init__(
        self,
        width: int,
        *,
        vocab: int = 16,
        seq_len: int = 6,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: int = 2,
        d_out: int | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(
            width=width,
            vocab=vocab,
            seq_len=seq_len,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        if width % heads:
            raise ValueError(
                f"expected width to be a multiple of heads={heads}, got {width}"
            )
        self.width, self.vocab, self.seq_len = width, vocab, seq_len
        self.output_dim = seq_len * (d_out or vocab)
        self.heads, self.attention_exponent = heads, 0.5
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, d_out or vocab)
        self.roles = {"embed": "readin", "pos": "readin", "unembed": "readout"}
        for i in range(depth):
            self.roles.update(
                {f"blocks.{i}.{n}": "hidden" for n in ("qkv", "proj", "fc1", "fc2")}
            )
        self.branches = Branches(
            depth,
            outputs=tuple(
                f"blocks.{i}.{n}" for i in range(depth) for n in ("proj", "fc2")
            ),
            layers=tuple(
                f"blocks.{i}.{n}"
                for i in range(depth)
                for n in ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")
            ),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """``(N, T) -> (N, T, d_out)``."""
        # Positions per sample (N, T): every module sees the batch axis, so the
        # structured eNTK captures the positional embedding like any other.
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(
            tokens
        )
        x = self.embed(tokens) + self.pos(positions)
        scale = (self.width // self.heads) ** -self.attention_exponent
        for block in self.blocks:
            x = block(x, scale)
        return self.unembed(self.norm(x))

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` uniform random token sequences ``(n, seq_len)``."""
        return torch.randint(0, self.vocab, (n, self.seq_len), generator=generator)


class RMSBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm without mean subtraction or affine parameters: ``x / rms_batch(x)``.

    In train mode each feature (axis 1) is divided by its root-mean-square over the
    batch (axis 0), so the output depends on the whole batch (docs/theory.md section 5)
    and the running mean square (``running_var``; ``running_mean`` stays 0) is
    updated; in eval mode the running mean square is used instead. A subclass of
    PyTorch's ``_BatchNorm``, so rdiag's functional view treats it as batch norm
    (``mode="train"``: a function of the whole batch; ``"eval"``: running statistics).

    Args:
        num_features: Number of features ``F``.
        eps: Added to the mean square.
        momentum: Running-statistics momentum.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-12, momentum: float = 0.1
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine=False, track_running_stats=True
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected a (N, F) input, got shape {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``(N, F) -> (N, F)``."""
        self._check_input_dim(x)
        if self.training or not self.track_running_stats:
            mean_square = x.pow(2).mean(0)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.running_var.lerp_(mean_square.detach(), self.momentum)
                    self.num_batches_tracked += 1
        else:
            mean_square = self.running_var
        return x * torch.rsqrt(mean_square + self.eps)


class BNMLP(nn.Module):
    """Batch-normalized MLP (Meterez et al., arXiv 2310.02012): ``H_l = act(l**-alpha * BN(H_{l-1} W_l^T))``.

    Bias-free layers ``readin`` (``d_in -> width``), ``hidden.0 ...`` (``width ->
    width``; ``hidden.0`` is ``W_2``) and a linear ``readout`` (``width -> d_out``,
    no BN). Weights are Haar orthogonal (``init="orthogonal"``) or Gaussian with
    variance ``1/fan_in`` (``"gaussian"``); the read-out is Gaussian ``1/width``.
    ``activation="linear"`` with ``alpha=0`` is the paper's linear network; ``alpha
    ~ 0.4`` is activation shaping. A function of the whole batch: use
    ``mode="train"`` semantics for the paper's network (eval mode uses the running
    mean squares of :class:`RMSBatchNorm`, a different function).

    Args:
        width: Width ``n``.
        depth: Number of BN layers (``>= 2``).
        d_in: Input dimension.
        d_out: Output dimension.
        activation: One of :data:`ACTIVATIONS`.
        alpha: Shaping exponent ``>= 0``.
        init: ``"orthogonal"`` or ``"gaussian"``.
    """

    def __init__(
        self,
        width: int,
        *,
        depth: int = 5,
        d_in: int | None = None,
        d_out: int = 1,
        activation: str = "linear",
        alpha: float = 0.0,
        init: str = "orthogonal",
    ) -> None:
        super().__init__()
        d_in = d_in or width
        _check_sizes(width=width, depth=depth, d_in=d_in, d_out=d_out)
        if depth < 2:
            raise ValueError(f"expected depth >= 2, got {depth}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(
                f"expected alpha to be a finite number >= 0, got {alpha!r}"
            )
        check_choice(init, "init", ("orthogonal", "gaussian"))
        self.width, self.d_in, self.output_dim = width, d_in, d_out
        self.act, self.alpha = _activation(activation), float(alpha)
        self.readin = nn.Linear(d_in, width, bias=False)
        self.hidden = nn.ModuleList(
            nn.Linear(width, width, bias=False) for _ in range(depth - 1)
        )
        self.readout = nn.Linear(width, d_out, bias=False)
        self.norms = nn.ModuleList(RMSBatchNorm(width) for _ in range(depth))
        self.roles = {"readin": "readin", "readout": "readout"}
        self.roles.update({f"hidden.{i}": "hidden" for i in range(depth - 1)})
        with torch.no_grad():
            for layer in (self.readin, *self.hidden):
                if init == "orthogonal":
                    nn.init.orthogonal_(layer.weight)
                else:
                    layer.weight.normal_(0.0, layer.in_features**-0.5)
            self.readout.weight.normal_(0.0, width**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, d_in) -> (N, d_out)``; needs ``N <= width`` and independent inputs."""
        h = x
        layers = (self.readin, *self.hidden)
        for ell, (layer, norm) in enumerate(zip(layers, self.norms), start=1):
            h = self.act(ell**-self.alpha * norm(layer(h)))
        return self.readout(h)

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` standard Gaussian inputs ``(n, d_in)``."""
        return _gaussian(n, (self.d_in,), generator)


FAMILIES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resmlp": ResMLP,
    "cnn": CNN,
    "transformer": Transformer,
    "bn_mlp": BNMLP,
}


def make_model(
    family: str,
    width: int,
    *,
    parametrization: Parametrization | str | None = None,
    seed: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a built-in family at a width, optionally parametrized.

    Args:
        family: A key of :data:`FAMILIES` (``"mlp"``, ``"resmlp"``, ``"cnn"``,
            ``"transformer"``, ``"bn_mlp"``).
        width: The width knob.
        parametrization: Applied with :func:`apply_parametrization` if given.
        seed: Seeds the global torch RNG before building (reproducible init).
        **kwargs: Family constructor arguments (see each class).

    Returns:
        The model (a ``Centered`` wrapper for centered parameterizations).

    Raises:
        ValueError: Unknown family or bad constructor arguments.
        MemoryError: The parameters would not fit in the free memory (checked on
            the meta device before anything is allocated; the message gives the
            size).
    """
    check_choice(family, "family", tuple(FAMILIES))
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        shell = FAMILIES[family](width, **kwargs)
    check_fits(
        sum(p.numel() * p.element_size() for p in shell.parameters()),
        available_memory(torch.device("cpu")),
        f"make_model({family!r}, {width})'s parameters",
        "use a smaller width or depth",
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = FAMILIES[family](width, **kwargs)
    if parametrization is not None:
        model = apply_parametrization(model, parametrization)
    return model
