"""What the Lightning callback costs: overhead as a fraction of training time.

One group, ratios from one run: a Lightning fit of a small GPT-2 (2 layers,
d_model 32, 4 heads, vocabulary 32, 16 tokens; 27 k parameters) with AdamW,
batch 8, 120 optimizer steps, on the CPU, three ways, interleaved:

* ``none``: no callback (the baseline);
* ``callback``: ``RdiagMonitor(every=10, budget_fraction=None)``: every scheduled
  check runs (the Monitor's default metrics on an 8-sequence probe: eNTK,
  features, representations, weights, sharpness with Adam's preconditioner, loss);
* ``callback + budget``: the default budget (10% of training time): scheduled
  checks are skipped while diagnostics exceed it.

Overhead = (fit time - baseline fit time) / baseline fit time, median over the
rounds, after one untimed warm-up fit; the callback's own accounting
(``RdiagMonitor.cost``) is recorded too. The first check always runs, so with the
budget the overhead is the first check plus at most the budget's share.

Run: ``pytest bench/bench_callbacks.py --benchmark-only`` (or ``python -m
bench.bench_callbacks`` for a printout).
"""

from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from rdiag.integrations.lightning import RdiagMonitor  # noqa: E402

VOCAB, T, STEPS, EVERY, ROUNDS, PROBE = 32, 16, 120, 10, 1, 8


class GPT2Module(L.LightningModule):
    """A small GPT-2 language model; the loss is the model's own (shifted labels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=T,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data():
    ids = torch.randint(
        VOCAB, (8 * STEPS, T), generator=torch.Generator().manual_seed(1)
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids), batch_size=8
    )
    probe = ids[:PROBE]
    targets = torch.cat([probe[:, 1:], torch.full((PROBE, 1), -100)], dim=1)
    return loader, (probe, targets)


def _fit(callback: RdiagMonitor | None) -> float:
    loader, _ = _data()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if callback is None else [callback],
    )
    tic = time.perf_counter()
    trainer.fit(GPT2Module(), loader)
    return time.perf_counter() - tic


def _callback(budget: float | None) -> RdiagMonitor:
    _, probe = _data()
    return RdiagMonitor(
        probe,
        every=EVERY,
        budget_fraction=budget,
        loss_fn=torch.nn.functional.cross_entropy,
    )


def measure() -> dict[str, float]:
    """Interleaved fits; median fit times, overheads and the callbacks' own costs."""
    times: dict[str, list[float]] = {"none": [], "callback": [], "budget": []}
    costs: dict[str, list] = {"callback": [], "budget": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(None)  # first-use costs of torch, Lightning and GPT-2, untimed
        for _ in range(ROUNDS):
            times["none"].append(_fit(None))
            for key, budget in (("callback", None), ("budget", 0.1)):
                cb = _callback(budget)
                times[key].append(_fit(cb))
                costs[key].append(cb.cost)
    base = statistics.median(times["none"])
    out = {"fit_s_none": base}
    for key in ("callback", "budget"):
        t = statistics.median(times[key])
        cost = costs[key][-1]
        out[f"fit_s_{key}"] = t
        out[f"overhead_{key}"] = (t - base) / base
        out[f"checks_{key}"] = cost.checks
        out[f"skipped_{key}"] = cost.skipped
        out[f"own_fraction_{key}"] = cost.fraction
    return out


def test_lightning_gpt2_callback_overhead(benchmark) -> None:
    result = measure()
    benchmark.group = f"lightning GPT-2 fit, every={EVERY}"
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["overhead_budget"] < result["overhead_callback"]


if __name__ == "__main__":
    for key, value in measure().items():
        print(f"{key}: {value:.4g}")
