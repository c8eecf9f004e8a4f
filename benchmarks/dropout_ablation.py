"""Where dropout's time goes (issue #13): the bench's dropout row (B=2, N=8k, H=16, D=128, causal,
bf16, p=0.1) with the mask step swapped, one variant per process (the swap must precede the
first compile).

Usage: PYTHONPATH=$PWD python benchmarks/dropout_ablation.py VARIANT [--kernels], VARIANT one of
``plain`` (no dropout), ``full`` (the real mask), ``rounds0`` / ``rounds3`` (Philox with fewer
rounds), ``transpose`` (the real mask, but dK/dV draws it in the forward's orientation, each
Philox call once, and transposes it), ``dkdv=BMxBNwWsS`` (the real mask under another dK/dV
launch config, e.g. ``dkdv=32x128w8s2``); ``--kernels`` adds the backward's per-kernel times.
The earlier variants (``join``, ``nojoin``, ``elem``, ``pairs``, ``packed bits``: other mask
layouts, measured in the sixth and seventh sessions) were written for the mask's old signature
and are in the git history (commit 06faba8).
Results: docs/performance.md.
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
elif variant == "transpose":  # dK/dV draws the mask as the forward does (each call once), then transposes
    _orig_keep = _common.dropout_keep

    @triton.jit
    def transposed(seed, row0, M: tl.constexpr, start_n, thresh, BLOCK_N: tl.constexpr,
                   TRANS: tl.constexpr = False):
        keep = _orig_keep(seed, row0, M, start_n, thresh, BLOCK_N, False)
        if TRANS:
            keep = tl.trans(keep)
        return keep
    _common.dropout_keep = transposed

if variant.startswith("dkdv="):  # the real mask under another dK/dV launch config, e.g. dkdv=32x128w8s2
    import re

    from flash_module.configs import KernelConfig, override

    sizes = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", variant[5:]).groups()
    override(dkdv=KernelConfig(*(int(x) for x in sizes))).__enter__()  # for the whole run

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
if "--kernels" in sys.argv:  # where the backward's time goes, kernel by kernel
    from benchmarks.kernel_times import profile_ms

    times = profile_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 10)
    for name, ms in times.items():
        print(f"    {name[:60]:60} {ms * 1e3:8.1f} us")
