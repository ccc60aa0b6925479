"""Second order through attention at long sequences: rdiag's operator vs math attention.

Model: one GPT-2 block (``GPT2LMHeadModel``, ``n_layer=1``, sdpa attention) from a
config, ``n_embd`` 128 (4 heads) or 768 (12 heads), vocabulary 256 (small, so
that the logits do not hide the attention's memory), batch 1, ``T`` tokens,
causal language-model cross-entropy, float32, eval mode. Products:

- ``hvp``: one Hessian-vector product of the loss over all parameters;
- ``ntk``: one eNTK operator product ``K v = J (J^T v)`` (``rdiag.NTKOperator``,
  one vjp and one jvp: the building block of the jvp-based eNTK columns and of
  ``ntk_moments``).

Ways, one fresh process per case: after a warm-up product (one-time costs, the
operators' probes) the peak resident memory of the next product above the
memory before it (``bench/rss.py``, ``measure_warm``), and the best time of two
products:

- ``rdiag``: rdiag's products as shipped (attention by :mod:`rdiag.attention`);
- ``math``: the same product by torch.func under the math attention backend
  (forward over reverse for ``hvp``; for ``ntk`` the operator in its
  ``math_attention`` mode): the baseline the issue names;
- ``main``: ``hvp`` through ``HessianOperator`` as before this operator (its
  strategy chain: retained graph, fused forward-over-reverse, then math
  attention), for the figure the issue measured.

The issue's target at ``T = 2048``, ``n_embd = 128``: the extra peak memory of
one HVP at most 1/4 of math attention's, its time at most 1.5x, on CPU.

On a shared machine the times of separate processes drift with the load;
``python -m bench.bench_attention interleave PRODUCT T N_EMBD [ROUNDS]`` builds
``rdiag`` and ``math`` in one process and times them alternately (best of the
rounds after a warm-up each), the time ratio to quote.

Run: ``python -m bench.bench_attention [T,...] [n_embd,...] [ways] [products]``
prints a markdown table (defaults: T 512,1024,2048, n_embd 128, all ways and
products); ``python -m bench.bench_attention case WAY PRODUCT T N_EMBD`` runs one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.rss import measure_warm

VOCAB = 256
WAYS = ("rdiag", "math", "main")
PRODUCTS = ("hvp", "ntk")


def _model(t: int, width: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=t,
        n_embd=width,
        n_layer=1,
        n_head=width // 32 if width < 384 else 12,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, t), generator=gen)
    return model, {"input_ids": ids}, torch.randint(0, VOCAB, (1, t), generator=gen)


def _logits(out):
    return out.logits


def _case(way: str, product: str, t: int, width: int):
    """A zero-argument callable computing one product, everything else prepared."""
    from torch.func import grad, jvp

    from rdiag import NTKOperator
    from rdiag._autodiff import math_attention
    from rdiag.operators.hessian import HessianOperator

    model, x, y = _model(t, width)
    if product == "hvp":
        op = HessianOperator(model, F.cross_entropy, (x, y), output_fn=_logits)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
        if way == "rdiag":
            return lambda: op.matvec(v)
        if way == "main":
            op._attention = False  # the strategy chain before rdiag's operator

            return lambda: op.matvec(v)
        theta = op.fm.flatten(op.fm.params)
        xb = op.fm.cast_input(x, "x")

        def loss(th):
            return op.batch_loss(op.fm.unflatten(th), xb, y)

        def math_hvp():
            with math_attention():
                return jvp(grad(loss), (theta,), (v,))[1]

        return math_hvp
    if way == "main":
        raise ValueError("'main' is measured for hvp only")
    op = NTKOperator(model, x, output_fn=_logits)
    if way == "math":
        op._mode = "math_attention"
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
    return lambda: op.matvec(v)


def _row(way: str, product: str, t: int, width: int) -> dict:
    args = ["case", way, product, str(t), str(width)]
    # Every allocation of 64 KiB or more is its own mapping, returned on free:
    # the resident high-water mark then follows the live tensors (glibc's dynamic
    # threshold would keep freed blocks of up to 32 MiB resident and hide the
    # second product's tiles, but not math attention's larger score matrices).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_attention", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(ts, widths, ways, products) -> None:
    from rdiag._tiling import format_bytes

    print("| product | n_embd | T | way | seconds | peak RSS above start | "
          "memory / math | time / math |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for product in products:
        for width in widths:
            for t in ts:
                rows = {}
                for way in ways:
                    if way == "main" and product != "hvp":
                        continue
                    rows[way] = _row(way, product, t, width)
                base = rows.get("math")
                for way, res in rows.items():
                    ratio = (
                        f"{res['peak_bytes'] / base['peak_bytes']:.3f} | "
                        f"{res['seconds'] / base['seconds']:.2f}"
                        if base
                        else "- | -"
                    )
                    print(
                        f"| {product} | {width} | {t} | {way} | {res['seconds']:.3f} "
                        f"| {format_bytes(res['peak_bytes'])} | {ratio} |",
                        flush=True,
                    )


def _interleaved(product: str, t: int, width: int, rounds: int) -> dict:
    """Best seconds of ``rdiag`` and ``math``, timed alternately in this process."""
    runs = {way: _case(way, product, t, width) for way in ("rdiag", "math")}
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for way, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[way] = min(best[way], time.perf_counter() - t0)
    return {**best, "ratio": best["rdiag"] / best["math"]}


def _ints(arg: str) -> list[int]:
    return [int(a) for a in arg.split(",")]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "interleave":
        product, t, width = argv[1], int(argv[2]), int(argv[3])
        rounds = int(argv[4]) if len(argv) > 4 else 5
        print(json.dumps(_interleaved(product, t, width, rounds)))
    elif argv and argv[0] == "case":
        way, product, t, width = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(measure_warm(_case(way, product, t, width))))
    else:
        _table(
            _ints(argv[0]) if len(argv) > 0 else [512, 1024, 2048],
            _ints(argv[1]) if len(argv) > 1 else [128],
            argv[2].split(",") if len(argv) > 2 else WAYS,
            argv[3].split(",") if len(argv) > 3 else PRODUCTS,
        )
