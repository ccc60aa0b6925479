"""The test model zoo: small architectures with the layers rdiag must handle.

Each builder takes a seed and returns ``(model, make_input)``, where
``make_input(n, seed)`` draws a batch of ``n`` inputs for that model. The
factories at the end take a width, as the richness meter's ``make_model`` (named
on the command line in tests/test_cli.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag.meter import LRRule

Builder = Callable[[int], tuple[nn.Module, Callable[[int, int], Tensor]]]


def _normal(*shape: int) -> Callable[[int, int], Tensor]:
    def make(n: int, seed: int) -> Tensor:
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))

    return make


def mlp(activation: type[nn.Module]) -> Builder:
    def build(seed: int):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(5, 7),
            activation(),
            nn.Linear(7, 6),
            activation(),
            nn.Linear(6, 3),
        )
        return net, _normal(5)

    return build


def cnn(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    return net, _normal(2, 6, 6)


def layernorm(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.normal_(1.0, 0.3)
        net[1].bias.normal_(0.0, 0.3)
    return net, _normal(5)


def batchnorm(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].running_mean.normal_(0.0, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.normal_(1.0, 0.3)
        net[1].bias.normal_(0.0, 0.3)
    return net, _normal(5)


class Attention(nn.Module):
    """One pre-norm self-attention block with fused SDPA, then a per-token readout."""

    def __init__(self, dim: int = 6, heads: int = 2, out: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.readout = nn.Linear(dim, out)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        )
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return self.readout(x)


def attention(seed: int):
    torch.manual_seed(seed)
    return Attention(), _normal(4, 6)


class EmbedLinear(nn.Module):
    """Token embedding, mean over positions, tanh, linear readout."""

    def __init__(self, vocab: int = 11, dim: int = 6, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.readout = nn.Linear(dim, out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.readout(torch.tanh(self.hidden(self.embed(tokens)).mean(1)))


def embedding(seed: int):
    torch.manual_seed(seed)

    def make(n: int, s: int) -> Tensor:
        return torch.randint(0, 11, (n, 4), generator=torch.Generator().manual_seed(s))

    return EmbedLinear(), make


ZOO: dict[str, Builder] = {
    "mlp_tanh": mlp(nn.Tanh),
    "mlp_relu": mlp(nn.ReLU),
    "mlp_gelu": mlp(nn.GELU),
    "cnn": cnn,
    "layernorm": layernorm,
    "batchnorm": batchnorm,
    "attention": attention,
    "embedding": embedding,
}


class MuTransformer(nn.Module):
    """A causal transformer written in muP by hand, the way the mup package reads.

    No rdiag parametrization: embeddings N(0, 1) (width-independent), hidden
    matrices N(0, 1/width), the read-out N(0, 1/width^2) (the table gauge's
    ``1/(n sqrt(n))`` at r = 1/2), attention logits scaled by ``1/d_head``, pre-norm
    blocks with ``1/sqrt(depth)`` branches. Train it with :func:`mu_adam`.
    Input token ids ``(N, T)``, output logits ``(N, T, vocab)``.
    """

    def __init__(
        self, width: int, *, vocab: int = 16, seq_len: int = 6, depth: int = 2
    ) -> None:
        super().__init__()
        self.heads, self.branch = 2, depth**-0.5
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "proj": nn.Linear(width, width),
                    "norm2": nn.LayerNorm(width),
                    "fc1": nn.Linear(width, 2 * width),
                    "fc2": nn.Linear(2 * width, width),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, vocab)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
                    module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, 1.0)
            self.unembed.weight.normal_(0.0, 1.0 / width)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(N, T) -> (N, T, vocab)``."""
        n, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand_as(tokens)
        x = self.embed(tokens) + self.pos(positions)
        d = x.shape[-1]
        for b in self.blocks:
            q, k, v = b["qkv"](b["norm1"](x)).view(n, t, 3, self.heads, -1).unbind(2)
            a = F.scaled_dot_product_attention(
                *(z.transpose(1, 2) for z in (q, k, v)),
                is_causal=True,
                scale=self.heads / d,  # 1 / d_head
            )
            x = x + self.branch * b["proj"](a.transpose(1, 2).reshape(n, t, d))
            x = x + self.branch * b["fc2"](F.gelu(b["fc1"](b["norm2"](x))))
        return self.unembed(self.norm(x))


def mu_adam(model: MuTransformer, lr: float, base: int = 16) -> torch.optim.Adam:
    """muP Adam: hidden and read-out matrices at ``lr * base / width``, the rest ``lr``."""
    width = model.embed.embedding_dim
    scaled = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear)  # every matrix with a width-sized fan-in
    ]
    rest = [p for p in model.parameters() if all(p is not q for q in scaled)]
    return torch.optim.Adam(
        [{"params": scaled, "lr": lr * base / width}, {"params": rest, "lr": lr}]
    )


# ---- factories by name, for `rdiag meter --factory tests.models:...` ----------------
def meter_mlp(width: int) -> nn.Sequential:
    """``3 -> width -> width -> 2`` tanh MLP in PyTorch's init (no ``sample_inputs``)."""
    return nn.Sequential(
        nn.Linear(3, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 2),
    )


def meter_batch() -> tuple[Tensor, Tensor]:
    """The fixed training batch of :func:`meter_mlp`: 8 inputs, 2 targets each."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)


#: One SGD rate per role of :func:`meter_mlp` (muP-like: read-out rate ~ 1/n).
METER_RULE = LRRule(0.1, {"readout": -1.0}, base_width=16)
