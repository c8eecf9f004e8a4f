"""Where dropout's time goes (issue #13): the bench's dropout row (B=2, N=8k, H=16, D=128, causal,
bf16, p=0.1) with the mask step swapped, one variant per process (the swap must precede the
first compile).

Usage: PYTHONPATH=$PWD python benchmarks/dropout_ablation.py VARIANT, VARIANT one of
``plain`` (no dropout), ``full`` (the real mask: eight keep bits packed per Philox call, spread
by a shift), ``join`` (the sixth session's mask: the eight lanes joined as tensors, transposed for
dK/dV), ``rounds0`` / ``rounds3`` (Philox with fewer rounds), ``nojoin`` (a cheap arithmetic mask
built in place: no Philox, no join), ``elem`` (Philox per element: 8x the Philox work), ``pairs``
(a timing sketch of a mask laid out like the MMA accumulator: one call per query pair {i, i+8} and
key quad {j, j+1, j+8, j+9}; not the real mask), ``transpose`` (the real mask, but dK/dV draws it
in the forward's orientation, each Philox call once, and transposes it: a layout conversion
instead of computing each call twice), ``dkdv=BMxBNwWsS`` (the real mask under another dK/dV launch
config, e.g. ``dkdv=32x128w8s2``).
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
elif variant == "nojoin":
    @triton.jit
    def cheap(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False):
        cols = start_n + tl.arange(0, BLOCK_N)
        if TRANS:
            keep = ((row_ids.to(tl.int32)[None, :] * 7 + cols[:, None]) % 11) != 0
        else:
            keep = ((row_ids.to(tl.int32)[:, None] * 7 + cols[None, :]) % 11) != 0
        return keep
    _common.dropout_keep = cheap
elif variant == "elem":  # one philox per element, no join
    @triton.jit
    def elem(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False):
        rid = row_ids.to(tl.int64)[:, None]
        zero = tl.zeros([row_ids.shape[0], BLOCK_N], tl.uint32)
        c0 = (start_n + tl.arange(0, BLOCK_N)).to(tl.uint32)[None, :] + zero
        c1 = (rid & 0xFFFFFFFF).to(tl.uint32) + zero
        w0, w1, w2, w3 = _common.philox(seed, c0, c1, zero, zero)
        keep = w0 >= ((tl.zeros([], tl.int32) + thresh).to(tl.uint32) << 16)
        if TRANS:
            keep = tl.trans(keep)
        return keep
    _common.dropout_keep = elem
elif variant == "pairs":  # timing sketch: one call per (query pair {i, i+8}, key quad {j, j+1, j+8, j+9})
    @triton.jit
    def pairs(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False):
        """Timing-only sketch: one Philox call per (query pair {i, i+8}, key quad {j, j+1, j+8, j+9})."""
        M: tl.constexpr = row_ids.shape[0]
        A: tl.constexpr = M // 16
        B: tl.constexpr = BLOCK_N // 16
        rid = row_ids.to(tl.int64)
        base = (tl.min(rid, 0) // 16) * 8
        pa = tl.arange(0, A)[:, None] * 8 + tl.arange(0, 8)[None, :]  # (A, 8) pair index
        gb = tl.arange(0, B)[:, None] * 4 + tl.arange(0, 4)[None, :] + start_n // 4  # (B, 4) quad index
        zero = tl.zeros([A, 8, B, 4], tl.uint32)
        c0 = gb.to(tl.uint32)[None, None, :, :] + zero
        c1 = (pa + base).to(tl.uint32)[:, :, None, None] + zero
        w0, w1, w2, w3 = _common.philox(seed, c0, c1, zero, zero)
        t = (tl.zeros([], tl.int32) + thresh).to(tl.uint32) << 16
        bits = (_common._keep_bits(w0, 0, t) | _common._keep_bits(w1, 2, t) | _common._keep_bits(w2, 4, t)
                | _common._keep_bits(w3, 6, t))  # (A, 8, B, 4): lane = 4 s + 2 kk + h
        s = tl.arange(0, 2)
        kk = tl.arange(0, 2)
        h = tl.arange(0, 2)
        if TRANS:  # (B, KK, Q, H, A, S, R8)
            b7 = tl.reshape(tl.permute(bits, (2, 3, 0, 1)), [B, 1, 4, 1, A, 1, 8])
            sh = (s[None, None, None, None, None, :, None] * 4 + kk[None, :, None, None, None, None, None] * 2
                  + h[None, None, None, :, None, None, None])
            keep = tl.reshape((b7 >> sh) & 1, [BLOCK_N, M])
        else:  # (A, S, R8, B, KK, Q, H)
            b7 = tl.reshape(bits, [A, 1, 8, B, 1, 4, 1])
            sh = (s[None, :, None, None, None, None, None] * 4 + kk[None, None, None, None, :, None, None] * 2
                  + h[None, None, None, None, None, None, :])
            keep = tl.reshape((b7 >> sh) & 1, [M, BLOCK_N])
        return keep != 0
    _common.dropout_keep = pairs
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
elif variant == "join":  # the sixth session's mask: lanes joined as tensors
    @triton.jit
    def _keep16(word, shift: tl.constexpr, thresh32):
        if shift == 0:
            word = word << 16
        return (word >= thresh32).to(tl.int8)

    @triton.jit
    def joined(seed, row_ids, start_n, thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False):
        G: tl.constexpr = BLOCK_N // 8
        rid = row_ids.to(tl.int64)[:, None]
        zero = tl.zeros([row_ids.shape[0], G], tl.uint32)
        c0 = (start_n // 8 + tl.arange(0, G)).to(tl.uint32)[None, :] + zero
        c1 = (rid & 0xFFFFFFFF).to(tl.uint32) + zero
        c2 = (rid >> 32).to(tl.uint32) + zero
        w0, w1, w2, w3 = _common.philox(seed, c0, c1, c2, zero)
        t = (tl.zeros([], tl.int32) + thresh).to(tl.uint32) << 16
        lanes = tl.join(tl.join(tl.join(_keep16(w0, 0, t), _keep16(w2, 0, t)),
                                tl.join(_keep16(w1, 0, t), _keep16(w3, 0, t))),
                        tl.join(tl.join(_keep16(w0, 16, t), _keep16(w2, 16, t)),
                                tl.join(_keep16(w1, 16, t), _keep16(w3, 16, t))))
        keep = tl.reshape(lanes, [row_ids.shape[0], BLOCK_N]) != 0
        if TRANS:
            keep = tl.trans(keep)
        return keep
    _common.dropout_keep = joined

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
