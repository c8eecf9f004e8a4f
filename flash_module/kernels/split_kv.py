"""The seed's tiling softmax applied to attention: split-KV ("flash-decoding") forward.

The key sequence is cut into ``num_splits`` chunks processed by independent programs, grid
(cdiv(Sq, BLOCK_M), B * H, num_splits).  Each program runs FA2's inner loop over its chunk only
and writes a *partial* result: the chunk-normalised output O_c and the chunk's log-sum-exp
lse_c (its local max and sum folded together; -inf for a chunk the row cannot see).

A combine kernel then merges the chunks exactly as the tiling softmax does, with the global max
M = max_c lse_c:

    w_c = exp(lse_c - M),   O = sum_c w_c O_c / sum_c w_c,   lse = M + log(sum_c w_c)

With one query row and 64k keys, this spreads the keys over the whole GPU instead of one
program per (batch, head).  For decode with GQA (Sq x group <= 64 rows) one tile holds all the
query heads that share a K/V head, so each K/V block is read once per group, not once per
query head.  The backward is FA2's, driven by the merged LSE.
"""

import torch
import triton
import triton.language as tl

from ..configs import split_kv_config
from ._common import LN2, LOG2E, LOG2E_C, kv_range, split_scale, to_dtype
from .fa2_fwd import _fwd_inner, block_d, kernel_flags


@triton.jit
def _split_kv_fwd_kernel(
    Q, K, V, OPart, LsePart,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    H, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, chunk, part_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, PACK_GQA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    if PACK_GQA:
        # Decode: the tile's rows are (query head of the group, query position) pairs, so the
        # GROUP query heads sharing a K/V head read each K/V block once, together.
        off_b = (pid_bh // (H // GROUP)).to(tl.int64)
        off_hkv = (pid_bh % (H // GROUP)).to(tl.int64)
        g = offs_r // Sq
        offs_m = offs_r % Sq  # query positions, for the causal mask
        row_ok = g < GROUP
        heads = off_hkv * GROUP + g.to(tl.int64)
        start_m = 0
        q_ptrs = Q + off_b * stride_qb + heads[:, None] * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        out_rows = (off_b * H + heads) * Sq + offs_m  # row index into (B*H*Sq)
    else:
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        off_hkv = off_h // GROUP
        start_m = pid_m * BLOCK_M
        offs_m = start_m + offs_r
        row_ok = offs_m < Sq
        q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qs
                  + offs_r[:, None] * stride_qs + offs_d[None, :])
        out_rows = pid_bh.to(tl.int64) * Sq + offs_m
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    # The row block's key ranges (as in FA2), intersected with this split's chunk.  (Packed
    # rows span positions [0, Sq) <= BLOCK_M, so kv_range's bounds still cover them; the
    # masked loop applies the exact per-row mask.)
    n_full, hi = kv_range(start_m, Sk, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    c_lo = split * chunk
    c_hi = c_lo + chunk
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs,
        tl.minimum(c_lo, n_full), tl.minimum(c_hi, n_full), offs_m, Sk, causal_offset,
        qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, False, IS_CAUSAL, EVEN_D,
        DOT_PRECISION, UPCAST, EXACT)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs,
        tl.maximum(c_lo, n_full), tl.minimum(c_hi, hi), offs_m, Sk, causal_offset,
        qk_scale, qk_scale_lo, HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_D,
        DOT_PRECISION, UPCAST, EXACT)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * tl.full([], LN2, ACC_DTYPE), float("-inf"))
    part = split.to(tl.int64) * part_stride
    o_ptrs = OPart + (part + out_rows[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LsePart + part + out_rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    OPart, LsePart, Out, Lse,
    stride_ob, stride_os, stride_oh,
    H, Sq, num_splits, part_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    row_base = pid_bh.to(tl.int64) * Sq
    log2e = tl.full([], LOG2E_C, ACC_DTYPE)
    # Pass 1: the global max over the chunks' LSEs.
    big_m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    for c in range(num_splits):
        lse_c = tl.load(LsePart + tl.cast(c, tl.int64) * part_stride + row_base + offs_m, mask=row_ok,
                        other=float("-inf"))
        big_m = tl.maximum(big_m, lse_c)
    m_sub = tl.where(big_m == float("-inf"), 0.0, big_m)
    # Pass 2: weights exp(lse_c - M), weighted sum of the chunk outputs.
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    total = tl.zeros([BLOCK_M], ACC_DTYPE)
    for c in range(num_splits):
        lse_c = tl.load(LsePart + tl.cast(c, tl.int64) * part_stride + row_base + offs_m, mask=row_ok,
                        other=float("-inf"))
        w = tl.math.exp2((lse_c - m_sub) * log2e)  # 0 for chunks the row cannot see
        o_c = tl.load(OPart + (tl.cast(c, tl.int64) * part_stride + row_base + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
                      mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * o_c
        total += w
    seen = total > 0
    t_safe = tl.where(seen, total, 1.0)
    out = acc / t_safe[:, None]
    lse = tl.where(seen, big_m + tl.math.log2(t_safe) * tl.full([], LN2, ACC_DTYPE), float("-inf"))
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(o_ptrs, to_dtype(out, Out.dtype.element_ty, ROUND_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + row_base + offs_m, lse, mask=row_ok)


def auto_num_splits(programs: int, sk: int, block_n: int, device: torch.device, interpret: bool) -> int:
    """Splits so that ~4 programs run per SM (memory-bound: many loads in flight), each chunk at
    least 2 key blocks long.

    Uses only shapes and the device's SM count: no tensor values, no host sync.
    """
    sms = 4 if (interpret or device.type != "cuda") else torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(4 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(sk, 2 * block_n), 256))


def split_kv_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
    causal_offset: int, num_splits: int = 0, interpret: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV forward; same contract as :func:`..fa2_fwd.fa2_forward`.

    ``num_splits=0`` picks the count from the SM count, B·H·cdiv(Sq, BLOCK_M) and Sk.
    """
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = block_d(d)
    flags = kernel_flags(q, interpret)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = h // h_kv
    cfg = split_kv_config(q.dtype, d, sq, q.device, interpret)
    pack = group > 1 and sq * group <= 64  # decode with GQA: one tile per K/V head
    block_m = max(16, triton.next_power_of_2(sq * group)) if pack else cfg.block_m
    m_blocks = 1 if pack else triton.cdiv(sq, block_m)
    heads = h_kv if pack else h
    if num_splits <= 0:
        num_splits = auto_num_splits(m_blocks * b * heads, sk, cfg.block_n, q.device, interpret)
    # Chunks are whole key blocks, so the unmasked/masked split of each chunk stays aligned.
    chunk = triton.cdiv(triton.cdiv(sk, num_splits), cfg.block_n) * cfg.block_n
    num_splits = triton.cdiv(sk, chunk)
    o_part = torch.empty((num_splits, b * h, sq, bd), dtype=acc, device=q.device)
    lse_part = torch.empty((num_splits, b * h, sq), dtype=acc, device=q.device)
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=acc, device=q.device)
    _split_kv_fwd_kernel[(m_blocks, b * heads, num_splits)](
        q, k, v, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, group, sq, sk, causal_offset, *split_scale(softmax_scale * LOG2E), chunk, b * h * sq,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal,
        EVEN_D=(d == bd), PACK_GQA=pack, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    comb_m = 16 if sq <= 16 else 64
    _combine_kernel[(triton.cdiv(sq, comb_m), b * h)](
        o_part, lse_part, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        h, sq, num_splits, b * h * sq,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=comb_m, ACC_DTYPE=flags["ACC_DTYPE"], ROUND_BF16=flags["ROUND_BF16"],
    )
    return out, lse
