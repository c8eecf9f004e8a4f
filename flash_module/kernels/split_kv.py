"""The tiling softmax applied to attention: split-KV ("flash-decoding") forward.

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

from .._runtime import acc_dtype, cdiv, lse_dtype, next_power_of_2, sm_count
from ..configs import split_kv_config
from . import _common
from ._common import (
    LN2,
    LOG2E_C,
    add_sink,
    attend_keys,
    head_slope,
    kv_range,
    load_tile,
    lse_epilogue,
    program_bh,
    range_part,
    tile_ptrs,
    to_dtype,
)


@triton.jit
def _split_kv_fwd_kernel(
    Q, K, V, OPart, LsePart, SeqLens, BatchIdx, BlockTable, LeftPad,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, H, GROUP, Sq, Sk, causal_offset, num_kv_rows, qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi, stride_ab,
    stride_ah, chunk, part_stride, win_l, win_r, Sink, Mask, stride_mb, stride_mh, stride_mi, stride_mj,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, PACK_GQA: tl.constexpr, CACHE: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, DIRECT: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    SINK: tl.constexpr, MASK: tl.constexpr = 0,
):
    """One (query block, head, key chunk) partial result; with ``DIRECT`` (one chunk) the final
    result instead: OPart/LsePart are then the (B, Sq, H, D) output and the (B, H, Sq) LSE.  With ``CACHE`` the keys are a KV
    cache: batch ``b`` sees its first ``SeqLens[b] + causal_offset`` keys (there, causal_offset
    counts the keys just appended; clamped into [0, Sk], Sk = the
    capacity; causal bottom-right against that length) in cache row ``BatchIdx[b]`` (or ``b``),
    or, with ``PAGED``, in the pages of block-table row ``b`` (stride_kb: the page stride).
    With ``HAS_LEFTPAD`` (contiguous caches) batch ``b``'s keys start at ``LeftPad[b]``: the
    kernel sees keys [LeftPad[b], SeqLens[b]) as a sequence of their own (flash-attn's
    cache_leftpad: causal alignment against that sequence's length, which in cache positions
    is the same bottom-right alignment).  ``MASK`` (not with ``CACHE``): SDPA's attn_mask
    (:func:`._common.attn_mask`), read by tiles; packed GQA rows read their own head's mask."""
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    if PACK_GQA:
        # Decode: the tile's rows are (query head of the group, query position) pairs, so the
        # GROUP query heads sharing a K/V head read each K/V block once, together.
        off_b, off_hkv = program_bh(H // GROUP)
        g = offs_r // Sq
        rows = offs_r % Sq  # query positions, for the causal mask
        row_ok = g < GROUP
        heads = off_hkv * GROUP + g.to(tl.int64)
        start_m = 0
        q_ptrs = Q + off_b * stride_qb + heads[:, None] * stride_qh + rows[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
        head = heads
    else:
        off_b, off_h = program_bh(H)
        off_hkv = off_h // GROUP
        start_m = tl.program_id(0) * BLOCK_M
        rows = start_m + offs_r
        row_ok = rows < Sq
        q_ptrs = tile_ptrs(Q + off_b * stride_qb + off_h * stride_qh, start_m, stride_qs, BLOCK_M, BLOCK_D)
        q = load_tile(q_ptrs, rows, Sq, HEAD_DIM, True)
        head = off_h
    kv_row = off_b
    capacity = Sk
    if CACHE:
        # causal_offset carries the count of keys just appended (the lengths are from before).
        Sk = tl.minimum(tl.maximum(tl.load(SeqLens + off_b) + causal_offset, 0), Sk)
        if HAS_LEFTPAD:  # keys before LeftPad[b] are padding: start the sequence there
            first_key = tl.minimum(tl.maximum(tl.load(LeftPad + off_b), 0), Sk)
            Sk -= first_key
            K += first_key.to(tl.int64) * stride_ks
            V += first_key.to(tl.int64) * stride_vs
        causal_offset = Sk - Sq
        if HAS_BATCH_IDX:
            kv_row = tl.minimum(tl.maximum(tl.load(BatchIdx + off_b), 0), num_kv_rows - 1).to(tl.int64)
    K_head = K + off_hkv * stride_kh
    V_head = V + off_hkv * stride_vh
    # ALiBi slope of each row's head (packed rows past the group read the last head; not stored)
    slope2 = head_slope(Alibi + off_b * stride_ab, tl.minimum(head, H - 1), stride_ah, ACC_DTYPE, ALIBI)
    slope2 += tl.zeros([BLOCK_M], ACC_DTYPE)
    if not PAGED:
        K_head += kv_row * stride_kb
        V_head += kv_row * stride_vb
    # this tile's (batch, head) slice of the mask: one pointer per row when rows are packed heads
    Mask_bh = Mask + off_b * stride_mb
    if PACK_GQA:
        Mask_bh = Mask_bh + tl.minimum(head, H - 1)[:, None].to(tl.int64) * stride_mh
    else:
        Mask_bh = Mask_bh + head * stride_mh

    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    # The row block's key ranges (as in FA2), intersected with this split's chunk.  (Packed
    # rows span positions [0, Sq) <= BLOCK_M, so kv_range's bounds still cover them; the
    # masked loop applies the exact per-row mask.)
    n0, n1, n2, n3 = kv_range(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW)
    c_lo = n0 + split * chunk  # chunks tile [n0, n3): with a window, only the keys it spans
    c_hi = c_lo + chunk
    for part in tl.static_range(3):  # each range of kv_range (masked, unmasked, masked) within the chunk
        if WINDOW or part > 0:
            a, b = range_part(part, n0, n1, n2, n3)
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, BlockTable + off_b * stride_bt, stride_kb,
                stride_vb, num_kv_rows, capacity, rows, tl.maximum(a, c_lo), tl.minimum(b, c_hi), Sk, causal_offset,
                win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2, 0, 0, 0, 0, Mask_bh, stride_mi, stride_mj, Sq,
                Sk, HEAD_DIM, BLOCK_N, part != 1, IS_CAUSAL, PAGED, PAGE, SOFTCAP, ALIBI, WINDOW, False, MASK)

    # The sink joins once: here with one chunk (SINK is only set then), else in the combine.
    acc, l_i, m_i = add_sink(acc, l_i, m_i, Sink, tl.minimum(head, H - 1), SINK)
    l_safe, lse = lse_epilogue(l_i, m_i, Q.dtype.element_ty == tl.float32)
    lse_rows = (off_b * H + head) * Sq + rows  # (B, H, Sq) row index
    if DIRECT:  # the only chunk: the output itself, (B, Sq, H, D) contiguous
        o_rows = (off_b * Sq + rows) * H + head
        o_ptrs = OPart + o_rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, to_dtype(acc / l_safe[:, None], OPart.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        tl.store(LsePart + lse_rows, lse, mask=row_ok)
    else:
        part = split.to(tl.int64) * part_stride
        o_ptrs = OPart + (part + lse_rows[:, None]) * BLOCK_D + offs_d[None, :]
        tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None])
        tl.store(LsePart + part + lse_rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    OPart, LsePart, Out, Lse, Sink, H, Sq, n_rows, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC_DTYPE: tl.constexpr, SINK: tl.constexpr,
):
    """Merge the chunks of BLOCK_M rows (row = (b * H + h) * Sq + s, of n_rows), as the tiling
    softmax does (natural-log LSEs).  With ``SINK`` the head's sink logit joins as one more
    chunk with no value (see :func:`._common.add_sink`).

    BLOCK_S chunks are read at once, as one (BLOCK_M, BLOCK_S, BLOCK_D) tile, so a row's loads
    are issued together rather than one chunk after another (64 chunks one by one took 30 us)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < n_rows
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_t: tl.constexpr = Lse.dtype.element_ty  # fp64 for fp32 inputs (see lse_epilogue)
    log2e = tl.full([], LOG2E_C, lse_t)
    # Pass 1: the global max over the chunks' LSEs.
    big_m = tl.full([BLOCK_M], float("-inf"), lse_t)
    for c0 in range(0, num_splits, BLOCK_S):
        chunks = c0 + offs_s
        ok = row_ok[:, None] & (chunks < num_splits)[None, :]
        lse_c = tl.load(LsePart + chunks[None, :].to(tl.int64) * n_rows + rows[:, None], mask=ok,
                        other=float("-inf"))  # (BLOCK_M, BLOCK_S)
        big_m = tl.maximum(big_m, tl.max(lse_c, 1))
    bh = rows // Sq
    if SINK:
        sink = tl.load(Sink + bh % H, mask=row_ok, other=0.0).to(lse_t)
        big_m = tl.maximum(big_m, sink)
    m_sub = tl.where(big_m == float("-inf"), 0.0, big_m)
    # Pass 2: weights exp(lse_c - M), weighted sum of the chunk outputs.
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    total = tl.zeros([BLOCK_M], ACC_DTYPE)
    for c0 in range(0, num_splits, BLOCK_S):
        chunks = c0 + offs_s
        ok = row_ok[:, None] & (chunks < num_splits)[None, :]
        part = chunks[None, :].to(tl.int64) * n_rows + rows[:, None]  # (BLOCK_M, BLOCK_S)
        lse_c = tl.load(LsePart + part, mask=ok, other=float("-inf"))
        w = tl.math.exp2(((lse_c - m_sub[:, None]) * log2e).to(ACC_DTYPE))  # 0 for chunks a row cannot see
        o_c = tl.load(OPart + part[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                      other=0.0)  # (BLOCK_M, BLOCK_S, BLOCK_D)
        acc += tl.sum(w[:, :, None] * o_c, 1)
        total += tl.sum(w, 1)
    if SINK:
        total += tl.math.exp2(((sink - m_sub) * log2e).to(ACC_DTYPE))
    seen = total > 0
    t_safe = tl.where(seen, total, 1.0)
    lse = tl.where(seen, big_m + tl.math.log2(t_safe).to(lse_t) * tl.full([], LN2, lse_t), float("-inf"))
    # Out is a new contiguous (B, Sq, H, D) tensor.
    out_rows = ((bh // H) * Sq + rows % Sq) * H + bh % H
    tl.store(Out + out_rows[:, None] * HEAD_DIM + offs_d[None, :], to_dtype(acc / t_safe[:, None], Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + rows, lse, mask=row_ok)


def auto_num_splits(programs: int, sk: int, block_n: int, device: torch.device) -> int:
    """Splits so that the programs fill the GPU once: ``sms // programs`` (1 when the other grid
    axes already give every SM a program), each chunk at least 2 key blocks long.

    Measured on an H200 (decode, GQA 32/8, D=128): at B=1, 64k keys (8 programs) 16 splits
    stream K/V at 3.9 TB/s, 64 splits at 3.4 (short chunks, more to merge); with 256+ programs
    one split (no merge at all) is as fast as any.  Shapes and the SM count only: no tensor
    values, no host sync.
    """
    want = sm_count(device) // max(programs, 1)
    return max(1, min(want, cdiv(sk, 2 * block_n), 256))


def split_kv_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
    causal_offset: int, num_splits: int = 0, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1), sink: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV forward; same contract as :func:`.fa2_fwd.fa2_forward`.

    ``num_splits=0`` picks the count from the SM count, B·H·cdiv(Sq, BLOCK_M) and Sk.
    """
    return _split_kv(q, k, v, softmax_scale, causal, causal_offset, num_splits, softcap=softcap,
                     alibi_slopes=alibi_slopes, window_size=window_size, sink=sink, attn_mask=attn_mask,
                     out_dtype=out_dtype)


def split_kv_cache_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None, softmax_scale: float, causal: bool,
    num_splits: int = 0, cache_leftpad: torch.Tensor | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None, new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention of q (B, Sq, H, D) over a KV cache: contiguous (B_cache, S_cache, H_kv,
    D) with rows ``cache_batch_idx[b]``, or paged (num_pages, page, H_kv, D) through
    ``block_table`` (B, pages_per_seq); batch ``b`` sees its first ``cache_seqlens[b] +
    new_tokens`` keys (the tokens just appended: no separate addition on the host),
    causal bottom-right; with ``cache_leftpad`` (B,) (contiguous caches), only keys from
    ``cache_leftpad[b]`` on.  Returns ``out`` (B, Sq, H, D) and ``lse`` (B, H, Sq).  The chunks
    cover the cache's capacity (a shape), so a chunk past a sequence's length does no work."""
    return _split_kv(q, k_cache, v_cache, softmax_scale, causal, new_tokens, num_splits,
                     cache=(cache_seqlens, cache_batch_idx, block_table, cache_leftpad), softcap=softcap,
                     alibi_slopes=alibi_slopes, window_size=window_size, sink=sink)


def _split_kv(q, k, v, softmax_scale, causal, causal_offset, num_splits, cache=None, softcap=0.0,
              alibi_slopes=None, window_size=(-1, -1), sink=None, attn_mask=None, out_dtype=None):
    b, sq, h, d = q.shape
    h_kv = k.shape[2]
    seqlens, batch_idx, table, leftpad = cache if cache is not None else (None, None, None, None)
    paged = table is not None
    page = k.shape[1] if paged else 1
    sk = table.shape[1] * page if paged else k.shape[1]  # keys (the capacity, for a cache)
    bd = _common.block_d(d)
    acc = acc_dtype(q.dtype)
    group = h // h_kv
    cfg = split_kv_config(q.dtype, d, sq, q.device)
    block_n = cfg.block_n  # paged tiles look up each row's page: the blocks of a contiguous cache
    pack = group > 1 and sq * group <= 64  # decode with GQA: one tile per K/V head
    block_m = max(16, next_power_of_2(sq * group)) if pack else cfg.block_m
    m_blocks = 1 if pack else cdiv(sq, block_m)
    heads = h_kv if pack else h
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    # Keys one row block can see: all of them, or with a window at most its width plus the
    # block's rows and one block of alignment (the kernel's chunks start at the block's first).
    span = min(sk, block_m + win_l + win_r + block_n) if window else sk
    if num_splits <= 0:
        num_splits = auto_num_splits(m_blocks * b * heads, span, block_n, q.device)
    # Chunks are whole key blocks, so the unmasked/masked split of each chunk stays aligned.
    chunk = cdiv(cdiv(max(span, 1), num_splits), block_n) * block_n
    num_splits = cdiv(max(span, 1), chunk)
    out = torch.empty((b, sq, h, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=lse_dtype(q.dtype), device=q.device)
    direct = num_splits == 1  # the kernel writes out and lse itself: no partials, no merge
    if direct:
        o_part, lse_part = out, lse
    else:
        o_part = torch.empty((num_splits, b * h, sq, bd), dtype=acc, device=q.device)
        lse_part = torch.empty((num_splits, b * h, sq), dtype=lse.dtype, device=q.device)
    stand_in = lse_part  # for absent metadata tensors; never read
    mask = _common.mask_args(attn_mask, (b, h, sq, sk), q)
    _split_kv_fwd_kernel[(m_blocks, b * heads, num_splits)](
        q, k, v, o_part, lse_part, seqlens if seqlens is not None else stand_in,
        batch_idx if batch_idx is not None else stand_in, table if paged else stand_in,
        leftpad if leftpad is not None else stand_in, *_common.bsh_strides(q, k, v),
        table.stride(0) if paged else 0,
        h, group, sq, sk, causal_offset, k.shape[0], *_common.qk_scale(softmax_scale, softcap),
        *_common.alibi_args(alibi_slopes, q), chunk,
        b * h * sq, win_l, win_r, _common.sink_args(sink, q), *mask[:5], MASK=mask[5],
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=causal, PACK_GQA=pack,
        CACHE=cache is not None, HAS_BATCH_IDX=batch_idx is not None, PAGED=paged, PAGE=page, DIRECT=direct,
        HAS_LEFTPAD=leftpad is not None, SOFTCAP=bool(softcap), ALIBI=alibi_slopes is not None, WINDOW=window,
        SINK=sink is not None and direct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_common.kernel_flags(q),
    )
    if direct:
        return out, lse
    # One row per program on a GPU (loads in flight on many SMs); 16 under the interpreter,
    # whose cost is per operation, not per element.
    interpreted = q.device.type != "cuda"
    comb_m = 16 if interpreted else 1
    comb_s = min(64 if interpreted else 32, next_power_of_2(num_splits))
    n_rows = b * h * sq
    _combine_kernel[(cdiv(n_rows, comb_m),)](
        o_part, lse_part, out, lse, _common.sink_args(sink, q), h, sq, n_rows, num_splits,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=comb_m, BLOCK_S=comb_s, SINK=sink is not None,
        **_common.kernel_flags(q),
    )
    return out, lse
