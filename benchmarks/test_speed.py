"""The pytest-benchmark suite: our modes next to SDPA (flash, cuDNN, efficient) and FlexAttention.

Run on a GPU machine (skipped without CUDA; not part of ``pytest tests``):

    pytest benchmarks/test_speed.py --benchmark-only -m gpu --benchmark-group-by=param:shape

Each case times one pass (``fwd`` or ``bwd``) of one implementation on one shape, with the runners
of ``benchmarks/bench.py`` (the CLI) so both report the same thing; the pytest-benchmark table
groups implementations of a shape together and ``extra_info["tflops"]`` holds TFLOP/s (FLOPs as in
:func:`benchmarks.bench.attention_flops`).  Timing is pytest-benchmark's own (wall clock around a
synchronised call); for the medians quoted in docs/performance.md use the CLI, which uses
``triton.testing.do_bench``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench import DTYPES, OURS_IMPLS, Shape, attention_flops, make_inputs, make_runner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Every library mode (ours, ours_fa1, ...) next to the peers; not ours_torch, the PyTorch path.
IMPLS = [i for i in OURS_IMPLS if i != "ours_torch"] + ["flash", "cudnn", "efficient", "flex"]
# (dtype, D, N, B, H, H_kv, causal, Sk): issue #5's grid corners, GQA, Sq != Sk, odd head dims.
SHAPES = {
    "bf16-d64-n1k": ("bf16", 64, 1024, 64, 32, 32, False, None),
    "bf16-d128-n4k-causal": ("bf16", 128, 4096, 16, 16, 16, True, None),
    "bf16-d128-n16k": ("bf16", 128, 16384, 4, 16, 16, False, None),
    "fp16-d128-n8k-causal": ("fp16", 128, 8192, 8, 16, 16, True, None),
    "bf16-d256-n4k": ("bf16", 256, 4096, 16, 8, 8, False, None),
    "bf16-d96-n4k": ("bf16", 96, 4096, 16, 21, 21, False, None),
    "bf16-d128-n8k-gqa32/8": ("bf16", 128, 8192, 8, 32, 8, True, None),
    "bf16-d128-1kx16k-causal": ("bf16", 128, 1024, 16, 16, 16, True, 16384),
}


@pytest.fixture(scope="module")
def inputs_cache() -> dict:
    return {}


def _inputs(cache: dict, key: str, shape: Shape) -> dict:
    if key not in cache:
        cache.clear()  # one shape's tensors at a time
        torch.cuda.empty_cache()
        dtype, dev = DTYPES[shape.dtype], torch.device("cuda")
        cache[key] = make_inputs(shape.batch, shape.heads, shape.kv_heads, shape.seqlen, shape.head_dim,
                                  dtype, dev, 0, {"bshd", "bhsd"}, shape.seqlen_k)
    return cache[key]


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_speed(benchmark, inputs_cache, shape: str, impl: str, pass_: str) -> None:
    dtype, d, n, b, h, hkv, causal, n_k = SHAPES[shape]
    sh = Shape(dtype, d, n, b, h, hkv, causal, n_k)
    try:
        runner = make_runner(impl, sh, torch.device("cuda"))
    except Exception as exc:  # a peer missing from this torch build
        pytest.skip(f"{impl} unavailable: {exc}")
    q, k, v, dout = _inputs(inputs_cache, shape, sh)[runner.layout]
    benchmark.group = f"{shape} {pass_}"
    with runner.context():
        if pass_ == "fwd":
            def step() -> None:
                with torch.no_grad():
                    runner.fn(q, k, v)
                torch.cuda.synchronize()
        else:
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            try:
                out = runner.fn(qg, kg, vg)
            except Exception as exc:  # e.g. a backend that refuses this shape
                pytest.skip(f"{impl} refused the shape: {str(exc).splitlines()[0][:200]}")
            grad = torch.empty_like(out).copy_(dout)

            def step() -> None:
                torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True)
                torch.cuda.synchronize()
        try:
            step()  # compile / first call outside the timing
        except Exception as exc:
            pytest.skip(f"{impl} refused the shape: {str(exc).splitlines()[0][:200]}")
        benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    flops = attention_flops(b, h, n, sh.kv_len, d, causal, pass_)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tflops"] = round(flops / stats.median / 1e12, 1)
