"""Opt-in value checks for packed sequences and KV caches (a debugging aid).

The public functions check the metadata tensors' dtypes, shapes and devices on every call, but
never their *values*: reading them needs a device-to-host copy, which would break CUDA graphs and
``torch.compile`` and stall the GPU.  The kernels clamp every offset and index instead, so a bad
value gives a wrong answer, never an out-of-bounds memory access.

While debugging, turn the value checks on (``FLASH_MODULE_CHECK_VALUES=1`` in the environment
before import, or :func:`set_check_values` / :func:`check_values` at run time): each call then
reads the metadata on the host and raises ``ValueError`` naming the argument, the batch entry and
the value.  Under ``torch.compile`` tracing the checks are skipped (they would need the values).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

_enabled: bool = os.environ.get("FLASH_MODULE_CHECK_VALUES", "0") == "1"


def set_check_values(enabled: bool) -> bool:
    """Turn the host-side value checks on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def check_values(enabled: bool = True) -> Iterator[None]:
    """``with flash_module.check_values(): ...`` checks values inside the block."""
    previous = set_check_values(enabled)
    try:
        yield
    finally:
        set_check_values(previous)


def active() -> bool:
    """Whether this call should check values (on, and not being traced by torch.compile)."""
    return _enabled and not torch.compiler.is_compiling()


def _first_bad(name: str, values: list[int], ok, what: str) -> None:
    for i, x in enumerate(values):
        if not ok(i, x):
            raise ValueError(f"{name}[{i}] = {x}: {what} (FLASH_MODULE_CHECK_VALUES)")


def _offsets(name: str, cu: Tensor, total: int | None) -> list[int]:
    """The offsets as a list, after checking they start at 0, never decrease and end within
    ``total`` tokens (None: no bound).  Returns the per-sequence lengths."""
    offsets = cu.tolist()
    bound = f" and end <= {total} tokens" if total is not None else ""
    for i, x in enumerate(offsets):
        if (x != 0 if i == 0 else x < offsets[i - 1]) or (total is not None and x > total):
            raise ValueError(f"{name}[{i}] = {x}: offsets must start at 0, never decrease{bound} "
                             f"(FLASH_MODULE_CHECK_VALUES)")
    return [b - a for a, b in zip(offsets, offsets[1:])]


def varlen(q: Tensor, k_tokens: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
           max_seqlen_q: object, max_seqlen_k: object, seqused_k: Tensor | None,
           block_table: Tensor | None, num_pages: int) -> None:
    """Offsets start at 0, never decrease and stay within the packed tensors; lengths within
    ``max_seqlen_*`` (when ints); ``seqused_k`` within each key length; pages within the pool.
    ``k_tokens``: keys in the packed k, or with ``block_table`` the keys one table row holds."""
    len_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    paged = block_table is not None
    len_k = _offsets("cu_seqlens_k", cu_seqlens_k, None if paged else k_tokens)
    if paged:
        _first_bad("sequence length (cu_seqlens_k)", len_k, lambda i, x: x <= k_tokens,
                   f"longer than one block-table row ({k_tokens} keys)")
        _first_bad("block_table (flattened)", block_table.flatten().tolist(), lambda i, x: 0 <= x < num_pages,
                   f"page index outside [0, {num_pages})")
    for which, lengths, cap in (("q", len_q, max_seqlen_q), ("k", len_k, max_seqlen_k)):
        if isinstance(cap, int) and not isinstance(cap, bool):
            _first_bad(f"sequence length (cu_seqlens_{which})", lengths, lambda i, x, c=cap: x <= c,
                       f"longer than max_seqlen_{which} = {cap}")
    if seqused_k is not None:
        _first_bad("seqused_k", seqused_k.tolist(), lambda i, x: 0 <= x <= len_k[i],
                   "must be in [0, that sequence's key length]")


def kvcache(cache_seqlens: Tensor, s_new: int, capacity: int, cache_batch_idx: Tensor | None, cache_rows: int,
            block_table: Tensor | None, num_pages: int, cache_leftpad: Tensor | None) -> None:
    """Lengths in [0, capacity - S_new], batch rows and pages within the cache, left padding
    within each sequence."""
    lengths = cache_seqlens.tolist()
    _first_bad("cache_seqlens", lengths, lambda i, x: 0 <= x <= capacity - s_new,
               f"must be in [0, capacity - seqlen_new] = [0, {capacity - s_new}]")
    if cache_batch_idx is not None:
        _first_bad("cache_batch_idx", cache_batch_idx.tolist(), lambda i, x: 0 <= x < cache_rows,
                   f"cache row outside [0, {cache_rows})")
    if block_table is not None:
        _first_bad("block_table (flattened)", block_table.flatten().tolist(), lambda i, x: 0 <= x < num_pages,
                   f"page index outside [0, {num_pages})")
    if cache_leftpad is not None:
        _first_bad("cache_leftpad", cache_leftpad.tolist(), lambda i, x: 0 <= x <= lengths[i] + s_new,
                   "must be in [0, cache_seqlens + seqlen_new]")
