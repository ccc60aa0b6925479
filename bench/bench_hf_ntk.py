"""``auto`` against each eNTK implementation and the torch.func recipe on HF models.

Models: GPT-2, BERT, ViT, ResNet and MobileNetV2 from small configs
(``tests/hf_models.py``, size ``SMALL``), float32, eval mode; the traced symmetric kernel
``K(x, x)`` at N = 16 and 64, every implementation in one run per group. Each is
called twice before timing (``auto`` settles a close call by timing its first two
calls), then timed over 3 rounds. The cost model's estimate of each
implementation goes into ``extra_info`` (the README's estimated-vs-measured
table); ``auto``'s pick and reason too.

Skipped, with the reason: an implementation the cost model puts over
:data:`MAX_SECONDS`, the recipe where its two Jacobians exceed
:data:`RECIPE_LIMIT` or where ``vmap`` cannot run the model.

Run: ``pytest bench/bench_hf_ntk.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from bench.baselines import tutorial_jacobian_ntk
from tests.hf_models import NAMES, SMALL, hf_model
from rdiag import ntk_fn
from rdiag._tiling import format_bytes
from rdiag.ntk.costs import RACE_CALLS

pytest.importorskip("transformers")

IMPLS = ("auto", "structured", "jacobian", "ntvp", "recipe")
SIZES = (16, 64)
#: Skip an implementation the cost model estimates slower than this.
MAX_SECONDS = 20.0
#: The recipe holds both ``N * O * P`` Jacobians; skip it above this many bytes.
RECIPE_LIMIT = 4 * 2**30


def _estimates(model: torch.nn.Module, x: dict) -> dict[str, float]:
    plan = ntk_fn(model).plan(x)
    return {k.value: c.seconds for k, c in plan.costs.items()}


# impl innermost: a group's implementations run back to back, under the same load
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_hf_ntk(benchmark, impl: str, name: str, n: int) -> None:
    model, x = hf_model(name, n, SMALL)
    benchmark.group = f"hf eNTK {name} N={n} traced"
    estimates = _estimates(model, x)
    benchmark.extra_info["estimated_seconds"] = estimates
    if impl == "recipe":
        kernel = None
        params = sum(p.numel() for p in model.parameters())
        outputs = ntk_fn(model).plan(x).spec.num_outputs
        jac_bytes = 2 * n * outputs * params * 4
        if jac_bytes > RECIPE_LIMIT:
            pytest.skip(f"recipe: its two Jacobians need {format_bytes(jac_bytes)}")

        def run():
            return tutorial_jacobian_ntk(model, x, x, True)

        try:
            run()
        except RuntimeError as err:
            pytest.skip(f"recipe fails on {name}: {str(err).splitlines()[0][:120]}")
    else:
        if impl != "auto" and estimates[impl] > MAX_SECONDS:
            pytest.skip(f"{impl}: estimated {estimates[impl]:.3g} s > {MAX_SECONDS} s")
        kernel = ntk_fn(model, implementation=impl)

        def run():
            return kernel(x)

    warmup = 2 * RACE_CALLS if impl == "auto" else 1
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=warmup)
    if kernel is not None:
        benchmark.extra_info["ran"] = kernel.implementation.value
        benchmark.extra_info["reason"] = kernel.explain()
