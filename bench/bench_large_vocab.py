"""The traced eNTK of a block shaped like GPT-2 small (V = 50257) at N * T = 64.

One transformer block of GPT-2 small's shape (D = 768, 12 heads, V = 50257;
``tests/hf_models.py``), float32, eval mode, traced symmetric kernel over all
``T * V`` outputs:

- ``untied`` read-out: exact, by the read-out identity (``auto``: the ``V``
  outputs per position reduced to the read-out input's rank 768);
- ``tied`` read-out (GPT-2's own): exact, the identity plus the cross terms of the
  weight's two uses (``T^2`` products per sample);
- ``probes``: the tied model's kernel estimated from 64 output probes, with the
  estimator's error bar.

Without the identity the exact traced kernel backpropagates every one of the
``T * V`` output units; its cost model estimate (seconds and memory) is recorded
as the baseline, since it is beyond this machine (the torch.func recipe would
hold ``N * T * V * P`` floats, petabytes).

Run: ``pytest bench/bench_large_vocab.py --benchmark-only``. Time and peak
memory, one fresh process per case: ``python -m bench.bench_large_vocab``
(prints a markdown table).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hf_models import gpt2_small_block
from bench.rss import measure
from rdiag import ntk_fn
from rdiag._tiling import format_bytes

pytest.importorskip("transformers")

#: ``(N, T)`` with ``N * T = 64``.
SHAPES = ((64, 1), (16, 4))
KINDS = ("untied", "tied", "probes")
PROBES = 64


def _case(kind: str, n: int, t: int):
    """The handle's plan summary and a zero-argument callable computing the kernel."""
    model, x = gpt2_small_block(n, t, tied=kind != "untied")
    options = {"output_probes": PROBES} if kind == "probes" else {}
    kernel = ntk_fn(model, **options)
    plan = kernel.plan(x)
    summary = {"explain_plan": plan.reason, "memory_bytes": plan.memory}
    return summary, lambda: kernel(x)


def _without_identity(n: int, t: int) -> dict:
    """The cost model's estimate of the exact untied kernel without the identity.

    Planned after the measured run: planning it captures a few output units of
    all ``T * V``, whose memory would otherwise count in the run's peak.
    """
    model, x = gpt2_small_block(n, t)
    try:
        baseline = ntk_fn(model, readout_identity=False).plan(x)
    except MemoryError as err:
        return {"does_not_fit": str(err)}
    return {
        "implementation": baseline.implementation.value,
        "estimated_seconds": baseline.costs[baseline.implementation].seconds,
        "memory_bytes": baseline.memory,
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "t"), SHAPES)
def test_large_vocab(benchmark, kind: str, n: int, t: int) -> None:
    summary, run = _case(kind, n, t)
    benchmark.group = f"GPT-2-small block V=50257 N={n} T={t}"
    benchmark.extra_info.update(summary)
    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    if kind == "untied":
        benchmark.extra_info["without_identity"] = _without_identity(n, t)
    if kind == "probes":
        rel = float(result.std_err.norm() / result.kernel.norm())
        benchmark.extra_info["relative_error_bar"] = rel


def _table() -> None:
    print("| N | T | kernel | seconds | peak RSS above start | plan's estimate |")
    print("|---|---|---|---|---|---|")
    for n, t in SHAPES:
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_large_vocab", kind, str(n), str(t)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {n} | {t} | {kind} | {res['seconds']:.1f} | "
                f"{format_bytes(res['peak_bytes'])} | "
                f"{format_bytes(res['memory_bytes'])} |",
                flush=True,
            )
            if kind == "untied":
                base = res["without_identity"]
                cells = (
                    f"{base['estimated_seconds']:.0f} | - | "
                    f"{format_bytes(base['memory_bytes'])}"
                    if "memory_bytes" in base
                    else f"- | - | does not fit: {base['does_not_fit'][:90]}"
                )
                print(
                    f"| {n} | {t} | exact without the identity (estimate) | {cells} |",
                    flush=True,
                )


if __name__ == "__main__":
    if len(sys.argv) == 4:
        kind, n, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        summary, run = _case(kind, n, t)
        measured = measure(run, repeats=0)
        if kind == "untied":
            summary["without_identity"] = _without_identity(n, t)
        print(json.dumps({**measured, **summary}))
    else:
        _table()
