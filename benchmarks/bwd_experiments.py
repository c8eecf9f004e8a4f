"""Backward schedules tried for issue #15, next to the two-kernel backward and the peers.

    PYTHONPATH=$PWD python benchmarks/bwd_experiments.py atomic   # one pass, dQ by fp32 atomics
    PYTHONPATH=$PWD python benchmarks/bwd_experiments.py split    # dV and dK by separate kernels

Plain attention only (no variants, H == H_kv, Sq == Sk, contiguous (B, S, H, D)), bf16, B*N =
64k tokens.  ``atomic``: the dK/dV kernel also computes dQ's share of each tile (dS K, a fifth
matmul) and adds it to an fp32 buffer with ``tl.atomic_add``; FA2/FA3 do this instead of a
second kernel that recomputes QK^T and dO V^T (7 matmuls -> 5).  ``split``: dV (2 matmuls)
and dK (3) in two kernels, each holding one accumulator, against the D=256 spills.  Results
and what they mean: ``docs/performance.md`` (ninth session).  Both lost; kept for the record
and as a starting point.
"""
import argparse

import torch
import triton
import triton.language as tl

from flash_module._runtime import cdiv
from flash_module.configs import bwd_configs
from flash_module.kernels import _common, fa2_bwd
from flash_module.kernels._common import (
    load_tile,
    mma,
    probs,
    program_bh,
    q_range,
    range_part,
    row_stats,
    score,
    stats_head,
    store_tile,
    tile_ptrs,
    visible,
)
from flash_module.kernels.fa2_bwd import fa2_backward
from flash_module.kernels.fa2_fwd import fa2_forward


@triton.jit
def _loop(dk, dv, k, v, Q, DO, DQA, st, head, stride_s, a, b, cols, Sq, causal_offset, stats_len, qk_scale, sm_scale,
          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
          ATOMIC: tl.constexpr, WHAT: tl.constexpr, RELOAD: tl.constexpr = False, K=None, V=None):
    BLOCK_D: tl.constexpr = k.shape[1]
    BLOCK_N: tl.constexpr = k.shape[0]
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(a, b, BLOCK_M):
        rows = start_m + offs_r
        q = load_tile(tile_ptrs(Q + head, start_m, stride_s, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, MASKED)
        do = load_tile(tile_ptrs(DO + head, start_m, stride_s, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, MASKED)
        lse2, lse2_lo, delta = row_stats(st, stats_len, rows, Sq, q, MASKED)
        if RELOAD:  # K/V tiles re-read each iteration (L2 hits): operands from shared memory, not registers
            k = tl.load(tile_ptrs(K + head, tl.min(cols, 0), stride_s, BLOCK_N, BLOCK_D))
            v = tl.load(tile_ptrs(V + head, tl.min(cols, 0), stride_s, BLOCK_N, BLOCK_D))
        s_t = score(k, tl.trans(q), qk_scale, 0.0)
        p_t = probs(s_t, lse2[None, :], lse2_lo[None, :], q)
        if MASKED:
            if IS_CAUSAL:
                p_t = tl.where(visible(rows[None, :], cols[:, None], None, causal_offset, IS_CAUSAL), p_t, 0.0)
        if WHAT != 2:
            dv = mma(p_t, do, dv)
        if WHAT != 1:
            dp_t = mma(v, tl.trans(do), tl.zeros(p_t.shape, dk.dtype))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = mma(ds_t, q, dk)
        if ATOMIC:
            dq = mma(tl.trans(ds_t), k, tl.zeros([BLOCK_M, BLOCK_D], dk.dtype)) * sm_scale
            ptrs = DQA + head + rows[:, None] * stride_s + offs_d[None, :]
            tl.atomic_add(ptrs, dq, mask=(rows[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _one_pass_kernel(Q, K, V, DO, Stats, DK, DV, DQA, stride_s, H, Sq, Sk, causal_offset, stats_len, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, ATOMIC: tl.constexpr, WHAT: tl.constexpr,
                     RELOAD: tl.constexpr = False):
    off_b, off_h = program_bh(H)
    start_n = tl.program_id(0) * BLOCK_N
    head = (off_b * Sq * H + off_h) * HEAD_DIM  # all tensors (B, S, H, D) contiguous, Sq == Sk here
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(tile_ptrs(K + head, start_n, stride_s, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
    v = load_tile(tile_ptrs(V + head, start_n, stride_s, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
    if WHAT == 1:
        dk = tl.zeros([16, 16], ACC_DTYPE)  # unused
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    if WHAT == 2:
        dv = tl.zeros([16, 16], ACC_DTYPE)  # unused
    else:
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    st = stats_head(Stats, off_b, off_h, H, stats_len)
    m0, m1, m2, m3 = q_range(start_n, Sq, causal_offset, 0, 0, BLOCK_M, BLOCK_N, IS_CAUSAL, False)
    for part in tl.static_range(3):
        a, b = range_part(part, m0, m1, m2, m3)
        dk, dv = _loop(dk, dv, k, v, Q, DO, DQA, st, head, stride_s, a, b, cols, Sq, causal_offset, stats_len, qk_scale,
                       sm_scale, HEAD_DIM, BLOCK_M, part != 1, IS_CAUSAL, ATOMIC, WHAT, RELOAD, K, V)
    if WHAT != 1:
        store_tile(tile_ptrs(DK + head, start_n, stride_s, BLOCK_N, BLOCK_D), dk * sm_scale, cols, Sk, HEAD_DIM)
    if WHAT != 2:
        store_tile(tile_ptrs(DV + head, start_n, stride_s, BLOCK_N, BLOCK_D), dv, cols, Sk, HEAD_DIM)


def one_pass(dout, q, k, v, out, lse, scale, causal, cfg, atomic=True, what=0, dk=None, dv=None, stats=None):
    b, s, h, d = q.shape
    if stats is None:
        stats = _common.bwd_preprocess(out, dout, lse, None)
    dqa = torch.zeros((b, s, h, d), dtype=torch.float32, device=q.device) if atomic else stats
    if dk is None:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    bm, bn, w, st = cfg
    _one_pass_kernel[(cdiv(s, bn), b * h)](
        q, k, v, dout, stats, dk, dv, dqa, h * d, h, s, s, 0, stats.shape[-1], scale * 1.4426950408889634, scale,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_common.block_d(d), IS_CAUSAL=causal, ACC_DTYPE=tl.float32,
        ATOMIC=atomic, WHAT=what, num_warps=w, num_stages=st)
    return (dqa.to(q.dtype) if atomic else None), dk, dv


def split_dkdv(dout, q, k, v, out, lse, scale, causal, cfg_v, cfg_k):
    """dV by one kernel, dK by another (half the accumulators each), dQ by ours; returns dq, dk, dv."""
    stats = _common.bwd_preprocess(out, dout, lse, None)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    one_pass(dout, q, k, v, out, lse, scale, causal, cfg_v, atomic=False, what=1, dk=dk, dv=dv, stats=stats)
    one_pass(dout, q, k, v, out, lse, scale, causal, cfg_k, atomic=False, what=2, dk=dk, dv=dv, stats=stats)
    return dq_only(dout, q, k, v, stats, scale, causal), dk, dv


def dq_only(dout, q, k, v, stats, scale, causal):
    """Our dQ kernel alone (plain attention)."""
    b, s, h, d = q.shape
    dq = torch.empty_like(q)
    _, cfg = bwd_configs(q.dtype, d, q.device)
    args = _common.bsh_strides(q, k, v, dout)
    scales = (*_common.qk_scale(scale, 0.0), q, 0, 0, *_common.split_scale(scale), 0, 0,
              *_common.dropout_args(0.0, None, q), q, 0, 0, 0, 0)
    fa2_bwd._bwd_dq_kernel[(cdiv(s, cfg.block_m), b * h)](
        q, k, v, dout, stats, dq, *args, h, 1, s, s, 0, stats.shape[-1], *scales, q, 0, 0, 0, 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_GRAD=0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        HEAD_DIM=d, BLOCK_D=_common.block_d(d), IS_CAUSAL=causal, SOFTCAP=False, ALIBI=False, WINDOW=False,
        DROPOUT=False, MASK=0, **_common.kernel_flags(q))
    return dq


def _ms(fn, *args) -> float:
    """Median ms of ``fn(*args)`` (``do_bench``)."""
    return triton.testing.do_bench(lambda: fn(*args))


def _grads(o, inputs, g):
    return torch.autograd.grad(o, inputs, g, retain_graph=True)


def _setup(d, n, h, causal):
    bsz = 65536 // n
    q, k, v = (torch.randn(bsz, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    scale = d ** -0.5
    out, lse = fa2_forward(q, k, v, scale, causal, 0)
    flops = 4 * bsz * h * n * n * d * 2.5 / (2 if causal else 1)
    return q, k, v, dout, out, lse, scale, flops


def _peers(q, k, v, dout, out, lse, scale, causal, flops) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    t = _ms(fa2_backward, dout, q, k, v, out, lse, None, scale, causal, 0)
    line = f"two-kernel {flops / t * 1e-9:.0f} ({t:.2f} ms)"
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    g = dout.transpose(1, 2)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            t = _ms(_grads, o, (qt, kt, vt), g)
        line += f" | {name} {flops / t * 1e-9:.0f}"
    return line


def atomic_main() -> None:
    cfgs = [(64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 1), (128, 128, 8, 2), (64, 64, 4, 3), (32, 128, 4, 2)]
    for d, n, h, causal in [(128, 16384, 16, False), (128, 16384, 16, True), (128, 4096, 16, True),
                            (64, 16384, 32, False), (256, 16384, 8, False)]:
        q, k, v, dout, out, lse, scale, flops = _setup(d, n, h, causal)
        ref = fa2_backward(dout, q, k, v, out, lse, None, scale, causal, 0)
        head = f"D={d} N={n} H={h} causal={causal}: "
        print(head + _peers(q, k, v, dout, out, lse, scale, causal, flops), flush=True)
        for cfg in cfgs:
            try:
                got = one_pass(dout, q, k, v, out, lse, scale, causal, cfg)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
                t = _ms(one_pass, dout, q, k, v, out, lse, scale, causal, cfg)
                t2 = _ms(one_pass, dout, q, k, v, out, lse, scale, causal, cfg, False)
                print(f"   one pass {cfg}: {flops / t * 1e-9:.0f} ({t:.2f} ms; without dQ {t2:.2f} ms; "
                      f"err {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not fit
                print(f"   one pass {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)


def split_main() -> None:
    combos = {256: [((64, 64, 8, 2), (64, 64, 8, 2)), ((64, 128, 8, 2), (64, 64, 8, 2)), ((64, 64, 4, 2), (64, 64, 4, 2)),
                    ((64, 128, 8, 2), (32, 64, 8, 2)), ((64, 128, 8, 2), (64, 32, 8, 2))],
              128: [((64, 128, 8, 2), (64, 128, 8, 2)), ((128, 128, 8, 2), (64, 128, 8, 2))]}
    for d, n, h, causal in [(256, 16384, 8, False), (256, 16384, 8, True), (128, 16384, 16, False)]:
        q, k, v, dout, out, lse, scale, flops = _setup(d, n, h, causal)
        ref = fa2_backward(dout, q, k, v, out, lse, None, scale, causal, 0)
        head = f"D={d} N={n} H={h} causal={causal}: "
        print(head + _peers(q, k, v, dout, out, lse, scale, causal, flops), flush=True)
        for cv, ck in combos[d]:
            try:
                got = split_dkdv(dout, q, k, v, out, lse, scale, causal, cv, ck)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
                t = _ms(split_dkdv, dout, q, k, v, out, lse, scale, causal, cv, ck)
                tv = _ms(one_pass, dout, q, k, v, out, lse, scale, causal, cv, False, 1)
                tk = _ms(one_pass, dout, q, k, v, out, lse, scale, causal, ck, False, 2)
                print(f"   split dV {cv} / dK {ck}: {flops / t * 1e-9:.0f} ({t:.2f} ms; dv {tv:.2f} "
                      f"dk {tk:.2f}; err {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"   split dV {cv} / dK {ck}: {type(e).__name__} {str(e)[:200]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=("atomic", "split"))
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    atomic_main() if args.experiment == "atomic" else split_main()


if __name__ == "__main__":
    main()
