"""Where dropout's time goes (issue #13): the bench's dropout row (B=2, N=8k, H=16, D=128, causal,
bf16, p=0.1) with the mask step swapped, one variant per process (the swap must precede the
first compile).

Usage: PYTHONPATH=$PWD python benchmarks/dropout_ablation.py VARIANT, VARIANT one of
``plain`` (no dropout), ``full`` (the real mask), ``rounds0`` / ``rounds3`` (Philox with fewer
rounds), ``nojoin`` (a cheap arithmetic mask built in place: no Philox, no join), ``elem``
(Philox per element: no join, 8x the Philox work).  Results: docs/performance.md.
"""
import sys

import torch
import triton
import triton.language as tl

import flash_module as fm
from flash_module.kernels import _common

variant = sys.argv[1]
if variant == "rounds0":
    _common.PHILOX_ROUNDS = tl.constexpr(0)
elif variant == "rounds3":
    _common.PHILOX_ROUNDS = tl.constexpr(3)
elif variant == "nojoin":
    @triton.jit
    def cheap(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        return ((row_ids.to(tl.int32)[:, None] * 7 + cols[None, :]) % 11) != 0
    _common.dropout_keep = cheap
elif variant == "elem":  # one philox per element, no join
    @triton.jit
    def elem(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr):
        rid = row_ids.to(tl.int64)[:, None]
        zero = tl.zeros([row_ids.shape[0], BLOCK_N], tl.uint32)
        c0 = (start_n + tl.arange(0, BLOCK_N)).to(tl.uint32)[None, :] + zero
        c1 = (rid & 0xFFFFFFFF).to(tl.uint32) + zero
        w0, w1, w2, w3 = _common.philox(seed, c0, c1, zero, zero)
        return w0 >= ((tl.zeros([], tl.int32) + thresh).to(tl.uint32) << 16)
    _common.dropout_keep = elem

b, n, h, d = 2, 8192, 16, 128
q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
flops = 4 * b * h * n * n * d / 2
p = 0.0 if variant == "plain" else 0.1
fn = lambda: fm.flash_attn_func(q, k, v, p, causal=True)  # noqa: E731
with torch.no_grad():
    fwd = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
out = fn()
dout = torch.randn_like(out)
bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=10,
                              rep=50, return_mode="median")
print(f"{variant:10} fwd {flops / fwd / 1e9:6.1f}  bwd {2.5 * flops / bwd / 1e9:6.1f} TFLOP/s", flush=True)
