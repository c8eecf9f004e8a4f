"""Row softmax in Triton: the online and tiling softmax, and their backward.

Every kernel works on a contiguous (rows, n) matrix and reduces along the last dim.  Inputs are
read in their own dtype and upcast to the accumulator dtype (fp64 for fp64, fp32 otherwise);
the row max is kept in natural units and ``log2(e)`` is folded into the one multiply in front
of every ``exp2``: ``exp(x - m) = exp2((x - m) * log2(e))``.

Forward, ``online`` (:func:`_softmax_online_kernel`, grid ``(cdiv(rows, ROWS),)``):

* short rows (``n <= BLOCK``, ``SINGLE``): a program loads a (ROWS, BLOCK) tile once, reduces
  it in registers and writes it: one read and one write of the data;
* long rows (ROWS = 1): pass 1 streams the row in BLOCK chunks keeping a running max ``m`` and
  a running sum ``s`` (``s <- s * exp(m_old - m_new) + sum(exp(x - m_new))``); pass 2 reads
  the row again, last chunk first (those are the chunks most likely still in L2) and writes
  ``exp(x - m) / s``: two reads and one write, where the classic safe softmax needs three
  reads (max, sum, normalise) and one write.

Forward, ``tiling`` (two launches, grid ``(rows, num_splits)``): the row is cut into
``num_splits`` chunks of ``chunk`` elements (a multiple of BLOCK).  Launch 1
(:func:`_softmax_split_stats_kernel`) streams each chunk once and writes its local max
``m_c`` and local sum ``s_c`` to a small (rows, num_splits) workspace.  Launch 2
(:func:`_softmax_split_apply_kernel`) merges the row's statistics in every program,
``M = max_c m_c``, ``S = sum_c s_c * exp(m_c - M)``, and writes ``exp(x - M) / S`` for its
chunk.  Two reads and one write again, but a long row is spread over many SMs.  (Because the
two launches are separate, the second read comes from L2 only when the tensor fits there: for
many rows, ``online`` is the faster choice; ``num_splits=None`` then picks 1 split.)

Backward (``dx = y * (dy - sum(y * dy))``) has the same two shapes: a fused kernel (one
program per row, or per ROWS rows when they are short; a first pass computes ``sum(y * dy)``
and a second one writes dx, or a single load when the row fits in one block), and a split
pair for few very long rows (partial dot products per chunk into a workspace, then the
write, each program summing the row's partials in a fixed order: deterministic).

-inf entries: a chunk (or a whole prefix of the row) with only -inf keeps ``s = 0`` (the
kernels subtract 0 instead of a -inf running max, so no NaN appears); a row that is entirely
-inf gives NaN, as ``torch.softmax`` does (the normalisation then computes ``exp(-inf - -inf)``).
An entry of +inf or NaN makes the whole row NaN.

Offsets: the row base ``row * n`` is int64; offsets inside a row are int32 (rows longer than
2**31 - 1 elements are rejected on the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._runtime import acc_dtype, cdiv, next_power_of_2, sm_count
from ._common import LOG2E_C, to_dtype

#: Longest row (elements) a forward/backward program loads in one piece (SINGLE path).
MAX_SINGLE = 16384
#: Chunk (elements) streamed per loop step by the long-row and split kernels.
STREAM_BLOCK = 4096
#: Tiling: a split should own at least this many elements, and there are at most MAX_SPLITS.
MIN_SPLIT = 4096
MAX_SPLITS = 1024
#: Target number of programs per SM when choosing num_splits automatically.
PROGRAMS_PER_SM = 4


# ---------------------------------------------------------------------------------------------
# @triton.jit building blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _neg_inf_to_zero(m):
    """The value to subtract for a running max ``m``: 0 where ``m`` is -inf (no NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _load(ptrs, row_ok, cols, hi, other, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
          ACC_DTYPE: tl.constexpr, EVICT: tl.constexpr):
    """Load a (ROWS, BLOCK) tile and upcast it; masks only where the caller says they're needed."""
    if MASK_COLS:
        if MASK_ROWS:
            x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < hi), other=other,
                        eviction_policy=EVICT)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < hi, other=other, eviction_policy=EVICT)
    else:
        if MASK_ROWS:
            x = tl.load(ptrs, mask=row_ok[:, None], other=other, eviction_policy=EVICT)
        else:
            x = tl.load(ptrs, eviction_policy=EVICT)
    x = x.to(ACC_DTYPE)
    if MASK_ROWS:
        # Rows past the end get zeros, not -inf: their (unstored) results stay finite.
        x = tl.where(row_ok[:, None], x, 0.0)
    return x


@triton.jit
def _store(ptrs, val, row_ok, cols, hi, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    val = to_dtype(val, ptrs.dtype.element_ty)
    if MASK_COLS:
        if MASK_ROWS:
            tl.store(ptrs, val, mask=row_ok[:, None] & (cols[None, :] < hi))
        else:
            tl.store(ptrs, val, mask=cols[None, :] < hi)
    else:
        if MASK_ROWS:
            tl.store(ptrs, val, mask=row_ok[:, None])
        else:
            tl.store(ptrs, val)


@triton.jit
def _online_step(m, s, x, log2e):
    """Fold a (ROWS, BLOCK) tile into the running max ``m`` and sum ``s`` (both (ROWS,))."""
    m_new = tl.maximum(m, tl.max(x, 1))
    # A row that has only seen -inf so far (-inf entries, masked tails) keeps s = 0, not NaN.
    m_sub = _neg_inf_to_zero(m_new)
    alpha = tl.math.exp2((m - m_sub) * log2e)  # rescale of what was summed so far
    s = s * alpha + tl.sum(tl.math.exp2((x - m_sub[:, None]) * log2e), 1)
    return m_new, s


@triton.jit
def _row_stats(X, row_off, row_ok, start, length, offs, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               MASK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Running max and sum of ``x[rows, start:start + length]``, streamed in BLOCK chunks.

    ``row_off`` is the (ROWS, 1) int64 offset of each row; ``length`` may be 0 (an empty chunk).
    """
    log2e = tl.full([], LOG2E_C, ACC_DTYPE)
    m = tl.full([ROWS], float("-inf"), ACC_DTYPE)
    s = tl.zeros([ROWS], ACC_DTYPE)
    x_ptrs = X + row_off + start
    n_even = (length // BLOCK) * BLOCK
    for off in range(0, n_even, BLOCK):  # full chunks: no column mask
        cols = off + offs
        # evict_last: pass 2 reads the row again, keep it in L2.
        x = _load(x_ptrs + cols[None, :], row_ok, cols, length, float("-inf"), MASK_ROWS, False,
                  ACC_DTYPE, "evict_last")
        m, s = _online_step(m, s, x, log2e)
    if n_even < length:  # the ragged tail
        cols = n_even + offs
        x = _load(x_ptrs + cols[None, :], row_ok, cols, length, float("-inf"), MASK_ROWS, True,
                  ACC_DTYPE, "evict_last")
        m, s = _online_step(m, s, x, log2e)
    return m, s


@triton.jit
def _row_normalise(X, Y, row_off, row_ok, start, length, m, inv_s, offs, BLOCK: tl.constexpr,
                   MASK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Write ``exp(x - m) * inv_s`` over ``[start, start + length)``, last chunk first."""
    log2e = tl.full([], LOG2E_C, ACC_DTYPE)
    x_ptrs = X + row_off + start
    y_ptrs = Y + row_off + start
    n_even = (length // BLOCK) * BLOCK
    if n_even < length:
        cols = n_even + offs
        x = _load(x_ptrs + cols[None, :], row_ok, cols, length, float("-inf"), MASK_ROWS, True,
                  ACC_DTYPE, "evict_first")
        y = tl.math.exp2((x - m[:, None]) * log2e) * inv_s[:, None]
        _store(y_ptrs + cols[None, :], y, row_ok, cols, length, MASK_ROWS, True)
    n_chunks = n_even // BLOCK
    for i in range(0, n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK + offs
        x = _load(x_ptrs + cols[None, :], row_ok, cols, length, float("-inf"), MASK_ROWS, False,
                  ACC_DTYPE, "evict_first")
        y = tl.math.exp2((x - m[:, None]) * log2e) * inv_s[:, None]
        _store(y_ptrs + cols[None, :], y, row_ok, cols, length, MASK_ROWS, False)


@triton.jit
def _row_dot(Y, DY, row_off, row_ok, start, length, offs, ROWS: tl.constexpr, BLOCK: tl.constexpr,
             MASK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``sum(y * dy)`` of each row over ``[start, start + length)``, streamed in BLOCK chunks."""
    acc = tl.zeros([ROWS], ACC_DTYPE)
    y_ptrs = Y + row_off + start
    dy_ptrs = DY + row_off + start
    n_even = (length // BLOCK) * BLOCK
    for off in range(0, n_even, BLOCK):
        cols = off + offs
        y = _load(y_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, False, ACC_DTYPE,
                  "evict_last")
        dy = _load(dy_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, False, ACC_DTYPE,
                   "evict_last")
        acc += tl.sum(y * dy, 1)
    if n_even < length:
        cols = n_even + offs
        y = _load(y_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, True, ACC_DTYPE,
                  "evict_last")
        dy = _load(dy_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, True, ACC_DTYPE,
                   "evict_last")
        acc += tl.sum(y * dy, 1)
    return acc


@triton.jit
def _row_grad(Y, DY, DX, row_off, row_ok, start, length, dot, offs, BLOCK: tl.constexpr,
              MASK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Write ``dx = y * (dy - dot)`` over ``[start, start + length)``, last chunk first."""
    y_ptrs = Y + row_off + start
    dy_ptrs = DY + row_off + start
    dx_ptrs = DX + row_off + start
    n_even = (length // BLOCK) * BLOCK
    if n_even < length:
        cols = n_even + offs
        y = _load(y_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, True, ACC_DTYPE,
                  "evict_first")
        dy = _load(dy_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, True, ACC_DTYPE,
                   "evict_first")
        _store(dx_ptrs + cols[None, :], y * (dy - dot[:, None]), row_ok, cols, length, MASK_ROWS,
               True)
    n_chunks = n_even // BLOCK
    for i in range(0, n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK + offs
        y = _load(y_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, False, ACC_DTYPE,
                  "evict_first")
        dy = _load(dy_ptrs + cols[None, :], row_ok, cols, length, 0.0, MASK_ROWS, False, ACC_DTYPE,
                   "evict_first")
        _store(dx_ptrs + cols[None, :], y * (dy - dot[:, None]), row_ok, cols, length, MASK_ROWS,
               False)


@triton.jit
def _block_rows(n_rows, n, ROWS: tl.constexpr):
    """This program's ROWS rows: their (ROWS, 1) int64 offsets and validity mask."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return rows.to(tl.int64)[:, None] * n, rows < n_rows


@triton.jit
def _split_row(n, chunk):
    """Split-kernel program (row, split): the row's (1, 1) int64 offset, chunk start and length."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    length = tl.maximum(tl.minimum(chunk, n - start), 0)  # an empty chunk gives m = -inf, s = 0
    row_off = tl.full([1, 1], 0, tl.int64) + row * n
    return row, split, row_off, start, length


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax_online_kernel(
    X, Y, n_rows, n,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row_off, row_ok = _block_rows(n_rows, n, ROWS)
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        # The whole row fits in one tile: one read, reduce in registers, one write.
        log2e = tl.full([], LOG2E_C, ACC_DTYPE)
        x = _load(X + row_off + offs[None, :], row_ok, offs, n, float("-inf"), MASK_ROWS, MASK_COLS,
                  ACC_DTYPE, "evict_first")
        m = tl.max(x, 1)
        e = tl.math.exp2((x - m[:, None]) * log2e)  # an all -inf row gives NaN, as torch does
        inv_s = 1.0 / tl.sum(e, 1)
        _store(Y + row_off + offs[None, :], e * inv_s[:, None], row_ok, offs, n, MASK_ROWS, MASK_COLS)
    else:
        m, s = _row_stats(X, row_off, row_ok, 0, n, offs, ROWS, BLOCK, MASK_ROWS, ACC_DTYPE)
        _row_normalise(X, Y, row_off, row_ok, 0, n, m, 1.0 / s, offs, BLOCK, MASK_ROWS, ACC_DTYPE)


@triton.jit
def _softmax_split_stats_kernel(
    X, M, S, n, chunk, num_splits,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row, split, row_off, start, length = _split_row(n, chunk)
    row_ok = tl.full([1], 1, tl.int1)
    m, s = _row_stats(X, row_off, row_ok, start, length, tl.arange(0, BLOCK), 1, BLOCK, False,
                      ACC_DTYPE)
    ws = row * num_splits + split + tl.arange(0, 1)
    tl.store(M + ws, m)
    tl.store(S + ws, s)


@triton.jit
def _merge_stats(M, S, row, num_splits, SPLITS_P2: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The row's global max and 1 / global sum, merged from its per-chunk (m_c, s_c)."""
    log2e = tl.full([], LOG2E_C, ACC_DTYPE)
    offs_s = tl.arange(0, SPLITS_P2)
    ok = offs_s < num_splits
    m_c = tl.load(M + row * num_splits + offs_s, mask=ok, other=float("-inf"))
    s_c = tl.load(S + row * num_splits + offs_s, mask=ok, other=0.0)
    big_m = tl.max(m_c, 0)
    # Empty and all -inf chunks have m_c = -inf and s_c = 0: weight exp(-inf) = 0.
    w = tl.math.exp2((m_c - _neg_inf_to_zero(big_m)) * log2e)
    big_s = tl.sum(tl.where(s_c > 0, s_c * w, 0.0), 0)
    return big_m, 1.0 / big_s


@triton.jit
def _softmax_split_apply_kernel(
    X, Y, M, S, n, chunk, num_splits,
    SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row, split, row_off, start, length = _split_row(n, chunk)
    big_m, inv_s = _merge_stats(M, S, row, num_splits, SPLITS_P2, ACC_DTYPE)
    # An all -inf row has M = -inf and writes exp(-inf - -inf) = NaN, as torch does.
    m = tl.full([1], 0.0, ACC_DTYPE) + big_m
    inv = tl.full([1], 0.0, ACC_DTYPE) + inv_s
    row_ok = tl.full([1], 1, tl.int1)
    _row_normalise(X, Y, row_off, row_ok, start, length, m, inv, tl.arange(0, BLOCK), BLOCK, False,
                   ACC_DTYPE)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax_bwd_kernel(
    Y, DY, DX, n_rows, n,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row_off, row_ok = _block_rows(n_rows, n, ROWS)
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        y = _load(Y + row_off + offs[None, :], row_ok, offs, n, 0.0, MASK_ROWS, MASK_COLS, ACC_DTYPE,
                  "evict_first")
        dy = _load(DY + row_off + offs[None, :], row_ok, offs, n, 0.0, MASK_ROWS, MASK_COLS, ACC_DTYPE,
                   "evict_first")
        dot = tl.sum(y * dy, 1)
        _store(DX + row_off + offs[None, :], y * (dy - dot[:, None]), row_ok, offs, n, MASK_ROWS,
               MASK_COLS)
    else:
        dot = _row_dot(Y, DY, row_off, row_ok, 0, n, offs, ROWS, BLOCK, MASK_ROWS, ACC_DTYPE)
        _row_grad(Y, DY, DX, row_off, row_ok, 0, n, dot, offs, BLOCK, MASK_ROWS, ACC_DTYPE)


@triton.jit
def _softmax_bwd_split_dot_kernel(
    Y, DY, D, n, chunk, num_splits,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row, split, row_off, start, length = _split_row(n, chunk)
    row_ok = tl.full([1], 1, tl.int1)
    dot = _row_dot(Y, DY, row_off, row_ok, start, length, tl.arange(0, BLOCK), 1, BLOCK, False,
                   ACC_DTYPE)
    tl.store(D + row * num_splits + split + tl.arange(0, 1), dot)


@triton.jit
def _softmax_bwd_split_apply_kernel(
    Y, DY, DX, D, n, chunk, num_splits,
    SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row, split, row_off, start, length = _split_row(n, chunk)
    offs_s = tl.arange(0, SPLITS_P2)
    parts = tl.load(D + row * num_splits + offs_s, mask=offs_s < num_splits, other=0.0)
    dot = tl.full([1], 0.0, ACC_DTYPE) + tl.sum(parts, 0)  # same order in every program
    row_ok = tl.full([1], 1, tl.int1)
    _row_grad(Y, DY, DX, row_off, row_ok, start, length, dot, tl.arange(0, BLOCK), BLOCK, False,
              ACC_DTYPE)


# ---------------------------------------------------------------------------------------------
# Host side: configs and launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxConfig:
    """Launch config of the row kernels: ``rows`` per program, ``block`` columns per tile."""

    block: int
    rows: int
    num_warps: int
    single: bool  # the row fits in one tile: load once


def _warps_for(elements: int, cap: int = 16) -> int:
    """About 32 elements per thread, 1..cap warps."""
    return max(1, min(cap, elements // 1024))


# Streaming tile of the fused kernels for rows longer than MAX_SINGLE.  Measured on the H200
# (bf16, 2026-11-23, benchmarks/bench_softmax.py --sweep): 4096x32768 reaches 3.55 TB/s with
# 16384-element tiles and 8 warps (3.03 with 4096/8); 256x262144 2.42 (1.75 with 4096/8).
ROW_STREAM_BLOCK = 16384
ROW_STREAM_WARPS = 8


def row_config(n: int, dtype: torch.dtype) -> SoftmaxConfig:
    """Config of the fused (online / backward) kernel for rows of ``n`` elements.

    Short rows: one (rows, block) tile per program with ~32 elements per thread (4096-long bf16
    rows: 3.46 TB/s with 4 warps vs 3.32 with 8, same sweep).  Long rows: stream in tiles.
    """
    max_single = MAX_SINGLE // 2 if dtype == torch.float64 else MAX_SINGLE
    block = max(16, next_power_of_2(n))
    if block <= max_single:
        rows = max(1, min(64, 2048 // block))  # short rows: several per program, ~2k elements
        return SoftmaxConfig(block, rows, _warps_for(block * rows), True)
    stream = ROW_STREAM_BLOCK // 2 if dtype == torch.float64 else ROW_STREAM_BLOCK
    return SoftmaxConfig(stream, 1, ROW_STREAM_WARPS, False)


def split_block(n: int, num_splits: int) -> int:
    """Chunk-loop block of the split kernels: small enough that ``num_splits`` chunks exist."""
    return max(16, min(STREAM_BLOCK, next_power_of_2(cdiv(n, num_splits))))


def auto_num_splits(rows: int, n: int, sms: int) -> int:
    """Splits per row for ``PROGRAMS_PER_SM`` programs per SM, each owning >= MIN_SPLIT elements.

    Uses only shapes and the device's SM count (never tensor values: no host sync).
    """
    target = PROGRAMS_PER_SM * sms
    if rows >= target:
        return 1
    want = cdiv(target, max(rows, 1))
    return max(1, min(want, n // MIN_SPLIT, MAX_SPLITS))


def _chunking(n: int, num_splits: int, block: int | None) -> tuple[int, int, int]:
    """(block, chunk, splits): chunk is a multiple of block; ``splits = cdiv(n, chunk)``."""
    num_splits = max(1, min(num_splits, MAX_SPLITS, n))
    block = block or split_block(n, num_splits)
    chunk = cdiv(cdiv(n, num_splits), block) * block
    return block, chunk, cdiv(n, chunk)


def _checked(cfg: SoftmaxConfig, n: int) -> SoftmaxConfig:
    if cfg.single and cfg.block < n:
        raise ValueError(f"softmax: a single-tile config needs block >= n, got block={cfg.block}, n={n}")
    return cfg


def _flags(dtype: torch.dtype) -> dict:
    return dict(ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32)


def _check_2d(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"softmax kernels take contiguous 2-D tensors, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")
        if t.shape[1] >= 2**31:
            raise ValueError(f"softmax: rows of {t.shape[1]} elements exceed the int32 in-row offsets")


def softmax_forward(
    x: torch.Tensor,
    algorithm: str = "online",
    num_splits: int | None = None,
    config: SoftmaxConfig | None = None,
) -> torch.Tensor:
    """Softmax over the last dim of a contiguous (rows, n) tensor, n >= 1. Returns a new tensor.

    ``config`` overrides the fused kernel's launch config (``online``); for ``tiling`` only its
    ``block`` and ``num_warps`` are used.
    """
    _check_2d(x)
    rows, n = x.shape
    y = torch.empty_like(x)
    if algorithm == "online":
        cfg = _checked(config or row_config(n, x.dtype), n)
        grid = (cdiv(rows, cfg.rows),)
        _softmax_online_kernel[grid](
            x, y, rows, n,
            ROWS=cfg.rows, BLOCK=cfg.block, SINGLE=cfg.single, MASK_ROWS=rows % cfg.rows != 0,
            MASK_COLS=n != cfg.block, num_warps=cfg.num_warps, **_flags(x.dtype),
        )
        return y
    if algorithm != "tiling":
        raise ValueError(f"algorithm must be 'online' or 'tiling', got {algorithm!r}")
    if num_splits is None:
        num_splits = auto_num_splits(rows, n, sm_count(x.device))
    block, chunk, splits = _chunking(n, num_splits, config.block if config else None)
    warps = config.num_warps if config else _warps_for(block, 8)
    ws_m = torch.empty((rows, splits), dtype=acc_dtype(x.dtype), device=x.device)
    ws_s = torch.empty_like(ws_m)
    flags = _flags(x.dtype)
    _softmax_split_stats_kernel[(rows, splits)](
        x, ws_m, ws_s, n, chunk, splits, BLOCK=block, ACC_DTYPE=flags["ACC_DTYPE"], num_warps=warps)
    _softmax_split_apply_kernel[(rows, splits)](
        x, y, ws_m, ws_s, n, chunk, splits, SPLITS_P2=max(2, next_power_of_2(splits)),
        BLOCK=block, num_warps=warps, **flags)
    return y


def softmax_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    num_splits: int | None = None,
    config: SoftmaxConfig | None = None,
) -> torch.Tensor:
    """``dx = y * (dy - sum(y * dy))`` over the last dim of contiguous (rows, n) tensors.

    ``num_splits=None`` picks it like the tiling forward (1 unless the rows are few and long);
    1 runs the fused kernel, more runs the split pair.
    """
    _check_2d(y, dy)
    rows, n = y.shape
    dx = torch.empty_like(y)
    if num_splits is None:
        num_splits = auto_num_splits(rows, n, sm_count(y.device))
    flags = _flags(y.dtype)
    if num_splits <= 1:
        cfg = _checked(config or row_config(n, y.dtype), n)
        _softmax_bwd_kernel[(cdiv(rows, cfg.rows),)](
            y, dy, dx, rows, n,
            ROWS=cfg.rows, BLOCK=cfg.block, SINGLE=cfg.single, MASK_ROWS=rows % cfg.rows != 0,
            MASK_COLS=n != cfg.block, num_warps=cfg.num_warps, **flags,
        )
        return dx
    block, chunk, splits = _chunking(n, num_splits, config.block if config else None)
    warps = config.num_warps if config else _warps_for(block, 8)
    ws = torch.empty((rows, splits), dtype=acc_dtype(y.dtype), device=y.device)
    _softmax_bwd_split_dot_kernel[(rows, splits)](
        y, dy, ws, n, chunk, splits, BLOCK=block, ACC_DTYPE=flags["ACC_DTYPE"], num_warps=warps)
    _softmax_bwd_split_apply_kernel[(rows, splits)](
        y, dy, dx, ws, n, chunk, splits, SPLITS_P2=max(2, next_power_of_2(splits)),
        BLOCK=block, num_warps=warps, **flags)
    return dx
