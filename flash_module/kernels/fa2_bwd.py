"""FlashAttention-2 backward (Algorithm 2 of the FA2 paper) in Triton, deterministic.

Three launches, none of them with atomics:

1. ``_bwd_preprocess``: ``delta = rowsum(dO * O) - dlse`` and ``lse2 = lse * log2(e)`` (with
   ``+inf`` for rows that saw no key, so that ``P = exp2(s - lse2)`` is 0 there, not NaN).
2. ``_bwd_dkdv_kernel``: grid (cdiv(Sk, BLOCK_N), B * H_kv).  A K/V block stays on chip while
   every query block that sees it streams past; P and dS are recomputed from lse2/delta:
       P^T = exp2(K Q^T * qk_scale - lse2),   dV += P^T dO
       dP^T = V dO^T,  dS^T = P^T * (dP^T - delta),  dK += dS^T Q      (dK scaled at the end)
   For GQA the program also loops over the query heads of its K/V head's group, so the group
   sum happens in registers, in a fixed order.
3. ``_bwd_dq_kernel``: grid (cdiv(Sq, BLOCK_M), B * H).  A query block stays on chip while the
   K/V blocks it sees stream past:  dQ += dS K  with dS recomputed the same way.

Both loops are split like the forward's: full tiles away from the causal diagonal run without
masks; diagonal and ragged tiles run a masked copy.
"""

import torch
import triton
import triton.language as tl

from ..configs import KernelConfig, bwd_configs
from ._common import LOG2E, LOG2E_C, kv_range, mma, q_range, scaled, split_scale, to_dtype
from .fa2_fwd import block_d, kernel_flags


@triton.jit
def _bwd_preprocess(
    Out, DOut, Lse, DLse, Delta, Lse2,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=ok, other=0.0).to(ACC_DTYPE)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dos
                 + offs_d[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
    delta = tl.sum(o * do, 1)  # (BLOCK_M,)
    row_base = pid_bh.to(tl.int64) * Sq
    if HAS_DLSE:
        # d lse_i / d s_ij = P_ij, so a gradient into LSE adds dlse_i * P_ij to dS_ij.
        delta -= tl.load(DLse + row_base + offs_m, mask=offs_m < Sq, other=0.0).to(ACC_DTYPE)
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < Sq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * tl.full([], LOG2E_C, ACC_DTYPE))
    tl.store(Delta + row_base + offs_m, delta, mask=offs_m < Sq)
    tl.store(Lse2 + row_base + offs_m, lse2, mask=offs_m < Sq)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    Q_head, DO_head, Lse2_head, Delta_head, stride_qs, stride_dos,
    m_start, m_end, offs_n, Sq, causal_offset, qk_scale, qk_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXACT: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ptrs = Q_head + tl.cast(m_start, tl.int64) * stride_qs + offs_r[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = DO_head + tl.cast(m_start, tl.int64) * stride_dos + offs_r[:, None] * stride_dos + offs_d[None, :]
    for start_m in range(m_start, m_end, BLOCK_M):
        rows = start_m + offs_r
        if MASKED:
            ok = (rows[:, None] < Sq) & d_ok
            q = tl.load(q_ptrs, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
            do = tl.load(do_ptrs, mask=ok, other=0.0)
            # Rows past Sq: lse2 = +inf makes their P exactly 0.
            lse2 = tl.load(Lse2_head + rows, mask=rows < Sq, other=float("inf"))
            delta = tl.load(Delta_head + rows, mask=rows < Sq, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok, other=0.0)
                do = tl.load(do_ptrs, mask=d_ok, other=0.0)
            lse2 = tl.load(Lse2_head + rows)
            delta = tl.load(Delta_head + rows)
        s_t = mma(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dk.dtype), DOT_PRECISION, UPCAST)
        p_t = tl.math.exp2(scaled(s_t, qk_scale, qk_scale_lo, EXACT) - lse2[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASKED:
            if IS_CAUSAL:
                p_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        dv = mma(p_t, do, dv, DOT_PRECISION, UPCAST)  # (BLOCK_N, BLOCK_D)
        dp_t = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dk.dtype), DOT_PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T
        dk = mma(ds_t, q, dk, DOT_PRECISION, UPCAST)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse2, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    H, H_KV, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hkv = (pid_bh % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM)
    row0 = start_n.to(tl.int64)
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + (row0 * stride_ks)
                + offs_c[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + (row0 * stride_vs)
                + offs_c[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)

    lo, m_full, even_end = q_range(start_n, Sq, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    diag_end = tl.minimum(m_full, ((Sq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    tail_start = tl.maximum(m_full, even_end)
    for g in range(GROUP):  # the query heads that share this K/V head, summed in order
        off_h = off_hkv * GROUP + g
        Q_head = Q + off_b * stride_qb + off_h * stride_qh
        DO_head = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * H + off_h) * Sq
        # Diagonal tiles (causal mask), full tiles (no mask), then the ragged last tile.
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse2 + row_base, Delta + row_base,
                             stride_qs, stride_dos, lo, diag_end, offs_n, Sq, causal_offset, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, BLOCK_D, True, IS_CAUSAL, EVEN_D, DOT_PRECISION, UPCAST, EXACT)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse2 + row_base, Delta + row_base,
                             stride_qs, stride_dos, m_full, even_end, offs_n, Sq, causal_offset, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, BLOCK_D, False, IS_CAUSAL, EVEN_D, DOT_PRECISION, UPCAST, EXACT)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse2 + row_base, Delta + row_base,
                             stride_qs, stride_dos, tail_start, Sq, offs_n, Sq, causal_offset, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, BLOCK_D, True, IS_CAUSAL, EVEN_D, DOT_PRECISION, UPCAST, EXACT)

    dk = scaled(dk, sm_scale, sm_scale_lo, EXACT)  # dS was taken w.r.t. the scaled scores
    dk_ptrs = (DK + off_b * stride_dkb + off_hkv * stride_dkh + row0 * stride_dks
               + offs_c[:, None] * stride_dks + offs_d[None, :])
    dv_ptrs = (DV + off_b * stride_dvb + off_hkv * stride_dvh + row0 * stride_dvs
               + offs_c[:, None] * stride_dvs + offs_d[None, :])
    tl.store(dk_ptrs, to_dtype(dk, DK.dtype.element_ty, ROUND_BF16), mask=kv_ok)
    tl.store(dv_ptrs, to_dtype(dv, DV.dtype.element_ty, ROUND_BF16), mask=kv_ok)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,
    K_head, V_head, stride_ks, stride_vs,
    n_start, n_end, offs_m, Sk, causal_offset, qk_scale, qk_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXACT: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    k_ptrs = K_head + tl.cast(n_start, tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V_head + tl.cast(n_start, tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(n_start, n_end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_ok = (cols[:, None] < Sk) & d_ok
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dq.dtype), DOT_PRECISION, UPCAST)
        p = tl.math.exp2(scaled(s, qk_scale, qk_scale_lo, EXACT) - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = cols[None, :] < Sk
            if IS_CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(ok, p, 0.0)
        dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dq.dtype), DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = mma(ds, k, dq, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_D)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse2, Delta, DQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    H, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
    row0 = start_m.to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qs
                + offs_r[:, None] * stride_qs + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_dos
                 + offs_r[:, None] * stride_dos + offs_d[None, :], mask=ok, other=0.0)
    row_base = pid_bh.to(tl.int64) * Sq
    lse2 = tl.load(Lse2 + row_base + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Sq, other=0.0)
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    n_full, hi = kv_range(start_m, Sk, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_vs, 0, n_full, offs_m, Sk,
                   causal_offset, qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, False, IS_CAUSAL,
                   EVEN_D, DOT_PRECISION, UPCAST, EXACT)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_vs, n_full, hi, offs_m, Sk,
                   causal_offset, qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL,
                   EVEN_D, DOT_PRECISION, UPCAST, EXACT)
    dq = scaled(dq, sm_scale, sm_scale_lo, EXACT)
    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqs
               + offs_r[:, None] * stride_dqs + offs_d[None, :])
    tl.store(dq_ptrs, to_dtype(dq, DQ.dtype.element_ty, ROUND_BF16), mask=ok)


def fa2_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    causal_offset: int,
    interpret: bool = False,
    configs: tuple[KernelConfig, KernelConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the FA2 backward. Shapes as :func:`fa2_forward`; ``dout`` like ``out``.

    Returns ``dq`` (B, Sq, H, D), ``dk``/``dv`` (B, Sk, H_kv, D), all contiguous.
    """
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, sk, h_kv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, h_kv, d), dtype=v.dtype, device=q.device)
    delta = torch.empty((b, h, sq), dtype=acc_dtype, device=q.device)
    lse2 = torch.empty_like(delta)
    flags = kernel_flags(q, interpret)
    bd = block_d(d)
    dkdv_cfg, dq_cfg = configs or bwd_configs(q.dtype, d, causal, q.device, interpret)

    pre_m = 64 if interpret else 128
    _bwd_preprocess[(triton.cdiv(sq, pre_m), b * h)](
        out, dout, lse, dlse if dlse is not None else lse, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        h, sq,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_m, HAS_DLSE=dlse is not None, ACC_DTYPE=flags["ACC_DTYPE"],
    )
    scales = (*split_scale(softmax_scale * LOG2E), *split_scale(softmax_scale))
    common = dict(HEAD_DIM=d, BLOCK_D=bd, IS_CAUSAL=causal, EVEN_D=(d == bd), **flags)
    _bwd_dkdv_kernel[(triton.cdiv(sk, dkdv_cfg.block_n), b * h_kv)](
        q, k, v, dout, lse2, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        h, h_kv, h // h_kv, sq, sk, causal_offset, *scales,
        BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
        num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages, **common,
    )
    _bwd_dq_kernel[(triton.cdiv(sq, dq_cfg.block_m), b * h)](
        q, k, v, dout, lse2, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, h // h_kv, sq, sk, causal_offset, *scales,
        BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **common,
    )
    return dq, dk, dv
