"""Pure-PyTorch attention: the float64 oracle, the blocked algorithms, and the CPU path.

Everything here works on the *bshd* layout used by the ops:

* ``q``: (B, Sq, H, D), ``k``/``v``: (B, Sk, H_kv, D) with ``H % H_kv == 0`` (GQA/MQA:
  query head ``h`` reads key/value head ``h // (H // H_kv)``),
* ``out``: (B, Sq, H, D) in the input dtype, ``lse``: (B, H, Sq) natural-log log-sum-exp of the
  scaled scores, float32 for fp16/bf16 inputs, float64 for fp32/fp64 inputs (the blocked
  algorithms; :func:`attention_ref` returns it in the accumulator dtype).

Causal masking has two alignments.  With ``bottom_right=True`` (flash-attn) query ``i`` sees
keys ``j <= i + Sk - Sq``; with ``bottom_right=False`` (torch SDPA) it sees ``j <= i``.  A query
row that sees no key at all gets output 0 and LSE ``-inf`` (and zero gradients).  The blocked
algorithms also take a ``shift`` that moves that diagonal (and the window and ALiBi distances
measured from it) by a further ``shift`` keys: ring attention's steps, whose key chunk sits
``shift`` positions behind the query chunk in the sequence.

The blocked algorithms (:func:`fa1_forward`, :func:`fa2_forward`, :func:`fa2_backward`) follow
the papers' loops literally, but every loop that the GPU runs *in parallel* (the Q blocks of FA2,
the K/V blocks of FA2's dK/dV pass) is vectorised here as a tensor dimension, so only the
sequential loop remains a Python loop.  That makes them fast enough to be the CPU path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._runtime import acc_dtype, lse_dtype

__all__ = [
    "visible_mask",
    "attention_ref",
    "online_softmax",
    "tiling_softmax",
    "fa1_forward",
    "fa2_forward",
    "fa2_backward",
    "attention_probs",
    "merge_states",
    "split_kv_forward",
    "varlen_sequences",
    "varlen_forward",
    "varlen_backward",
    "kvcache_append",
    "kvcache_forward",
]


def visible_mask(
    sq: int,
    sk: int,
    causal: bool,
    bottom_right: bool = True,
    device: torch.device | str | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor | None:
    """Boolean (sq, sk) mask, True where query ``i`` may attend key ``j``; None if every key is
    visible (not causal, no window).  ``window_size`` as :func:`_visible`."""
    if not causal and tuple(window_size) == (-1, -1):
        return None
    offset = (sk - sq) if bottom_right else 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return _visible(i, j, sk, offset, causal, window_size)


def _expand_kv(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, S, H_kv, D) -> (B, S, H, D) by repeating each K/V head for its query-head group."""
    h_kv = x.shape[2]
    return x if h_kv == h else x.repeat_interleave(h // h_kv, dim=2)


def cap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Softcapping (Gemma 2; flash-attn's ``softcap``): scaled scores ``s`` -> ``softcap *
    tanh(s / softcap)``; ``softcap = 0`` leaves them as they are."""
    return softcap * torch.tanh(s / softcap) if softcap else s


def alibi_bias(
    alibi_slopes: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor, offset: int, dtype: torch.dtype,
) -> torch.Tensor | float:
    """ALiBi (flash-attn's ``alibi_slopes``, fp32 (H,) or (B, H)): the bias ``-slope * |i + offset
    - j|`` of query ``i`` and key ``j`` (offset Sk - Sq: distances from the bottom-right diagonal),
    in ``dtype``, shaped (B or 1, H, *broadcast(i, j)); 0 without slopes."""
    if alibi_slopes is None:
        return 0.0
    slopes = (alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]).to(dtype)  # (B or 1, H)
    dist = (i + offset - j).abs().to(dtype)
    return -slopes.view(*slopes.shape, *([1] * dist.dim())) * dist


def add_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None,
              head_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention sinks (gpt-oss; FA4's ``learnable_sink``): the per-head logit ``sink`` (H,) joins
    the softmax denominator of every row and attends to no value, i.e. it is one more key chunk
    whose output is 0: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')``.
    ``lse`` has its heads on dim ``head_dim`` ((B, H, Sq): 1; varlen's (H, Tq): 0) and ``out``
    the matching (..., S, H, D) layout.  Differentiable (the oracle's gradient to the sink)."""
    if sink is None:
        return out, lse
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    new_lse = torch.logaddexp(lse, sink.to(lse.dtype).view(shape))
    weight = torch.exp(lse - new_lse)  # 0 where the row saw no key (lse = -inf)
    weight = weight.transpose(head_dim, head_dim + 1).unsqueeze(-1)  # out's (..., S, H, 1)
    return (out * weight).to(out.dtype), new_lse


# -- dropout: the kernels' Philox mask, bit for bit ---------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``a * b`` for a uint32 constant and an int64 tensor of uint32
    values, in int64 arithmetic (split at 16 bits, so no product overflows)."""
    t1 = a * (b & 0xFFFF)  # < 2^48
    t2 = a * (b >> 16)
    s = t1 + ((t2 & 0xFFFF) << 16)
    return (t2 >> 16) + (s >> 32), s & _M32


def philox(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
           c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-7 on int64 tensors holding uint32 words, keyed by the int64 ``seed`` (a 0-d
    or (1,) tensor): the kernels' :func:`flash_module.kernels._common.philox`."""
    seed = seed.reshape(())
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(7):
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
    return c0, c1, c2, c3


def dropout_thresh(dropout_p: float) -> int:
    """A probability is dropped iff its 16-bit uniform draw is below ``round(p * 65536)``
    (clamped to 65535: at p = 1 the scale is 0 and the mask no longer matters)."""
    return min(65535, int(round(dropout_p * 65536)))


def dropout_keep(rng: torch.Tensor, dropout_p: float, row_ids: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """The kernels' dropout keep mask (:func:`flash_module.kernels._common.dropout_keep`, which
    says why it is laid out so): True where the probability of query row counter ``row_ids`` and
    key ``cols`` is kept (int64 tensors, broadcast together).  Row counters are ``stream << 32 |
    i``, ``stream = b * H + h`` for batch (or varlen sequence) b and query head h, ``i`` the row
    within the sequence (:meth:`Dropout.row_ids`).  Row ``i`` and key ``j`` use the Philox
    counter ``(key quad, row pair, stream, 0)`` with row pair ``(i // 16) * 8 + i % 8`` and key
    quad ``(j // 16) * 4 + (j % 8) // 2``, and read half ``j % 2`` of word ``2 ((i // 8) % 2) +
    (j // 8) % 2``."""
    row_ids, cols = torch.broadcast_tensors(row_ids.to(torch.int64), cols.to(torch.int64))
    i, stream = row_ids & _M32, row_ids >> 32
    quad, pair = (cols >> 4) * 4 + ((cols & 7) >> 1), (i >> 4) * 8 + (i & 7)
    words = philox(rng.to(row_ids.device), quad, pair, stream, torch.zeros_like(cols))
    word = ((i >> 3) & 1) * 2 + ((cols >> 3) & 1)
    w = torch.where(word == 0, words[0],
                    torch.where(word == 1, words[1], torch.where(word == 2, words[2], words[3])))
    return ((w >> ((cols & 1) * 16)) & 0xFFFF) >= dropout_thresh(dropout_p)


def dropout_scale(dropout_p: float) -> float:
    """What kept probabilities are multiplied by: ``1 / (1 - p)`` (0 for p = 1)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0


@dataclass(frozen=True)
class Dropout:
    """Dropout of the blocked loops: probability ``p``, the int64 seed ``rng``, and ``batch0``, the
    batch index of this call's first batch row (a varlen sequence, run as a batch of one, passes
    its index in the pack): row ``i`` of batch row b, head h has the counter ``((batch0 + b) * H
    + h) << 32 | i`` (:func:`dropout_keep`)."""

    p: float
    rng: torch.Tensor
    batch0: int = 0
    row0: int = 0  # the call's rows and keys in a longer sequence's mask (ring attention's chunks:
    col0: int = 0  # the kernels' dropout_args offset and offset - shift)

    def row_ids(self, b: int, h: int, sq: int, device: torch.device,
                n_rows: int | None = None) -> torch.Tensor:
        """(B, H, n_rows, 1) counters of rows 0 .. n_rows - 1 (default Sq) of every (batch, head),
        for :meth:`keep`."""
        streams = (torch.arange(b, device=device)[:, None] + self.batch0) * h + torch.arange(h, device=device)
        rows = torch.arange(sq if n_rows is None else n_rows, device=device) + self.row0
        return ((streams << 32)[..., None] + rows)[..., None]

    def keep(self, row_ids: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """:func:`dropout_keep` of counters from :meth:`row_ids` and this call's keys ``cols``."""
        return dropout_keep(self.rng, self.p, row_ids, cols + self.col0)


def dropout_mask(rng: torch.Tensor, dropout_p: float, batch: int, nheads: int, seqlen_q: int,
                 seqlen_k: int) -> torch.Tensor:
    """The whole (B, H, Sq, Sk) keep mask of a (B, Sq, H, D) call (O(Sq * Sk): for tests)."""
    rows = Dropout(dropout_p, rng).row_ids(batch, nheads, seqlen_q, rng.device)
    return dropout_keep(rng, dropout_p, rows, torch.arange(seqlen_k, device=rng.device))


def additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` as an additive mask in ``dtype``: a boolean mask (True = attend, as
    in torch) becomes 0 / -inf; a float mask is cast.  Shape unchanged (still broadcastable)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def mask_columns(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], start: int, end: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """Key columns [start, end) of an attention mask broadcast to ``shape`` (B, H, Sq, Sk), as an
    additive mask in ``dtype``: (B or 1, H or 1, Sq or 1, end - start), O(Sq * block) memory."""
    if attn_mask is None:
        return None
    m = attn_mask.expand(*attn_mask.shape[:3], shape[3])[..., start:end]
    return additive_mask(m, dtype)


def batch_slopes(alibi_slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Batch ``b``'s row of (B, H) slopes as (1, H); (H,) slopes and None as they are."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b:b + 1]


def _bias_and_mask(s: torch.Tensor, causal: bool, bottom_right: bool, alibi_slopes: torch.Tensor | None,
                   window_size: tuple[int, int]) -> torch.Tensor:
    """A full (B, H, Sq, Sk) score matrix with the ALiBi bias added and invisible keys at -inf."""
    sq, sk = s.shape[-2:]
    i, j = torch.arange(sq, device=s.device)[:, None], torch.arange(sk, device=s.device)[None, :]
    s = s + alibi_bias(alibi_slopes, i, j, sk - sq if bottom_right else 0, s.dtype)
    mask = visible_mask(sq, sk, causal, bottom_right, s.device, window_size)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    bottom_right: bool = True,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive attention, materialising the (Sq, Sk) score matrix. Returns ``(out, lse)``.
    ``attn_mask``: SDPA's mask (bool, True = attend; or additive float), broadcastable to
    (B, H, Sq, Sk), added after the bias; rows it hides entirely give 0 (LSE -inf).
    ``dropout_mask`` (bool, broadcastable to (B, H, Sq, Sk), True = kept; e.g.
    :func:`dropout_mask`): dropout of the probabilities with rate ``dropout_p``.

    Computes in the inputs' dtype (matmuls as PyTorch does them in that dtype), so
    ``attention_ref(q.double(), ...)`` is the float64 oracle and ``attention_ref(q_bf16, ...)``
    shows the error PyTorch itself makes in bf16.  Differentiable by autograd.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    h = q.shape[2]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    # (B, H, Sq, Sk)
    # Scores come out of the matmul in the input dtype (rounded as PyTorch rounds them), then the
    # softmax runs in the accumulator dtype.
    s = cap_scores(torch.einsum("bqhd,bkhd->bhqk", q, k).to(acc_dtype(q.dtype)) * scale, softcap)
    s = _bias_and_mask(s, causal, bottom_right, alibi_slopes, window_size)
    if attn_mask is not None:
        s = s + additive_mask(attn_mask, s.dtype)
    if sink is not None:  # one more column in the denominator, with no value
        column = sink.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, column], -1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq); -inf for rows that see nothing
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    if dropout_mask is not None:  # dropout after the softmax: kept entries rescaled, LSE unchanged
        p = p.masked_fill(~dropout_mask, 0.0) * dropout_scale(dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    return out.to(q.dtype), lse.to(acc_dtype(q.dtype))


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    dropout: Dropout | None = None,
    block_n: int = 64,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recompute the softmax probabilities P = exp(S - lse), (B, H, Sq, Sk), from a saved LSE.

    This is what ``return_attn_probs=True`` returns: O(Sq·Sk) memory, for testing and inspection.

    With ``dropout`` it returns flash-attn's ``S_dmask`` instead, the values its forward kernel
    holds: ``exp(S - m)`` with ``m`` the running row max when the key block of width
    ``block_n`` holding the entry is processed (key blocks run from the last to the first, so
    ``m`` is the max over that block and all later ones), negated where the entry is dropped.
    flash-attn's tests recover P from it with the same ``block_n``; the sign is the mask.
    """
    h = q.shape[2]
    acc = acc_dtype(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), _expand_kv(k, h).to(acc)) * softmax_scale
    s = cap_scores(s, softcap)
    s = _bias_and_mask(s, causal, bottom_right, alibi_slopes, window_size)
    if attn_mask is not None:
        s = s + additive_mask(attn_mask, s.dtype)
    if dropout is None:
        safe_lse = lse.masked_fill(torch.isinf(lse), float("inf"))
        return torch.exp((s - safe_lse[..., None]).to(acc))
    sq, sk = s.shape[-2:]
    blocks = torch.nn.functional.pad(s, (0, -sk % block_n), value=float("-inf")).unflatten(-1, (-1, block_n))
    m = blocks.amax(-1).flip(-1).cummax(-1).values.flip(-1)  # (B, H, Sq, nblocks): max of blocks >= j
    m = m.repeat_interleave(block_n, -1)[..., :sk]
    vals = torch.exp(s - _neg_inf_to_zero(m))  # exp(-inf) = 0 where masked
    rows = dropout.row_ids(s.shape[0], h, sq, s.device)
    keep = dropout.keep(rows, torch.arange(sk, device=s.device))
    return torch.where(keep, vals, -vals)


# ---------------------------------------------------------------------------------------------
# Softmax in one streaming pass (online; Milakov & Gimelshein 2018) and split in parallel (tiling)
# ---------------------------------------------------------------------------------------------


def online_softmax(x: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Softmax over the last dim with the online (streaming) algorithm.

    Pass 1 walks the row once, ``block`` elements at a time, keeping a running max ``m`` and a
    running sum ``s`` of ``exp(x - m)``; when a larger max arrives the old sum is rescaled by
    ``exp(m_old - m_new)``.  Pass 2 writes ``exp(x - m) / s``.  ``block=1`` is the element-by-
    element loop of the online softmax; rows are processed in parallel.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    m = torch.full(x.shape[:-1], float("-inf"), dtype=acc, device=x.device)
    s = torch.zeros(x.shape[:-1], dtype=acc, device=x.device)
    for start in range(0, x.shape[-1], block):
        chunk = xf[..., start : start + block]
        m_new = torch.maximum(m, chunk.amax(dim=-1))
        # exp(-inf - -inf) would be NaN: a row that has seen only -inf keeps s = 0.
        m_safe = m_new.masked_fill(torch.isinf(m_new) & (m_new < 0), 0.0)
        s = s * torch.exp(m - m_safe) + torch.exp(chunk - m_safe[..., None]).sum(dim=-1)
        m = m_new
    m_safe = m.masked_fill(torch.isinf(m) & (m < 0), 0.0)
    return (torch.exp(xf - m_safe[..., None]) / s[..., None]).to(x.dtype)


def tiling_softmax(x: torch.Tensor, num_splits: int = 4) -> torch.Tensor:
    """Softmax over the last dim with the tiling (split) algorithm.

    The row is cut into ``num_splits`` chunks; each chunk independently computes its local max
    ``m_c`` and local sum ``s_c = sum(exp(x - m_c))`` (in parallel: here a tensor dimension).
    The merge takes the global max ``M = max_c m_c`` and the global sum
    ``S = sum_c s_c * exp(m_c - M)``; each chunk's values are rescaled by ``exp(m_c - M) / S``.
    """
    n = x.shape[-1]
    num_splits = max(1, min(num_splits, n))
    chunk = math.ceil(n / num_splits)
    pad = chunk * num_splits - n
    acc = acc_dtype(x.dtype)
    xf = torch.nn.functional.pad(x.to(acc), (0, pad), value=float("-inf"))
    xs = xf.unflatten(-1, (num_splits, chunk))  # (..., splits, chunk)
    m_c = xs.amax(dim=-1)  # local max per chunk
    m_c_safe = m_c.masked_fill(torch.isinf(m_c) & (m_c < 0), 0.0)
    e = torch.exp(xs - m_c_safe[..., None])  # local exp
    s_c = e.sum(dim=-1)  # local sum
    big_m = m_c.amax(dim=-1, keepdim=True)  # merge: global max
    big_m = big_m.masked_fill(torch.isinf(big_m) & (big_m < 0), 0.0)
    w = torch.exp(m_c_safe - big_m) * (s_c > 0)  # rescale factor of each chunk
    total = (s_c * w).sum(dim=-1, keepdim=True)
    out = e * (w / total)[..., None]
    return out.flatten(-2)[..., :n].to(x.dtype)


# ---------------------------------------------------------------------------------------------
# FlashAttention v1 (Dao et al. 2022) and v2 (Dao 2023) tiled loops
# ---------------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block: int, value: float = 0.0) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, nblocks, block, D), padding S up to a multiple of ``block``."""
    b, s, h, d = x.shape
    n = math.ceil(s / block)
    if n * block != s:  # (no copy when S divides into blocks)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * block - s), value=value)
    return x.reshape(b, n, block, h, d).permute(0, 3, 1, 2, 4)


def _causal_offset(sq: int, sk: int, bottom_right: bool, shift: int = 0) -> int:
    """Query ``i`` sees key ``j <= i + offset``: Sk - Sq bottom-right (flash-attn), 0 top-left,
    plus ``shift`` (ring attention: the key chunk's distance behind the query chunk)."""
    return ((sk - sq) if bottom_right else 0) + shift


def _visible(i: torch.Tensor, j: torch.Tensor, sk: int, offset: int, causal: bool,
             window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Where query ``i`` may see key ``j`` (broadcasting): inside Sk; if causal, ``j <= i +
    offset``; with ``window_size = (left, right)`` (flash-attn's sliding window, -1 = unbounded)
    inside ``[i + offset - left, i + offset + right]``.

    The PyTorch twin of the kernels' ``visible`` step; the blocked loops call it per key block,
    so no (Sq, Sk) mask is ever built.
    """
    keep = j < sk
    if causal:
        keep = keep & (j <= i + offset)
    left, right = window_size
    if left >= 0:
        keep = keep & (j >= i + offset - left)
    if right >= 0:
        keep = keep & (j <= i + offset + right)
    return keep


def _by_group(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(B, H, ...) -> (B, H_kv, G, ...), a view: query head ``hk * G + g`` uses K/V head ``hk``
    (GQA, as the kernels pack the heads)."""
    return x.unflatten(1, (h_kv, x.shape[1] // h_kv))


def _group_qk(qb: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """Q blocks (B, H, nQ, Br, D) times one K block (B, H_kv, Bc, D) -> (B, H, nQ, Br, Bc): each
    K/V head meets its GQA group of query heads (:func:`_by_group`) without a copy of K per
    query head."""
    if qb.shape[1] == kj.shape[1]:
        return torch.einsum("bhnqd,bhkd->bhnqk", qb, kj)
    return torch.einsum("bhgnqd,bhkd->bhgnqk", _by_group(qb, kj.shape[1]), kj).flatten(1, 2)


def _group_pv(p: torch.Tensor, vj: torch.Tensor) -> torch.Tensor:
    """P blocks (B, H, nQ, Br, Bc) times one V block (B, H_kv, Bc, D) -> (B, H, nQ, Br, D), the
    GQA groups as in :func:`_group_qk`."""
    if p.shape[1] == vj.shape[1]:
        return torch.einsum("bhnqk,bhkd->bhnqd", p, vj)
    return torch.einsum("bhgnqk,bhkd->bhgnqd", _by_group(p, vj.shape[1]), vj).flatten(1, 2)


def _block_scores(
    qb: torch.Tensor, kj: torch.Tensor, scale: float, sk: int, k_start: int, block_m: int, causal: bool,
    offset: int, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Scores of every query block against one key block (``kj``: (B, H_kv, Bc, D)), capped,
    biased and masked.  (B, H, nQ, Br, Bc)."""
    s = cap_scores(_group_qk(qb, kj) * scale, softcap)
    i = torch.arange(qb.shape[2] * block_m, device=qb.device).view(qb.shape[2], block_m, 1)
    j = torch.arange(k_start, k_start + kj.shape[2], device=qb.device).view(1, 1, -1)
    s = s + alibi_bias(alibi_slopes, i, j, offset, s.dtype)
    return s.masked_fill(~_visible(i, j, sk, offset, causal, window_size), float("-inf"))


def _neg_inf_to_zero(m: torch.Tensor) -> torch.Tensor:
    return m.masked_fill(torch.isinf(m) & (m < 0), 0.0)


def _tiled_start(q, k, v, softmax_scale, block_m, block_n):
    """Common set-up of the tiled loops: the scale, blocked Q/K/V in the accumulator dtype, and
    the running state O = 0, l = 0, m = -inf for every query row.  Returns
    (scale, qb (B, H, nQ, Br, D), kb, vb (B, H_kv, nK, Bc, D), o, l, m): K/V keep their own heads
    (GQA: :func:`_group_qk` / :func:`_group_pv` share each among its query group; a decode
    step over a long cache converts H_kv heads, not H)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = acc_dtype(q.dtype)
    qb = _blocks(q.to(acc), block_m)
    kb = _blocks(k.to(acc), block_n)
    vb = _blocks(v.to(acc), block_n)
    l = torch.zeros(qb.shape[:-1], dtype=acc, device=q.device)  # (B, H, nQ, Br)
    return scale, qb, kb, vb, torch.zeros_like(qb), l, torch.full_like(l, float("-inf"))


def _tiled_finish(o, l, m, q, out_dtype=None):
    """(out (B, Sq, H, D) in q's dtype (or ``out_dtype``), lse (B, H, Sq)) from blocked state;
    rows with l = 0 get LSE -inf."""
    b, sq, h, d = q.shape
    seen = l > 0
    # In lse_dtype (float64 for fp32 inputs): the backward recomputes P from it.
    lse_t = lse_dtype(q.dtype)
    lse = torch.where(seen, m.to(lse_t) + torch.log(torch.where(seen, l, torch.ones_like(l))).to(lse_t),
                      torch.full_like(l, float("-inf"), dtype=lse_t))
    out = o.permute(0, 2, 3, 1, 4).reshape(b, -1, h, d)[:, :sq]
    return out.to(out_dtype or q.dtype), lse.flatten(2)[..., :sq].contiguous()


def fa1_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    bottom_right: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    shift: int = 0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention v1 (Algorithm 1 of the FA1 paper). Returns ``(out, lse)``, ``out`` in
    ``out_dtype`` (default: q's).

    Outer loop over K/V blocks ``j`` (size Bc = ``block_n``); inner loop over Q blocks ``i``
    (size Br = ``block_m``, vectorised here).  O, l and m live in "HBM" (full-size tensors):
    each time a K/V block streams past, every query block reads its O_i, l_i, m_i, merges the
    block's contribution and writes back a *normalised* O_i:

        m_ij = rowmax(S_ij),  P_ij = exp(S_ij - m_ij),  l_ij = rowsum(P_ij)
        m_new = max(m_i, m_ij),  l_new = exp(m_i - m_new) l_i + exp(m_ij - m_new) l_ij
        O_i  = (l_i exp(m_i - m_new) O_i + exp(m_ij - m_new) P_ij V_j) / l_new
    """
    sq, sk = q.shape[1], k.shape[1]
    offset = _causal_offset(sq, sk, bottom_right, shift)
    # O, l, m: full-size tensors, i.e. "in HBM", read and written back for every K/V block.
    scale, qb, kb, vb, o, l, m = _tiled_start(q, k, v, softmax_scale, block_m, block_n)
    for j in range(kb.shape[2]):  # outer loop: K/V blocks
        s = _block_scores(qb, kb[:, :, j], scale, sk, j * block_n, block_m, causal, offset)
        m_ij = s.amax(dim=-1)
        p = torch.exp(s - _neg_inf_to_zero(m_ij)[..., None])
        l_ij = p.sum(dim=-1)
        m_new = torch.maximum(m, m_ij)
        m_new_safe = _neg_inf_to_zero(m_new)
        alpha = torch.exp(m - m_new_safe)  # rescale of the old state
        beta = torch.exp(m_ij - m_new_safe)  # rescale of the new block
        l_new = alpha * l + beta * l_ij
        pv = _group_pv(p, vb[:, :, j])
        l_div = torch.where(l_new > 0, l_new, torch.ones_like(l_new))
        o = ((alpha * l)[..., None] * o + beta[..., None] * pv) / l_div[..., None]
        l, m = l_new, m_new
    return _tiled_finish(o, l, m, q, out_dtype)


def fa2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    bottom_right: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None,
    dropout: Dropout | None = None,
    attn_mask: torch.Tensor | None = None,
    shift: int = 0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention v2 forward (Algorithm 1 of the FA2 paper). Returns ``(out, lse)``, ``out``
    in ``out_dtype`` (default: q's; the ring's merges ask for the accumulator dtype).

    Outer loop over Q blocks (parallel: vectorised here), inner loop over K/V blocks.  Each
    query block keeps an *unnormalised* accumulator and its running max/sum on chip:

        m_new = max(m, rowmax(S_j)),  P_j = exp(S_j - m_new)
        l = exp(m - m_new) l + rowsum(P_j),  acc = exp(m - m_new) acc + P_j V_j

    and divides once at the end: O = acc / l.  Only LSE = m + log(l) is saved for the backward.
    Block sizes default to :func:`_auto_blocks` (few query rows: few, long key blocks).
    With ``dropout`` the dropped entries of P_j leave ``acc`` (not ``l``) and O is rescaled by
    1 / (1 - p): the kernels' mask (:func:`dropout_keep`), bit for bit.
    """
    offset = _causal_offset(q.shape[1], k.shape[1], bottom_right, shift)
    auto_m, auto_n = _auto_blocks(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    out, lse = _fa2_loop(q, k, v, softmax_scale, causal, offset, block_m or auto_m, block_n or auto_n,
                         softcap, alibi_slopes, window_size, dropout, attn_mask)
    out, lse = add_sink(out, lse, sink)
    return out.to(out_dtype or q.dtype), lse


def _blocked_mask(attn_mask, q, sk, start, block_n, rows, block_m, dtype):
    """Key block [start, start + block_n) of the mask in the loops' blocked layout (B or 1, H or
    1, nQ or 1, Br or 1, Bc): padded to ``rows`` query rows and ``block_n`` columns with 0."""
    mj = mask_columns(attn_mask, (q.shape[0], q.shape[2], q.shape[1], sk), start, start + block_n, dtype)
    per_row = mj.shape[2] > 1
    mj = torch.nn.functional.pad(mj, (0, block_n - mj.shape[3], 0, rows - mj.shape[2] if per_row else 0))
    return mj.view(*mj.shape[:2], rows // block_m if per_row else 1, block_m if per_row else 1, block_n)


#: Score elements one key block of the PyTorch loops may hold (B * H * padded Sq * block_n): the
#: memory bound of a step, O(Sq) per key block as in the kernels.
SCORE_BUDGET = 1 << 21


def _auto_blocks(b: int, h: int, sq: int, sk: int) -> tuple[int, int]:
    """``(block_m, block_n)`` for the PyTorch FA2 loop: query blocks of up to 64 rows (no padding
    of a short query side to 64), and key blocks as long as :data:`SCORE_BUDGET` allows (at least
    64, at most Sk, split evenly), so that decoding (one query row) runs a handful of key blocks
    instead of Sk / 64 Python steps."""
    block_m = max(1, min(64, sq))
    rows = b * h * math.ceil(max(sq, 1) / block_m) * block_m
    longest = max(64, SCORE_BUDGET // max(rows, 1))
    n_blocks = max(1, math.ceil(sk / longest))
    return block_m, max(1, math.ceil(max(sk, 1) / n_blocks))


def _fa2_loop(q, k, v, softmax_scale, causal, offset, block_m=64, block_n=64, softcap=0.0, alibi_slopes=None,
              window_size=(-1, -1), dropout=None, attn_mask=None):
    """FA2's loops with an explicit causal offset; ``out`` stays in the accumulator dtype.
    ``attn_mask`` (broadcastable to (B, H, Sq, Sk)) is read one key block at a time."""
    sk = k.shape[1]
    # All query blocks at once (the kernel's grid); acc, l, m stay "on chip" per query block.
    scale, qb, kb, vb, acc, l, m = _tiled_start(q, k, v, softmax_scale, block_m, block_n)
    if dropout is not None:  # (B, H, nQ, Br, 1) row counters of the blocked rows
        b, h = q.shape[0], q.shape[2]
        rows = dropout.row_ids(b, h, q.shape[1], q.device, qb.shape[2] * block_m).view(b, h, -1, block_m, 1)
    for j in range(kb.shape[2]):  # inner loop of the kernel: K/V blocks
        s = _block_scores(qb, kb[:, :, j], scale, sk, j * block_n, block_m, causal, offset, softcap,
                          alibi_slopes, window_size)
        if attn_mask is not None:
            s = s + _blocked_mask(attn_mask, q, sk, j * block_n, block_n, qb.shape[2] * block_m, block_m,
                                  s.dtype)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_new_safe = _neg_inf_to_zero(m_new)
        p = torch.exp(s - m_new_safe[..., None])
        alpha = torch.exp(m - m_new_safe)
        l = alpha * l + p.sum(dim=-1)
        if dropout is not None:  # dropped probabilities stay in l, leave acc
            cols = torch.arange(j * block_n, (j + 1) * block_n, device=q.device)
            p = p * dropout.keep(rows, cols).to(p.dtype)
        acc = alpha[..., None] * acc + _group_pv(p, vb[:, :, j])
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]  # the single final division
    if dropout is not None:
        out = out * dropout_scale(dropout.p)
    return _tiled_finish(out, l, m, q, out_dtype=acc.dtype)


def fa2_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    bottom_right: bool = True,
    dlse: torch.Tensor | None = None,
    block_n: int = 128,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    dropout: Dropout | None = None,
    attn_mask: torch.Tensor | None = None,
    mask_grad: bool = False,
    shift: int = 0,
) -> tuple[torch.Tensor, ...]:
    """FlashAttention v2 backward from the saved ``(out, lse)``. Returns ``(dq, dk, dv)``, and
    with ``mask_grad`` also the gradient of the (float) ``attn_mask``, shaped like it: dS
    itself, summed over the dims it broadcasts.

    Never stores P: each K/V block recomputes ``P = exp(S - lse)`` for all queries, then

        dV_j = P^T dO,  dP = dO V_j^T,  dS = P * (dP - delta),  dQ += scale dS K_j,
        dK_j = scale dS^T Q,   with  delta = rowsum(dO * O) - dlse.

    (A gradient ``dlse`` flowing into the LSE adds ``dlse * P`` to dS, which is the same as
    subtracting it from ``delta``.)  With ``softcap`` the scores are ``c tanh(s / c)``, and dS is
    multiplied by their derivative ``1 - tanh^2`` before it meets Q and K.  With ``dropout``
    (the forward's mask, regenerated) dV takes the dropped P and dP is multiplied by the mask
    and 1 / (1 - p) before it meets P.
    The loop over K/V blocks is the dK/dV kernel's grid.
    Memory is O(Sq · block_n).  GQA: K/V are not copied per query head; dK/dV are summed over
    each K/V head's query group.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    qf = q.to(acc).transpose(1, 2)  # (B, H, Sq, D)
    dof = dout.to(acc).transpose(1, 2)
    kf = k.to(acc).transpose(1, 2)  # (B, H_kv, Sk, D): each K/V head serves its GQA group
    vf = v.to(acc).transpose(1, 2)

    def by_group(x: torch.Tensor) -> torch.Tensor:
        return _by_group(x, h_kv)

    delta = (dof * out.to(acc).transpose(1, 2)).sum(-1)  # (B, H, Sq)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse_safe = lse.masked_fill(torch.isinf(lse), float("inf"))  # empty rows: P = 0
    dq = torch.zeros_like(qf)
    dmask = torch.zeros(attn_mask.shape, dtype=acc, device=q.device) if mask_grad else None
    dk = torch.empty_like(kf)
    dv = torch.empty_like(vf)
    offset = _causal_offset(sq, sk, bottom_right, shift)
    rows = torch.arange(sq, device=q.device)[:, None]
    if dropout is not None:
        drop_rows = dropout.row_ids(b, h, sq, q.device)  # (B, H, Sq, 1)
        keep_scale = dropout_scale(dropout.p)
    for start in range(0, sk, block_n):
        end = min(start + block_n, sk)
        kj, vj = kf[:, :, start:end], vf[:, :, start:end]
        s = torch.einsum("bhgqd,bhkd->bhgqk", by_group(qf), kj).flatten(1, 2) * scale  # (B, H, Sq, Bc)
        if softcap:
            t = torch.tanh(s / softcap)
            s = softcap * t
        cols = torch.arange(start, end, device=q.device)[None, :]
        s = s + alibi_bias(alibi_slopes, rows, cols, offset, acc)
        if causal or tuple(window_size) != (-1, -1):  # this block's (Sq, Bc) mask only: O(Sq * block_n)
            s = s.masked_fill(~_visible(rows, cols, sk, offset, causal, window_size), float("-inf"))
        if attn_mask is not None:
            s = s + mask_columns(attn_mask, (b, h, sq, sk), start, end, acc)
        p = torch.exp((s - lse_safe[..., None]).to(acc))  # (B, H, Sq, Bc); s - lse in the LSE's dtype
        dp = torch.einsum("bhgqd,bhkd->bhgqk", by_group(dof), vj).flatten(1, 2)
        # dK/dV of a K/V head: summed over its query group inside the einsums
        if dropout is not None:
            keep = dropout.keep(drop_rows, cols).to(acc) * keep_scale
            dv[:, :, start:end] = torch.einsum("bhgqk,bhgqd->bhkd", by_group(p * keep), by_group(dof))
            dp = dp * keep
        else:
            dv[:, :, start:end] = torch.einsum("bhgqk,bhgqd->bhkd", by_group(p), by_group(dof))
        ds = p * (dp - delta[..., None])
        if mask_grad:  # the mask is added after the cap: its gradient is dS before the cap's factor
            dmask = _accumulate_mask_grad(dmask, ds, attn_mask, start, end)
        if softcap:
            ds = ds * (1 - t * t)
        dq += torch.einsum("bhgqk,bhkd->bhgqd", by_group(ds), kj).flatten(1, 2) * scale
        dk[:, :, start:end] = torch.einsum("bhgqk,bhgqd->bhkd", by_group(ds), by_group(qf)) * scale
    dq = dq.transpose(1, 2).to(q.dtype)
    dk = dk.transpose(1, 2).to(k.dtype)
    dv = dv.transpose(1, 2).to(v.dtype)
    if mask_grad:
        return dq, dk, dv, dmask.to(attn_mask.dtype)
    return dq, dk, dv


def _accumulate_mask_grad(dmask: torch.Tensor, ds: torch.Tensor, attn_mask: torch.Tensor, start: int,
                          end: int) -> torch.Tensor:
    """Add key block [start, end)'s dS (B, H, Sq, w) into the mask's gradient, summed over the
    dims the mask broadcasts (size 1, or missing in front)."""
    lead = ds.dim() - dmask.dim()
    g = ds.sum(dim=tuple(range(lead))) if lead else ds
    dims = tuple(i for i in range(g.dim() - 1) if dmask.shape[i] == 1 and g.shape[i] != 1)
    g = g.sum(dim=dims, keepdim=True) if dims else g
    if dmask.shape[-1] == 1:
        return dmask + g.sum(-1, keepdim=True)
    dmask[..., start:end] += g
    return dmask


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiling softmax's merge, on attention states: (B, S, H, D) outputs, (B, H, S) LSEs.

    Global max M = max(lse_a, lse_b); each part is rescaled by exp(lse_x - M); the sums add.
    """
    big_m = _neg_inf_to_zero(torch.maximum(lse_a, lse_b))
    w_a, w_b = torch.exp(lse_a - big_m), torch.exp(lse_b - big_m)
    total = w_a + w_b
    seen = total > 0
    t = torch.where(seen, total, torch.ones_like(total))
    wa, wb = (w_a / t).transpose(1, 2)[..., None], (w_b / t).transpose(1, 2)[..., None]
    out = wa * out_a.to(w_a.dtype) + wb * out_b.to(w_b.dtype)
    lse = torch.where(seen, big_m + torch.log(t), torch.full_like(t, float("-inf")))
    return out.to(out_a.dtype), lse


def split_kv_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    bottom_right: bool = True,
    num_splits: int = 4,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None,
    shift: int = 0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiling-softmax attention (split-KV): each key chunk gives (O_c, lse_c); merge them all.

    The chunks are independent (in parallel on a GPU); the merge is :func:`merge_states`,
    applied left to right.  Returns ``(out, lse)``.
    """
    sq, sk = q.shape[1], k.shape[1]
    chunk = math.ceil(sk / max(1, min(num_splits, sk)))
    offset = _causal_offset(sq, sk, bottom_right, shift)
    out, lse = None, None
    for start in range(0, sk, chunk):
        kc, vc = k[:, start:start + chunk], v[:, start:start + chunk]
        # Global key start + j is visible to query i iff j <= i + offset - start.  Each chunk runs
        # FA2's blocked loop, so memory stays O(Sq * block) however few the chunks.
        out_c, lse_c = _fa2_loop(q, kc, vc, softmax_scale, causal, offset - start, softcap=softcap,
                                 alibi_slopes=alibi_slopes, window_size=window_size)
        out, lse = (out_c, lse_c) if out is None else merge_states(out, lse, out_c, lse_c)
    out, lse = add_sink(out, lse, sink)  # the sink: one more chunk, with no value
    return out.to(out_dtype or q.dtype), lse


# -- varlen: packed sequences, one sequence at a time -----------------------------------------


def varlen_sequences(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
    seqused_k: torch.Tensor | None = None,
) -> list[tuple[int, int, int, int]]:
    """``(q_start, len_q, k_start, len_k)`` of each packed sequence, clamped as the kernels
    clamp them (offsets into [0, total], lengths >= 0, ``seqused_k`` into [0, len_k]).

    Reads the offsets on the host: free for CPU tensors, a device sync for CUDA ones (this is
    the PyTorch path; the Triton kernels never sync).
    """
    def bounds(cu: torch.Tensor, total: int) -> list[tuple[int, int]]:
        offsets = cu.tolist()
        out = []
        for b in range(len(offsets) - 1):
            start = min(max(offsets[b], 0), total)
            end = min(max(offsets[b + 1], start), total)
            out.append((start, end - start))
        return out

    used = seqused_k.tolist() if seqused_k is not None else None
    seqs = []
    pairs = zip(bounds(cu_seqlens_q, total_q), bounds(cu_seqlens_k, total_k))
    for b, ((qs, lq), (ks, lk)) in enumerate(pairs):
        seqs.append((qs, lq, ks, min(max(used[b], 0), lk) if used is not None else lk))
    return seqs


def _varlen_dropout(dropout_p: float, rng: torch.Tensor | None, seq: int) -> Dropout | None:
    """Packed sequence ``seq``'s dropout: its rows count as batch row ``seq`` of a dense call."""
    return Dropout(dropout_p, rng, seq) if dropout_p else None


def varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1), sink: torch.Tensor | None = None, dropout_p: float = 0.0,
    rng: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA2's blocked forward on each packed sequence (causal and window bottom-right per sequence).

    q (Tq, H, D), k/v (Tk, H_kv, D), or with ``block_table`` (B, pages_per_seq) a paged cache
    (num_pages, page, H_kv, D) whose pages ``block_table[b]`` hold sequence ``b``'s keys.
    Returns ``out`` (Tq, H, D) and ``lse`` (H, Tq) in ``lse_dtype``; rows in no sequence get
    0 / -inf.
    """
    tq, h, d = q.shape
    out = torch.zeros_like(q, dtype=out_dtype or q.dtype, memory_format=torch.contiguous_format)
    lse = torch.full((h, tq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    n_table = block_table.shape[1] * k.shape[1] if block_table is not None else 0
    total_k = (cu_seqlens_q.numel() - 1) * n_table if block_table is not None else k.shape[0]
    seqs = varlen_sequences(cu_seqlens_q, cu_seqlens_k, tq, total_k, seqused_k)
    for b, (qs, lq, ks, lk) in enumerate(seqs):
        if block_table is not None:  # this sequence's pages, back to back (indices clamped)
            pages = block_table[b].long().clamp(0, k.shape[0] - 1)
            keys, values = (c[pages].flatten(0, 1) for c in (k, v))
            ks, lk = 0, min(lk, n_table)
        else:
            keys, values = k, v
        rq, rk = slice(qs, qs + lq), slice(ks, ks + lk)
        if lq == 0 or lk == 0:
            if sink is not None:  # no key: the sink alone (O = 0, LSE = sink)
                lse[:, rq] = sink[:, None].to(lse.dtype)
            continue
        o, s = fa2_forward(q[None, rq], keys[None, rk], values[None, rk], softmax_scale, causal,
                           softcap=softcap, alibi_slopes=batch_slopes(alibi_slopes, b),
                           window_size=window_size, sink=sink,
                           dropout=_varlen_dropout(dropout_p, rng, b), out_dtype=out.dtype)
        out[rq], lse[:, rq] = o[0], s[0]
    return out, lse


def varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool,
    seqused_k: torch.Tensor | None = None, dlse: torch.Tensor | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA2's backward on each packed sequence; ``dq`` (Tq, H, D), ``dk``/``dv`` (Tk, H_kv, D),
    zero for rows in no sequence and keys past ``seqused_k``."""
    dq, dk, dv = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    seqs = varlen_sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], seqused_k)
    for b, (qs, lq, ks, lk) in enumerate(seqs):
        if lq == 0 or lk == 0:
            continue
        rq, rk = slice(qs, qs + lq), slice(ks, ks + lk)
        grads = fa2_backward(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], out[None, rq],
                             lse[None, :, rq], softmax_scale, causal,
                             dlse=dlse[None, :, rq] if dlse is not None else None, softcap=softcap,
                             alibi_slopes=batch_slopes(alibi_slopes, b), window_size=window_size,
                             dropout=_varlen_dropout(dropout_p, rng, b))
        dq[rq], dk[rk], dv[rk] = (g[0] for g in grads)
    return dq, dk, dv


# -- KV cache (decoding) ----------------------------------------------------------------------


def kvcache_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> None:
    """Write k_new/v_new (B, S_new, H_kv, D) into the caches at positions ``cache_seqlens[b] + i``,
    in place, as :func:`flash_module.kernels.kvcache.kvcache_append` does: positions outside the
    cache are not written, batch / page indices are clamped into the tensors.  Tensor ops
    only: no host sync."""
    b, s_new = k_new.shape[:2]
    if k_new.numel() == 0:
        return
    if block_table is not None:
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        capacity = k_cache.shape[1]
    if capacity == 0 or k_cache.shape[0] == 0:  # nowhere to write
        return
    # Positions outside [0, capacity) are not written.  Index assignment with repeated indices
    # has no defined winner on CUDA, so a skipped entry must not aim at a slot that another entry
    # writes with a different value: it takes the nearest written entry of its own sequence
    # (same slot, same value), or, when its sequence writes nothing, rewrites an old value.
    seq = cache_seqlens.to(torch.int64)[:, None]  # (B, 1)
    lo = (-seq).clamp(min=0)  # first new token that lands inside the cache
    hi = (capacity - seq).clamp(max=s_new)  # one past the last
    writes = lo < hi  # (B, 1)
    i = torch.arange(s_new, device=k_new.device)[None, :]  # (1, S_new)
    src = torch.maximum(torch.minimum(i, hi - 1), lo).clamp(0, s_new - 1)  # (B, S_new)
    pos = torch.where(writes, seq + src, (seq + i).clamp(0, capacity - 1))  # (B, S_new)
    if block_table is not None:
        rows = block_table.to(torch.int64).gather(1, pos // page_size).clamp(0, k_cache.shape[0] - 1)
        cols = pos % page_size
    else:
        idx = cache_batch_idx if cache_batch_idx is not None else torch.arange(b, device=k_new.device)
        rows = idx.to(torch.int64).clamp(0, k_cache.shape[0] - 1)[:, None].expand(b, s_new)
        cols = pos
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        picked = new.gather(1, src[..., None, None].expand_as(new)).to(cache.dtype)  # (B, S_new, H_kv, D)
        cache[rows, cols] = torch.where(writes[..., None, None], picked, cache[rows, cols])


def kvcache_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None, softmax_scale: float,
    causal: bool, cache_leftpad: torch.Tensor | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Sq, H, D) over the first ``cache_seqlens[b]`` keys of batch ``b``'s cache (from
    ``cache_leftpad[b]`` on when given: the keys before it are padding, and the keys left are
    the sequence the causal mask aligns to): row
    ``cache_batch_idx[b]`` of a contiguous (B_cache, S_cache, H_kv, D) cache, or the pages
    ``block_table[b]`` of a paged one (indices clamped as the kernels clamp them); FA2's blocked
    loop per batch, causal bottom-right.  Returns ``(out (B, Sq, H, D), lse (B, H, Sq))``.  Reads
    the lengths on the host (the PyTorch path)."""
    b, sq, h, d = q.shape
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((b, h, sq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    lengths = cache_seqlens.tolist()
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(b))
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * b
    for i in range(b):
        if block_table is not None:  # this sequence's pages, back to back
            pages = block_table[i].long().clamp(0, k_cache.shape[0] - 1)
            keys, values = (c[pages].flatten(0, 1)[None] for c in (k_cache, v_cache))
        else:
            row = min(max(rows[i], 0), k_cache.shape[0] - 1)
            keys, values = k_cache[row:row + 1], v_cache[row:row + 1]
        n = min(max(lengths[i], 0), keys.shape[1])
        first = min(max(starts[i], 0), n)
        if n == first or sq == 0:
            if sink is not None:  # no key: the sink alone (O = 0, LSE = sink)
                lse[i] = sink[:, None].to(lse.dtype)
            continue
        o, s = fa2_forward(q[i:i + 1], keys[:, first:n], values[:, first:n], softmax_scale, causal,
                           softcap=softcap, alibi_slopes=batch_slopes(alibi_slopes, i),
                           window_size=window_size, sink=sink)
        out[i], lse[i] = o[0], s[0]
    return out, lse
