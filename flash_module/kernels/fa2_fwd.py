"""FlashAttention-2 forward (Algorithm 1 of the FA2 paper) in Triton.

Grid: (cdiv(Sq, BLOCK_M), B * H).  Each program owns one query block of one head and streams
every visible K/V block past it, keeping the output accumulator, the running max ``m`` and the
running sum ``l`` in registers.  It writes O once, normalised, and the row log-sum-exp
``lse = m + log(l)`` (natural log) that the backward uses to recompute P.

Loop split: key blocks that every row of the query block sees, and that lie inside Sk, run
without any mask (the hot loop); the few blocks on the causal diagonal or at the ragged end of
Sk run a second, masked copy of the same loop.

The loop itself is :func:`._common.attend_kv`, shared with the split-KV kernel (which runs it
over one chunk of the keys).  On Hopper, plain attention (no variant) runs the same algorithm
written in Gluon instead (:mod:`.gluon_fwd`: the softmax overlapped with the P V matmul).
"""

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, lse_dtype
from ..configs import KernelConfig, fwd_config
from . import _common, gluon_fwd
from ._common import (
    add_sink,
    attend_rows,
    drop_row_base,
    drop_seed_of,
    head_slope,
    load_tile,
    lse_epilogue,
    program_bh,
    scaled,
    store_tile,
    tile_ptrs,
)


@triton.jit
def _fa2_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    H, GROUP, Sq, Sk, causal_offset, win_l, win_r, Sink, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo, Mask, stride_mb, stride_mh, stride_mi, stride_mj,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, SINK: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    off_b, off_h = program_bh(H)
    off_hkv = off_h // GROUP  # GQA: the K/V head this query head reads
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)

    q_ptrs = tile_ptrs(Q + off_b * stride_qb + off_h * stride_qh, start_m, stride_qs, BLOCK_M, BLOCK_D)
    q = load_tile(q_ptrs, rows, Sq, HEAD_DIM, True)  # (BLOCK_M, BLOCK_D), stays on chip
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh
    slope2 = head_slope(Alibi + off_b * stride_ab, off_h, stride_ah, ACC_DTYPE, ALIBI) + tl.zeros([BLOCK_M], ACC_DTYPE)

    acc, l_i, m_i = attend_rows(q, K_head, V_head, stride_ks, stride_vs, rows, start_m, Sk, causal_offset, win_l,
                                win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2, K, 0, 0, 0, 0,
                                drop_seed_of(Rng, DROPOUT), drop_row_base(off_b * H + off_h) + drop_row_off, drop_col_off, drop_thresh,
                                Mask + off_b * stride_mb + off_h * stride_mh, stride_mi, stride_mj, Sq, Sk, HEAD_DIM,
                                BLOCK_N, IS_CAUSAL, ACC_DTYPE, False, 1, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)

    acc, l_i, m_i = add_sink(acc, l_i, m_i, Sink, off_h, SINK)
    l_safe, lse = lse_epilogue(l_i, m_i, Q.dtype.element_ty == tl.float32)
    # Out is a new contiguous (B, Sq, H, D) tensor; Lse a contiguous (B, H, Sq) one.
    o_ptrs = tile_ptrs(Out + (off_b * Sq * H + off_h) * HEAD_DIM, start_m, H * HEAD_DIM, BLOCK_M, BLOCK_D)
    o = acc / l_safe[:, None]
    if DROPOUT:
        o = scaled(o, drop_scale, drop_scale_lo)  # the kept probabilities, times 1 / (1 - p)
    store_tile(o_ptrs, o, rows, Sq, HEAD_DIM)
    tl.store(Lse + (off_b * H + off_h) * Sq + rows, lse, mask=rows < Sq)


def fa2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    causal_offset: int,
    config: KernelConfig | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    drop_offsets: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the FA2 forward. q (B, Sq, H, D), k/v (B, Sk, H_kv, D), any strides, last dim 1;
    ``softcap`` > 0 caps the scaled scores at ``softcap * tanh(s / softcap)``; ``alibi_slopes``
    (fp32 (H,) or (B, H)) adds ``-slope * |i + causal_offset - j|``; ``window_size`` (left, right)
    limits query i to keys [i + causal_offset - left, i + causal_offset + right] (-1: unbounded;
    causal sets right = 0), skipping the key blocks outside; ``sink`` (fp32 (H,)): each head's
    attention-sink logit joins the softmax denominator (:func:`._common.add_sink`);
    ``dropout_p`` > 0 drops probabilities with the Philox mask keyed by ``rng`` (an int64 (1,)
    device tensor; :func:`._common.dropout_keep`; ``drop_offsets``: the rows' and keys' place in
    a longer sequence's mask, :func:`._common.dropout_args`) and rescales the kept ones by 1 / (1 - p);
    ``attn_mask`` (bool or float, broadcastable to (B, H, Sq, Sk)) is SDPA's mask
    (:func:`._common.attn_mask`), read in place.

    Returns ``out`` (B, Sq, H, D) contiguous in q's dtype (or ``out_dtype``) and ``lse`` (B, H, Sq) in
    ``lse_dtype(q.dtype)`` (float32 for fp16/bf16, float64 for fp32/fp64).
    """
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, h, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=lse_dtype(q.dtype), device=q.device)
    causal_in = causal
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    # Hopper: the Gluon forward (masks and explicit configs: portable; dropout too unless
    # gluon_fwd.DROPOUT; softcap, ALiBi, sinks and windows too unless gluon_fwd.VARIANTS)
    portable_only = bool(config) or softmax_scale <= 0 or attn_mask is not None or (
        bool(dropout_p) and not gluon_fwd.DROPOUT) or (
        not gluon_fwd.VARIANTS and (bool(softcap or window) or alibi_slopes is not None or sink is not None))
    if gluon_fwd.supported(q, k, v, portable_only, masked=causal or window):
        gluon_fwd.forward(q, k, v, softmax_scale, causal_in, causal_offset, out, lse, softcap, alibi_slopes, sink,
                          window_size, dropout_p=dropout_p, rng=rng, drop_offsets=drop_offsets)
        return out, lse
    cfg = config or fwd_config(q.dtype, d, causal_in, q.device)  # (tuned per requested causality)
    mask = _common.mask_args(attn_mask, (b, h, sq, sk), q)
    _fa2_fwd_kernel[(cdiv(sq, cfg.block_m), b * h)](
        q, k, v, out, lse, *_common.bsh_strides(q, k, v),
        h, h // h_kv, sq, sk, causal_offset, win_l, win_r, _common.sink_args(sink, q),
        *_common.qk_scale(softmax_scale, softcap),
        *_common.alibi_args(alibi_slopes, q), *_common.dropout_args(dropout_p, rng, q, drop_offsets),
        *mask[:5], MASK=mask[5], HEAD_DIM=d, BLOCK_D=_common.block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal,
        SOFTCAP=bool(softcap), ALIBI=alibi_slopes is not None, WINDOW=window, SINK=sink is not None, DROPOUT=bool(dropout_p),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_common.kernel_flags(q),
    )
    return out, lse
