"""FlashAttention-2 backward (Algorithm 2 of the FA2 paper) in Triton, deterministic.

Three launches, none of them with atomics:

1. :func:`._common.bwd_preprocess`: per query row ``delta = rowsum(dO * O) - dlse`` and
   ``lse2 = lse * log2(e)`` (``+inf`` for rows that saw no key, so ``P`` is 0 there, not NaN).
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

from .._runtime import acc_dtype, cdiv
from ..configs import KernelConfig, bwd_configs
from . import _common, gluon_bwd
from ._common import (
    dkdv_block,
    dq_block,
    drop_row_base,
    drop_seed_of,
    head_slope,
    program_bh,
    stats_head,
)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Stats, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    H, H_KV, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    sm_scale, sm_scale_lo, win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo,
    Mask, stride_mb, stride_mh, stride_mi, stride_mj,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    # GROUP (= H / H_KV) is an argument, not computed here: Triton specialises an int argument
    # equal to 1, so without GQA the head loop below disappears (measured: computing it in the
    # kernel made the causal dK/dV pass 25% slower on an H100).
    off_b, off_hkv = program_bh(H_KV)
    kv_base = (off_b * Sk * H_KV + off_hkv) * HEAD_DIM  # DK and DV: new contiguous (B, Sk, H_kv, D)
    dkdv_block(
        K + off_b * stride_kb + off_hkv * stride_kh, V + off_b * stride_vb + off_hkv * stride_vh,
        Q + off_b * stride_qb, DO + off_b * stride_dob, stats_head(Stats, off_b, 0, H, stats_len),
        DK + kv_base, DV + kv_base, stride_ks, stride_vs, stride_qs, stride_qh, stride_dos, stride_doh, stats_len,
        H_KV * HEAD_DIM, off_hkv, GROUP, tl.program_id(0) * BLOCK_N, Sq, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo,
        cap2, cap2_lo, Alibi + off_b * stride_ab, stride_ah, sm_scale, sm_scale_lo,
        drop_seed_of(Rng, DROPOUT), drop_row_base(off_b * H) + drop_row_off, drop_row_base(1), drop_col_off, drop_thresh, drop_scale, drop_scale_lo, Mask + off_b * stride_mb,
        stride_mh, stride_mi, stride_mj, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, IS_CAUSAL, ACC_DTYPE, SOFTCAP, ALIBI, WINDOW,
        DROPOUT, MASK)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Stats, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    H, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    sm_scale, sm_scale_lo, win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo,
    Mask, stride_mb, stride_mh, stride_mi, stride_mj, DMask, stride_dmb, stride_dmh, stride_dmi, stride_dmj,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
):
    off_b, off_h = program_bh(H)
    off_hkv = off_h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    dq_block(
        Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh,
        stats_head(Stats, off_b, off_h, H, stats_len), K + off_b * stride_kb + off_hkv * stride_kh,
        V + off_b * stride_vb + off_hkv * stride_vh, DQ + (off_b * Sq * H + off_h) * HEAD_DIM,  # new contiguous
        stride_qs, stride_dos, stats_len, stride_ks, stride_vs, H * HEAD_DIM, start_m, Sq, Sk, causal_offset, win_l, win_r,
        qk_scale, qk_scale_lo, cap2, cap2_lo, head_slope(Alibi + off_b * stride_ab, off_h, stride_ah, ACC_DTYPE, ALIBI),
        sm_scale, sm_scale_lo, drop_seed_of(Rng, DROPOUT), drop_row_base(off_b * H + off_h) + drop_row_off, drop_col_off, drop_thresh,
        Mask + off_b * stride_mb + off_h * stride_mh, stride_mi, stride_mj, Sq, Sk, drop_scale, drop_scale_lo,
        DMask + off_b * stride_dmb + off_h * stride_dmh, stride_dmi, stride_dmj, HEAD_DIM,
        BLOCK_M, BLOCK_N, BLOCK_D, IS_CAUSAL, ACC_DTYPE, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK, MASK_GRAD)


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
    configs: tuple[KernelConfig, KernelConfig] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    mask_grad: bool = False,
    drop_offsets: tuple[int, int] = (0, 0),
    deterministic: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the FA2 backward. Shapes as :func:`.fa2_fwd.fa2_forward`; ``dout`` like ``out``;
    ``softcap``, ``alibi_slopes``, ``window_size``, ``dropout_p``, ``rng``, ``attn_mask`` and
    ``drop_offsets`` as the forward had them (the same seed regenerates the same dropout mask).

    Returns ``dq`` (B, Sq, H, D), ``dk``/``dv`` (B, Sk, H_kv, D), all contiguous; with
    ``mask_grad`` (a float ``attn_mask``) also the mask's gradient, shaped like the mask and in
    the accumulator dtype: dS summed over the dims the mask broadcasts, added up by the dQ
    kernel (:func:`._common.mask_grad_add`; atomics, so a broadcast mask's sums are not
    bitwise reproducible).  ``deterministic``: never the one-pass Gluon backward, whose dQ is a
    sum of atomics (``gluon_bwd.FUSED_DQ``); every other path is bitwise reproducible anyway.
    """
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    dq = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, sk, h_kv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, h_kv, d), dtype=v.dtype, device=q.device)
    stats = _common.bwd_preprocess(out, dout, lse, dlse)
    dkdv_cfg, dq_cfg = configs or bwd_configs(q.dtype, d, q.device)
    causal_in = causal
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    mask = _common.mask_args(attn_mask, (b, h, sq, sk), q)
    args = _common.bsh_strides(q, k, v, dout)
    scales = (*_common.qk_scale(softmax_scale, softcap), *_common.alibi_args(alibi_slopes, q),
              *_common.split_scale(softmax_scale), win_l, win_r, *_common.dropout_args(dropout_p, rng, q, drop_offsets),
              *mask[:5])
    common = dict(HEAD_DIM=d, BLOCK_D=_common.block_d(d), IS_CAUSAL=causal, SOFTCAP=bool(softcap),
                  ALIBI=alibi_slopes is not None, WINDOW=window, DROPOUT=bool(dropout_p), MASK=mask[5],
                  **_common.kernel_flags(q))
    # Hopper: the Gluon passes (same results) for plain attention and, with gluon_bwd.VARIANTS,
    # softcap, ALiBi and windows (dropout too at gluon_bwd.dropout_takes); masks and explicit
    # launch configs (tuning, their tests) take the portable kernels
    variants = bool(softcap or window or dropout_p) or alibi_slopes is not None
    portable_only = bool(configs) or mask[5] != 0 or (variants and not gluon_bwd.VARIANTS) or (
        bool(dropout_p) and not gluon_bwd.dropout_takes(d))
    gluon = gluon_bwd.supported(q, k, v, dout, portable_only)
    drop = dict(dropout_p=dropout_p, rng=rng, drop_offsets=drop_offsets)
    if gluon and gluon_bwd.fused_dq_takes(d, deterministic):  # one pass: dQ added up in fp32 (TMA adds)
        dq_acc = torch.zeros((b, sq, h, d), dtype=torch.float32, device=q.device)
        gluon_bwd.dkdv(q, k, v, dout, stats, dk, dv, softmax_scale, causal_in, causal_offset, softcap=softcap,
                       alibi_slopes=alibi_slopes, window_size=window_size, dq_acc=dq_acc, **drop)
        return dq.copy_(dq_acc), dk, dv
    if gluon:
        gluon_bwd.dkdv(q, k, v, dout, stats, dk, dv, softmax_scale, causal_in, causal_offset, softcap=softcap,
                       alibi_slopes=alibi_slopes, window_size=window_size, **drop)
    else:
        _bwd_dkdv_kernel[(cdiv(sk, dkdv_cfg.block_n), b * h_kv)](
            q, k, v, dout, stats, dk, dv, *args, h, h_kv, h // h_kv, sq, sk, causal_offset, stats.shape[-1],
            *scales, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
            num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages, **common,
        )
    if gluon and gluon_bwd.dq_takes(d, variants):
        gluon_bwd.dq(q, k, v, dout, stats, dq, softmax_scale, causal_in, causal_offset, softcap=softcap,
                     alibi_slopes=alibi_slopes, window_size=window_size, **drop)
        return dq, dk, dv
    dmask, dmask_args = _mask_grad_args(attn_mask if mask_grad else None, (b, h, sq, sk), q)
    _bwd_dq_kernel[(cdiv(sq, dq_cfg.block_m), b * h)](
        q, k, v, dout, stats, dq, *args, h, h // h_kv, sq, sk, causal_offset, stats.shape[-1], *scales,
        *dmask_args[:5], BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, MASK_GRAD=dmask_args[5],
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **common,
    )
    if mask_grad:
        return dq, dk, dv, dmask
    return dq, dk, dv


def _mask_grad_args(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int],
                    like: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
    """The zeroed gradient buffer of a 4-D float mask broadcastable to ``shape`` (B, H, Sq, Sk),
    in the accumulator dtype, and the dQ kernel's ``(DMask, stride_b, stride_h, stride_i,
    stride_j, MASK_GRAD)`` for it: stride 0 where the mask broadcasts over batch or heads, and
    the kind of :func:`._common.mask_grad_add` for broadcast rows / keys.  Without a mask: a
    stand-in pointer and kind 0."""
    if attn_mask is None:
        return None, (like, 0, 0, 0, 0, 0)
    dmask = torch.zeros(attn_mask.shape, dtype=acc_dtype(like.dtype), device=like.device)
    strides = [0 if attn_mask.shape[i] == 1 else dmask.stride(i) for i in range(4)]
    rows_b, keys_b = attn_mask.shape[2] == 1 and shape[2] > 1, attn_mask.shape[3] == 1 and shape[3] > 1
    kind = 4 if rows_b and keys_b else 2 if rows_b else 3 if keys_b else 1
    return dmask, (dmask, *strides, kind)
