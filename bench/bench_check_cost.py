"""What a Monitor check costs, in training steps, per metric unit (issue #23).

For each model, in one process: the median time of a training step (SGD with
momentum, the probe batch as the training batch), then a Monitor with the
default metrics (eNTK, features, representations, weights, sharpness, loss;
``budget_fraction=None``) checked at step 0 and after ``every`` training steps,
twice. Reported per unit (``Monitor.cost()``): one-time planning, the first
check and the mean later check, in training steps; the sharpness products per
check (cold, warm) and their overhead over bare Hessian-vector products (the
unit's seconds over ``products x`` one bare ``HessianOperator.matvec`` timed in
the same run); and, as the baseline of the same run, the previous ``weights``
(float64 Lanczos spectral norms at tol 1e-9, cold: ``metrics.matrix_norms``).

Models: the MLP 784-512-512-10 (N = 64), a ResNet-18 (``bench.models.ResNet18``,
32 x 32, train-mode batch norm, probe = batch = 32) and a GPT-2 from a small
config (sdpa attention).

Run: ``python -m bench.bench_check_cost [--models mlp,gpt2,resnet] [--every 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.models import ResNet18
from rdiag import metrics as M
from rdiag.monitor import Monitor
from rdiag.operators.hessian import HessianOperator


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _case(name: str, width: int):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )  # fmt: skip
        return model, torch.randn(64, 784), torch.randint(0, 10, (64,)), "eval"
    if name == "resnet":
        model = ResNet18(width=width)
        return model, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)), "train"
    import transformers

    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    ids = torch.randint(0, 64, (8, 16))
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids}, ids, "eval"


def _forward(model: nn.Module, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def measure(name: str, every: int, width: int) -> dict:
    """One model's table row (see the module)."""
    model, x, y, mode = _case(name, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        model.train()
        opt.zero_grad()
        _ce(_forward(model, x), y).backward()
        opt.step()

    times: list[float] = []

    def timed_step() -> None:
        tic = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - tic)

    for _ in range(2):
        train_step()
    mon = Monitor(model, (x, y), loss_fn=_ce, mode=mode, optimizer=None)
    products = []
    for check in range(3):
        rec = mon.step(check * every, force=True)
        products.append(int(rec.get("sharpness/raw_matvecs", 0)))
        for _ in range(every):
            timed_step()
    # The step time of the same stretch of the run as the checks (a shared
    # machine's load changes within minutes).
    step = statistics.median(times)
    cost = mon.cost()
    # Bare products on the same probe, after a warm-up product.
    op = HessianOperator(model, _ce, (x, y), mode=mode)
    v = torch.randn(op.shape[0])
    op.matvec(v)
    tic = time.perf_counter()
    for _ in range(3):
        op.matvec(v)
    bare = (time.perf_counter() - tic) / 3
    # The previous weights metric: float64 Lanczos at 1e-9, cold, W and W - W0.
    weights = mon.weights()
    tic = time.perf_counter()
    for w in weights.values():
        w = w.detach().double()
        M.matrix_norms(w)
        M.matrix_norms(w - 0.99 * w)
    before_weights = time.perf_counter() - tic
    later = cost.per_check
    sharp_later = later.get("sharpness", float("nan"))
    cheap = sum(later.get(u, 0.0) for u in ("features", "representations", "weights"))
    cheap += later.get("forward", 0.0)
    return {
        "model": name,
        "step_ms": 1e3 * step,
        "planning": {k: v / step for k, v in cost.planning.items()},
        "first": {k: v / step for k, v in cost.first.items()},
        "later": {k: v / step for k, v in later.items()},
        "first_total": sum(cost.first.values()) / step,
        "later_total": sum(later.values()) / step,
        "planning_total": sum(cost.planning.values()) / step,
        "cheap_later": cheap / step,
        "products": products,
        "hvp_steps": bare / step,
        "sharpness_overhead": sharp_later
        / (bare * max(statistics.mean(products[1:]), 1)),
        "weights_before": before_weights / step,
        "weights_after": later.get("weights", float("nan")) / step,
    }


def _fmt(units: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in units.items())


def main() -> None:
    """Print the table of :func:`measure` for the chosen models."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,gpt2,resnet")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        r = measure(name, args.every, args.width)
        print(
            f"\n## {r['model']}: one training step {r['step_ms']:.1f} ms\n"
            f"- check, in training steps: planning {r['planning_total']:.1f}, first "
            f"{r['first_total']:.1f}, later {r['later_total']:.1f}\n"
            f"- features + representations + weights (+ shared forward), later: "
            f"{r['cheap_later']:.2f}\n"
            f"- planning per unit: {_fmt(r['planning'])}\n"
            f"- first per unit: {_fmt(r['first'])}\n"
            f"- later per unit: {_fmt(r['later'])}\n"
            f"- sharpness products per check (cold, warm, warm): {r['products']}; one "
            f"bare HVP = {r['hvp_steps']:.2f} steps; later sharpness / (products x "
            f"bare HVP) = {r['sharpness_overhead']:.2f}\n"
            f"- weights: before (float64, tol 1e-9, cold) {r['weights_before']:.2f} "
            f"steps, after {r['weights_after']:.2f}"
        )


if __name__ == "__main__":
    main()
