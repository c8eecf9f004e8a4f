"""FlashAttention-2 forward over packed variable-length sequences ("varlen"), in Triton.

The portable kernels of ``flash_attn_varlen_func`` (ops ``varlen_fwd`` / ``varlen_bwd``, issue
#12, docs/varlen.md): forward, backward, paged K/V.  On Hopper, fp16/bf16 calls without a paged
cache or dropout run the Gluon kernels instead (``gluon_fwd.varlen_forward``,
``gluon_bwd.varlen_dkdv`` / ``varlen_dq``), from the same work lists and statistics.

Layout (flash-attn's varlen layout): q (Tq, H, D), k and v (Tk, H_kv, D) hold B sequences back
to back; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v.  Causal masking is bottom-right per sequence
(query ``i`` of sequence ``b`` sees keys ``j <= i + len_k[b] - len_q[b]``).

No host synchronisation: the grid is a static bound, ``cdiv(Tq, BLOCK_M) + B`` programs per
head, computed from shapes.  A device-side prefix sum of the per-sequence query-block counts
(``cu_blocks``) is the work list; each program binary-searches it for its sequence and block,
and programs past the last block return at once.  Offsets read from ``cu_seqlens`` are clamped
to the tensors, so wrong values give wrong answers, never out-of-bounds accesses.
"""

import torch
import triton
import triton.language as tl

from .._runtime import acc_dtype, cdiv, lse_dtype
from ..configs import bwd_configs, fwd_config
from . import _common, gluon_bwd, gluon_fwd
from ._common import (
    add_sink,
    attend_rows,
    dkdv_block,
    dq_block,
    drop_row_base,
    drop_seed_of,
    head_slope,
    load_tile,
    lse_epilogue,
    preprocess_rows,
    scaled,
    store_row_stats,
    store_tile,
    tile_ptrs,
    work_item,
)


@triton.jit
def seq_stats(Stats, CuStats, b, off_h, stats_len):
    """Where sequence ``b``'s rows of head ``off_h``'s (3, stats_len) statistics start: each
    sequence starts at a multiple of 16 (``CuStats`` counts 16-row groups), so the kernels load
    them as vectors whatever the lengths are."""
    return Stats + off_h * 3 * stats_len + tl.load(CuStats + b).to(tl.int64) * 16


@triton.jit
def _varlen_preprocess_kernel(
    Out, DOut, Lse, DLse, Stats, CuQ, CuBlocks, CuStats, stride_os, stride_oh, stride_dos, stride_doh, B, H, Tq,
    stats_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, LOG_B: tl.constexpr,
    HAS_DLSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The backward's row statistics (:func:`._common.bwd_preprocess`) of one query block of one
    sequence, written at the sequence's aligned place (:func:`seq_stats`)."""
    off_h = tl.program_id(1).to(tl.int64)
    valid, q_start, len_q, _, _, start_m, b = work_item(CuQ, CuQ, CuQ, CuBlocks, B, Tq, Tq, BLOCK_M, LOG_B, False)
    if valid:
        rows = start_m + tl.arange(0, BLOCK_M)
        o_ptrs = tile_ptrs(Out + q_start * stride_os + off_h * stride_oh, start_m, stride_os, BLOCK_M, BLOCK_D)
        do_ptrs = tile_ptrs(DOut + q_start * stride_dos + off_h * stride_doh, start_m, stride_dos, BLOCK_M, BLOCK_D)
        lse_row = off_h * Tq + q_start  # Lse (and DLse): contiguous (H, Tq)
        hi, delta, lo = preprocess_rows(o_ptrs, do_ptrs, Lse + lse_row, DLse + lse_row, rows, len_q, HEAD_DIM,
                                        HAS_DLSE, ACC_DTYPE)
        store_row_stats(seq_stats(Stats, CuStats, b, off_h, stats_len), stats_len, rows, len_q, hi, delta, lo)


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, SeqUsedK, CuBlocks, BlockTable,
    stride_qs, stride_qh, stride_kpage, stride_ks, stride_kh, stride_vpage, stride_vs, stride_vh, stride_bt,
    B, H, GROUP, Tq, Tk, num_pages, n_table, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    win_l, win_r, Sink, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LOG_B: tl.constexpr, HAS_SEQUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    SINK: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Varlen forward.  With ``PAGED``, K/V are a paged cache (num_pages, PAGE, H_kv, D): key
    ``n`` of sequence ``b`` is row ``n % PAGE`` of page ``BlockTable[b, n // PAGE]``; the key
    lengths still come from ``CuK`` (and ``SeqUsedK``), clamped to the table's ``n_table`` keys."""
    off_h = tl.program_id(1).to(tl.int64)
    off_hkv = off_h // GROUP
    valid, q_start, len_q, k_start, len_k, start_m, b = work_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_M,
                                                                  LOG_B, HAS_SEQUSED)
    if PAGED:
        len_k = tl.minimum(len_k, n_table)
    if valid:  # programs past the last query block have nothing to do
        causal_offset = len_k - len_q  # bottom-right, per sequence
        rows = start_m + tl.arange(0, BLOCK_M)

        q_ptrs = tile_ptrs(Q + q_start * stride_qs + off_h * stride_qh, start_m, stride_qs, BLOCK_M, BLOCK_D)
        q = load_tile(q_ptrs, rows, len_q, HEAD_DIM, True)  # (BLOCK_M, BLOCK_D)
        K_head = K + off_hkv * stride_kh
        V_head = V + off_hkv * stride_vh
        if not PAGED:
            K_head += k_start * stride_ks
            V_head += k_start * stride_vs

        slope2 = head_slope(Alibi + b * stride_ab, off_h, stride_ah, ACC_DTYPE, ALIBI) + tl.zeros([BLOCK_M], ACC_DTYPE)
        acc, l_i, m_i = attend_rows(q, K_head, V_head, stride_ks, stride_vs, rows, start_m, len_k, causal_offset,
                                    win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
                                    BlockTable + b * stride_bt, stride_kpage, stride_vpage, num_pages, n_table,
                                    drop_seed_of(Rng, DROPOUT), drop_row_base(b * H + off_h) + drop_row_off, drop_col_off, drop_thresh, Q, 0, 0, 0, 0,
                                    HEAD_DIM, BLOCK_N, IS_CAUSAL, ACC_DTYPE, PAGED, PAGE, SOFTCAP, ALIBI, WINDOW, DROPOUT,
                                    0)

        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sink, off_h, SINK)
        l_safe, lse = lse_epilogue(l_i, m_i, Q.dtype.element_ty == tl.float32)
        # Out is a new contiguous (Tq, H, D) tensor, Lse a contiguous (H, Tq) one.
        o_ptrs = tile_ptrs(Out + (q_start * H + off_h) * HEAD_DIM, start_m, H * HEAD_DIM, BLOCK_M, BLOCK_D)
        o = acc / l_safe[:, None]
        if DROPOUT:
            o = scaled(o, drop_scale, drop_scale_lo)  # the kept probabilities, times 1 / (1 - p)
        store_tile(o_ptrs, o, rows, len_q, HEAD_DIM)
        tl.store(Lse + off_h * Tq + q_start + rows, lse, mask=rows < len_q)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    Q, K, V, DO, Stats, DK, DV, CuQ, CuK, SeqUsedK, CuBlocks, CuStats,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_dos, stride_doh,
    B, H_KV, GROUP, Tq, Tk, stats_len, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    sm_scale, sm_scale_lo, win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LOG_B: tl.constexpr, HAS_SEQUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dK/dV of one key block of one sequence (work list over key blocks), every query head of
    its group summed in registers; the loops are FA2's (:func:`._common.dkdv_loop`)."""
    off_hkv = tl.program_id(1).to(tl.int64)
    valid, q_start, len_q, k_start, len_k, start_n, b = work_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_N,
                                                                  LOG_B, HAS_SEQUSED)
    if valid & (start_n < len_k):  # key blocks past seqused_k keep their zero gradients
        kv_base = (k_start * H_KV + off_hkv) * HEAD_DIM  # DK and DV: new contiguous (Tk, H_kv, D)
        dkdv_block(
            K + k_start * stride_ks + off_hkv * stride_kh, V + k_start * stride_vs + off_hkv * stride_vh,
            Q + q_start * stride_qs, DO + q_start * stride_dos, seq_stats(Stats, CuStats, b, 0, stats_len),
            DK + kv_base, DV + kv_base, stride_ks, stride_vs, stride_qs, stride_qh, stride_dos, stride_doh,
            stats_len, H_KV * HEAD_DIM, off_hkv, GROUP, start_n, len_q, len_k, len_k - len_q, win_l, win_r, qk_scale,
            qk_scale_lo, cap2, cap2_lo, Alibi + b * stride_ab, stride_ah, sm_scale, sm_scale_lo,
            drop_seed_of(Rng, DROPOUT), drop_row_base(b * H_KV * GROUP) + drop_row_off, drop_row_base(1), drop_col_off, drop_thresh, drop_scale, drop_scale_lo, Q, 0, 0, 0, HEAD_DIM,
            BLOCK_M, BLOCK_N, BLOCK_D, IS_CAUSAL, ACC_DTYPE, SOFTCAP, ALIBI, WINDOW, DROPOUT, 0)


@triton.jit
def _varlen_bwd_dq_kernel(
    Q, K, V, DO, Stats, DQ, CuQ, CuK, SeqUsedK, CuBlocks, CuStats,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_dos, stride_doh,
    B, H, GROUP, Tq, Tk, stats_len, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab, stride_ah,
    sm_scale, sm_scale_lo, win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LOG_B: tl.constexpr, HAS_SEQUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dQ of one query block of one sequence (work list over query blocks, as the forward)."""
    off_h = tl.program_id(1).to(tl.int64)
    off_hkv = off_h // GROUP
    valid, q_start, len_q, k_start, len_k, start_m, b = work_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_M,
                                                                  LOG_B, HAS_SEQUSED)
    if valid:
        dq_block(
            Q + q_start * stride_qs + off_h * stride_qh, DO + q_start * stride_dos + off_h * stride_doh,
            seq_stats(Stats, CuStats, b, off_h, stats_len), K + k_start * stride_ks + off_hkv * stride_kh,
            V + k_start * stride_vs + off_hkv * stride_vh, DQ + (q_start * H + off_h) * HEAD_DIM,  # contiguous
            stride_qs, stride_dos, stats_len, stride_ks, stride_vs, H * HEAD_DIM, start_m, len_q, len_k,
            len_k - len_q, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo,
            head_slope(Alibi + b * stride_ab, off_h, stride_ah, ACC_DTYPE, ALIBI), sm_scale, sm_scale_lo,
            drop_seed_of(Rng, DROPOUT), drop_row_base(b * H + off_h) + drop_row_off, drop_col_off, drop_thresh, Q, 0, 0, 0, 0, drop_scale, drop_scale_lo,
            Q, 0, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, IS_CAUSAL, ACC_DTYPE, SOFTCAP, ALIBI, WINDOW, DROPOUT, 0, 0)


def work_list(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """``cu_blocks`` (B + 1,) int32: prefix sums of each sequence's block count, on the device
    (torch ops, no host sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=0)
    blocks = torch.div(lens + (block - 1), block, rounding_mode="floor")
    return torch.cat([blocks.new_zeros(1), torch.cumsum(blocks, 0)]).to(torch.int32)


def varlen_launch_meta(cu_seqlens_q, cu_seqlens_k, seqused_k):
    """Kernel arguments shared by every varlen launch: the metadata pointers (``seqused_k`` or a
    stand-in that is never read), B, and the constexprs that depend on them."""
    b = cu_seqlens_q.numel() - 1
    flags = dict(LOG_B=max(1, b.bit_length()), HAS_SEQUSED=seqused_k is not None)
    return (cu_seqlens_q, cu_seqlens_k, seqused_k if seqused_k is not None else cu_seqlens_k), b, flags


def varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1), sink: torch.Tensor | None = None, dropout_p: float = 0.0,
    rng: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen FA2 forward (``window_size`` per sequence, bottom-right aligned like causal;
    ``sink`` (H,) fp32 attention-sink logits; dropout as :func:`.fa2_fwd.fa2_forward`, the
    row counters of sequence b, head h, row i being ``(b * H + h) << 32 | i``).  q (Tq, H, D), k/v (Tk, H_kv, D) with a contiguous last dim;
    cu_seqlens_q/k (B + 1,) int32 on q's device; ``seqused_k`` (B,) int32 or None: sequence
    ``b`` uses only its first ``seqused_k[b]`` keys.  ``block_table`` (B, pages_per_seq) int32
    or None: k/v are a paged cache (num_pages, page, H_kv, D) and sequence ``b``'s keys are its
    pages (``cu_seqlens_k`` still gives the key lengths).

    Returns ``out`` (Tq, H, D) in q's dtype (or ``out_dtype``) and ``lse`` (H, Tq) in ``lse_dtype(q.dtype)``;
    rows that belong to no sequence get out = 0 and lse = -inf.
    """
    tq, h, d = q.shape
    paged = block_table is not None
    h_kv = k.shape[-2]
    meta, b, flags = varlen_launch_meta(cu_seqlens_q, cu_seqlens_k, seqused_k)
    page = k.shape[1] if paged else 1
    n_table = block_table.shape[1] * page if paged else 0
    tk = b * n_table if paged else k.shape[0]  # the bound cu_seqlens_k is clamped to
    kv_strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)) if paged else \
        (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
    cfg = fwd_config(q.dtype, d, causal, q.device)
    out = torch.zeros((tq, h, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((h, tq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    programs = cdiv(tq, cfg.block_m) + b  # >= the total block count, from shapes only
    if b == 0 or programs == 0 or h == 0:  # no sequence: nothing to launch (work_item needs B >= 1)
        return out, lse
    # Hopper: the Gluon forward (a paged cache: portable; dropout too unless gluon_fwd.DROPOUT;
    # softcap, ALiBi, sinks and windows too unless gluon_fwd.VARIANTS)
    portable_only = paged or (bool(dropout_p) and not gluon_fwd.DROPOUT) or softmax_scale <= 0 or (
        not gluon_fwd.VARIANTS and (bool(softcap) or tuple(window_size) != (-1, -1) or alibi_slopes is not None
                                    or sink is not None))
    if gluon_fwd.varlen_supported(q, k, v, portable_only, b):
        gluon_fwd.varlen_forward(q, k, v, (meta, b, flags), work_list(cu_seqlens_q, gluon_fwd.varlen_block_m(d)),
                                 softmax_scale, causal, out, lse, softcap, alibi_slopes, sink, window_size, dropout_p,
                                 rng)
        return out, lse
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    _varlen_fwd_kernel[(programs, h)](
        q, k, v, out, lse, *meta, work_list(cu_seqlens_q, cfg.block_m), block_table if paged else cu_seqlens_k,
        q.stride(0), q.stride(1), *kv_strides, block_table.stride(0) if paged else 0,
        b, h, h // h_kv, tq, tk, k.shape[0], n_table, *_common.qk_scale(softmax_scale, softcap),
        *_common.alibi_args(alibi_slopes, q), win_l, win_r, _common.sink_args(sink, q),
        *_common.dropout_args(dropout_p, rng, q),
        HEAD_DIM=d, BLOCK_D=_common.block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal,
        PAGED=paged, PAGE=page, SOFTCAP=bool(softcap), ALIBI=alibi_slopes is not None, WINDOW=window, SINK=sink is not None,
        DROPOUT=bool(dropout_p), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **flags, **_common.kernel_flags(q),
    )
    return out, lse


def _varlen_preprocess(out, dout, lse, dlse, cu_seqlens_q, flags):
    """The (H, 3, stats_len) row statistics of the packed queries, sequence ``b`` starting at row
    ``16 * cu_stats[b]`` (``cu_stats``: prefix sums of cdiv(len_q, 16), on the device), and
    ``cu_stats``.  stats_len bounds the padded total from shapes alone: Tq + 15 B."""
    tq, h, d = out.shape
    b = cu_seqlens_q.numel() - 1
    cu_stats = work_list(cu_seqlens_q, 16)
    stats = torch.empty((h, 3, _common.stats_row_len(tq + 15 * b)), dtype=acc_dtype(out.dtype), device=out.device)
    block_m = 64 if _common._INTERPRET else 128
    _varlen_preprocess_kernel[(cdiv(tq, block_m) + b, h)](
        out, dout, lse, dlse if dlse is not None else lse, stats, cu_seqlens_q, work_list(cu_seqlens_q, block_m),
        cu_stats, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), b, h, tq, stats.shape[-1], HEAD_DIM=d, BLOCK_D=_common.block_d(d),
        BLOCK_M=block_m, LOG_B=flags["LOG_B"], HAS_DLSE=dlse is not None, **_common.kernel_flags(out),
    )
    return stats, cu_stats


def varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool,
    seqused_k: torch.Tensor | None = None, dlse: torch.Tensor | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen FA2 backward from :func:`varlen_forward`'s ``(out, lse)``; ``dout`` like ``out``,
    ``dlse`` (H, Tq) or None: a gradient flowing into ``lse``; dropout as the forward had it.

    Returns ``dq`` (Tq, H, D) and ``dk``/``dv`` (Tk, H_kv, D), contiguous; rows that belong to
    no sequence (or keys past ``seqused_k``) get zero gradients.
    """
    tq, h, d = q.shape
    tk, h_kv = k.shape[0], k.shape[1]
    meta, b, flags = varlen_launch_meta(cu_seqlens_q, cu_seqlens_k, seqused_k)
    # New contiguous tensors (the kernels compute their strides), zero for rows in no sequence.
    dq = torch.zeros((tq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.zeros((tk, h_kv, d), dtype=k.dtype, device=k.device)
    dv = torch.zeros((tk, h_kv, d), dtype=v.dtype, device=v.device)
    if b == 0 or h == 0 or tq == 0:
        return dq, dk, dv
    stats, cu_stats = _varlen_preprocess(out, dout, lse, dlse, cu_seqlens_q, flags)
    dkdv_cfg, dq_cfg = bwd_configs(q.dtype, d, q.device)
    causal_in = causal
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    scales = (*_common.qk_scale(softmax_scale, softcap), *_common.alibi_args(alibi_slopes, q),
              *_common.split_scale(softmax_scale), win_l, win_r, *_common.dropout_args(dropout_p, rng, q))
    common = dict(HEAD_DIM=d, BLOCK_D=_common.block_d(d), IS_CAUSAL=causal, SOFTCAP=bool(softcap),
                  ALIBI=alibi_slopes is not None, WINDOW=window, DROPOUT=bool(dropout_p), **flags,
                  **_common.kernel_flags(q))
    # Hopper: the Gluon passes (dropout: portable unless gluon_bwd.dropout_takes; softcap, ALiBi
    # and windows too unless gluon_bwd.VARIANTS; at D=256 the dQ pass stays portable)
    portable_only = (bool(dropout_p) and not gluon_bwd.dropout_takes(d)) or softmax_scale <= 0 or (
        not gluon_bwd.VARIANTS and (bool(softcap) or window or alibi_slopes is not None or bool(dropout_p)))
    gluon = gluon_bwd.varlen_supported(q, k, v, dout, portable_only)
    launch = (meta, b, flags)
    gluon_args = (softmax_scale, causal_in, softcap, alibi_slopes, window_size, dropout_p, rng)
    if gluon and tk > 0:
        gluon_bwd.varlen_dkdv(q, k, v, dout, stats, cu_stats, dk, dv, launch,
                              work_list(cu_seqlens_k, gluon_bwd.varlen_blocks(d)[0]), *gluon_args)
    elif tk > 0:
        _varlen_bwd_dkdv_kernel[(cdiv(tk, dkdv_cfg.block_n) + b, h_kv)](
            q, k, v, dout, stats, dk, dv, *meta, work_list(cu_seqlens_k, dkdv_cfg.block_n), cu_stats,
            *strides, b, h_kv, h // h_kv, tq, tk, stats.shape[-1], *scales, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
            num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages, **common,
        )
    if gluon and gluon_bwd.varlen_dq_takes(d):
        gluon_bwd.varlen_dq(q, k, v, dout, stats, cu_stats, dq, launch,
                            work_list(cu_seqlens_q, gluon_bwd.varlen_blocks(d)[1]), *gluon_args)
        return dq, dk, dv
    _varlen_bwd_dq_kernel[(cdiv(tq, dq_cfg.block_m) + b, h)](
        q, k, v, dout, stats, dq, *meta, work_list(cu_seqlens_q, dq_cfg.block_m), cu_stats,
        *strides, b, h, h // h_kv, tq, tk, stats.shape[-1], *scales, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **common,
    )
    return dq, dk, dv
