"""KV cache for decoding (issue #12): appending new keys/values in place, contiguous or paged.

Cache layouts (flash-attn's):

* contiguous: ``k_cache``/``v_cache`` (B_cache, S_cache, H_kv, D); batch ``b`` uses cache row
  ``cache_batch_idx[b]`` (default ``b``);
* paged: ``k_cache``/``v_cache`` (num_pages, page_size, H_kv, D) and ``block_table``
  (B, pages_per_seq) int32; position ``p`` of batch ``b`` lives at row ``p % page_size`` of page
  ``block_table[b, p // page_size]``.

:func:`kvcache_append` writes ``k_new``/``v_new`` (B, S_new, H_kv, D) at positions
``cache_seqlens[b] + i``.  Nothing is read on the host: the grid comes from shapes, and values
are made safe in the kernel (positions past the cache's capacity are not written, batch and
page indices are clamped into the tensors), so bad values give wrong answers, never
out-of-bounds writes.
"""

import torch
import triton
import triton.language as tl

from .._runtime import cdiv
from . import _common
from ._common import load_tile


@triton.jit
def cache_rows(K, b, pos, BatchIdx, BlockTable, stride_kb, stride_ks, stride_bt, num_rows, capacity,
               PAGE: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr):
    """Pointers to the cache rows of positions ``pos`` (a vector) of batch ``b`` (head and
    feature offsets not included), and which positions exist (``0 <= pos < capacity``).
    ``num_rows``: the cache's first dim (B_cache, or num_pages when ``PAGED``)."""
    ok = (pos >= 0) & (pos < capacity)
    pos = tl.where(ok, pos, 0)
    if PAGED:
        page = tl.load(BlockTable + b * stride_bt + pos // PAGE, mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_rows - 1).to(tl.int64)
        return K + page * stride_kb + (pos % PAGE) * stride_ks, ok
    row = b
    if HAS_BATCH_IDX:
        row = tl.minimum(tl.maximum(tl.load(BatchIdx + b), 0), num_rows - 1)
    return K + row.to(tl.int64) * stride_kb + pos.to(tl.int64) * stride_ks, ok


@triton.jit
def _append_kernel(
    KC, VC, KN, VN, CacheSeqlens, BatchIdx, BlockTable,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh, stride_bt,
    S_new, num_rows, capacity,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    """Copy BLOCK new tokens of one (batch, K/V head) into the cache."""
    b = tl.program_id(0).to(tl.int64)
    off_h = tl.program_id(2).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    rows = start + tl.arange(0, BLOCK)  # (BLOCK,) indices into the new tokens
    pos = tl.load(CacheSeqlens + b) + rows  # their positions in the cache
    d = tl.arange(0, BLOCK_D)[None, :]
    for which in tl.static_range(2):  # K, then V
        if which == 0:
            src = KN + b * stride_knb + off_h * stride_knh
            dst, ok = cache_rows(KC + off_h * stride_kch, b, pos, BatchIdx, BlockTable, stride_kcb, stride_kcs,
                                 stride_bt, num_rows, capacity, PAGE, PAGED, HAS_BATCH_IDX)
            stride_ns = stride_kns
        else:
            src = VN + b * stride_vnb + off_h * stride_vnh
            dst, ok = cache_rows(VC + off_h * stride_vch, b, pos, BatchIdx, BlockTable, stride_vcb, stride_vcs,
                                 stride_bt, num_rows, capacity, PAGE, PAGED, HAS_BATCH_IDX)
            stride_ns = stride_vns
        x = load_tile(_common.tile_ptrs(src, start, stride_ns, BLOCK, BLOCK_D), rows, S_new, HEAD_DIM, True)
        # (BLOCK, BLOCK_D) new rows, copied as they are; a row is written only if it exists and
        # its position fits in the cache.
        tl.store(dst[:, None] + d, x, mask=(ok & (rows < S_new))[:, None] & (d < HEAD_DIM))


def kvcache_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> None:
    """Write ``k_new``/``v_new`` (B, S_new, H_kv, D) into the caches at ``cache_seqlens[b] + i``
    (``cache_seqlens`` (B,) int32: each sequence's length before the append), in place.
    Shapes and dtypes are the caller's to check (:func:`flash_module.flash_attn_with_kvcache`)."""
    b, s_new, h_kv, d = k_new.shape
    if b == 0 or s_new == 0 or h_kv == 0 or d == 0:
        return
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    if capacity == 0 or k_cache.shape[0] == 0:  # nowhere to write
        return
    block = 16
    dummy = cache_seqlens  # stands in for an absent index tensor; never read
    _append_kernel[(b, cdiv(s_new, block), h_kv)](
        k_cache, v_cache, k_new, v_new, cache_seqlens,
        cache_batch_idx if cache_batch_idx is not None else dummy, block_table if paged else dummy,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        block_table.stride(0) if paged else 0, s_new, k_cache.shape[0], capacity,
        HEAD_DIM=d, BLOCK_D=_common.block_d(d), BLOCK=block, PAGE=page, PAGED=paged,
        HAS_BATCH_IDX=cache_batch_idx is not None,
    )
