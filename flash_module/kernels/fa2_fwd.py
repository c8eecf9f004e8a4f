"""FlashAttention-2 forward (Algorithm 1 of the FA2 paper) in Triton.

Grid: (cdiv(Sq, BLOCK_M), B * H).  Each program owns one query block of one head and streams
every visible K/V block past it, keeping the output accumulator, the running max ``m`` and the
running sum ``l`` in registers.  It writes O once, normalised, and the row log-sum-exp
``lse = m + log(l)`` (natural log) that the backward uses to recompute P.

Loop split: key blocks that every row of the query block sees, and that lie inside Sk, run
without any mask (the hot loop); the few blocks on the causal diagonal or at the ragged end of
Sk run a second, masked copy of the same loop.
"""

import torch
import triton
import triton.language as tl

from ..configs import KernelConfig, fwd_config
from ._common import LN2, LOG2E, kv_range, mma, scaled, split_scale, to_dtype


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    K_head, V_head, stride_ks, stride_vs,
    n_start, n_end, offs_m, Sk, causal_offset, qk_scale, qk_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXACT: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Block-relative offsets stay int32; the int64 part lives in the advancing base pointers.
    k_ptrs = K_head + tl.cast(n_start, tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V_head + tl.cast(n_start, tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(n_start, n_end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_ok = (cols[:, None] < Sk) & d_ok
        else:
            kv_ok = d_ok
        if EVEN_D and not MASKED:
            k = tl.load(k_ptrs)  # (BLOCK_N, BLOCK_D)
        else:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], acc.dtype), DOT_PRECISION, UPCAST)
        s = scaled(s, qk_scale, qk_scale_lo, EXACT)  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            ok = cols[None, :] < Sk
            if IS_CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps m = -inf; subtract 0 instead (no NaN).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_sub)  # rescale of what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EVEN_D and not MASKED:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        acc = mma(p, v, acc, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _fa2_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP  # GQA: the K/V head this query head reads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_m[:, None] < Sq

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qs
              + offs_r[:, None] * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok & d_ok, other=0.0)  # (BLOCK_M, BLOCK_D), stays on chip
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)  # unnormalised O
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)  # running sum of exp2(s - m)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # running max (log2 domain)

    n_full, hi = kv_range(start_m, Sk, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, 0, n_full, offs_m, Sk,
        causal_offset, qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, False, IS_CAUSAL, EVEN_D,
        DOT_PRECISION, UPCAST, EXACT)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, n_full, hi, offs_m, Sk,
        causal_offset, qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_D,
        DOT_PRECISION, UPCAST, EXACT)

    # Epilogue: O = acc / l; rows that saw no key get O = 0 and LSE = -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * tl.full([], LN2, ACC_DTYPE), float("-inf"))
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_os
              + offs_r[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, to_dtype(out, Out.dtype.element_ty, ROUND_BF16), mask=row_ok & d_ok)
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


def kernel_flags(q: torch.Tensor, interpret: bool) -> dict:
    """Compile-time flags that depend on the dtype: accumulator, dot precision, interpreter fixes."""
    fp64 = q.dtype == torch.float64
    low = q.dtype in (torch.float16, torch.bfloat16)
    return dict(
        ACC_DTYPE=tl.float64 if fp64 else tl.float32,
        DOT_PRECISION="ieee" if not low else "tf32",
        UPCAST=bool(interpret and low),
        ROUND_BF16=bool(interpret and q.dtype == torch.bfloat16),
        EXACT=fp64,
    )


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(head_dim))


def fa2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    causal_offset: int,
    interpret: bool = False,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the FA2 forward. q (B, Sq, H, D), k/v (B, Sk, H_kv, D), any strides, last dim 1.

    Returns ``out`` (B, Sq, H, D) contiguous in q's dtype and ``lse`` (B, H, Sq) float32
    (float64 for float64 inputs).
    """
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    cfg = config or fwd_config(q.dtype, d, causal, q.device, interpret)
    grid = (triton.cdiv(sq, cfg.block_m), b * h)
    _fa2_fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, sq, sk, causal_offset, *split_scale(softmax_scale * LOG2E),
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_CAUSAL=causal, EVEN_D=(d == block_d(d)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **kernel_flags(q, interpret),
    )
    return out, lse
