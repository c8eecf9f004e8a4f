"""Helpers shared by the attention kernels: mma with dtype handling, stores, loop bounds.

Conventions used by every kernel in this package:

* scores are computed in the log2 domain: ``s2 = (q . k) * qk_scale`` with
  ``qk_scale = softmax_scale * log2(e)``, so the softmax uses ``exp2`` (one MUFU op) and the
  scale multiply is fused into the score tile;
* the saved LSE is in natural-log units (flash-attn's convention); kernels convert with LN2;
* causal masking: query row ``i`` sees key ``j`` iff ``j <= i + causal_offset``, where
  ``causal_offset = Sk - Sq`` (bottom-right, flash-attn) or ``0`` (top-left, torch SDPA).
"""

import struct

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e), for host code (qk_scale = softmax_scale * LOG2E)
# Globals read inside @triton.jit functions must be constexpr.  A float constexpr used in
# arithmetic becomes an fp32 constant, so fp64 kernels build them with tl.full(.., ACC_DTYPE).
LOG2E_C = tl.constexpr(LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


def split_scale(x: float) -> tuple[float, float]:
    """Split a float into fp32 halves hi + lo (Triton passes float arguments as fp32).

    fp32 kernels use ``hi`` alone; fp64 kernels use ``hi + lo``, exact to ~1e-15 relative.
    """
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def scaled(x, hi, lo, EXACT: tl.constexpr):
    """``x * (hi + lo)``; with ``EXACT`` (fp64) both halves, else ``hi`` alone."""
    if EXACT:
        return x * hi + x * lo
    else:
        return x * hi


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``.  ``a`` may be an fp32 tile (P or dS) and is cast to ``b``'s dtype.

    With ``UPCAST`` (fp16/bf16 under the Triton interpreter, whose low-precision ``tl.dot`` is
    wrong) both operands go to fp32 instead.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        # out_dtype must name the accumulator's dtype (fp64 for fp64 inputs; triton 3.6 checks).
        return tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def to_dtype(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast an fp32 tile to ``dtype``; with ``ROUND_BF16`` round to nearest-even by hand.

    (The interpreter truncates fp32 -> bf16; this restores the GPU's rounding.)
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def kv_range(start_m, Sk, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             IS_CAUSAL: tl.constexpr):
    """Key range of the query block [start_m, start_m + BLOCK_M): returns (n_full, hi).

    Keys in [0, n_full) are visible to every row of the block and lie inside Sk, so that loop
    needs no mask; keys in [n_full, hi) need the causal/boundary mask; keys >= hi are invisible.
    """
    even_end = (Sk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # Last key any row of the block may see is start_m + BLOCK_M - 1 + causal_offset.
        hi = tl.minimum(Sk, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        # A key block [n, n + BLOCK_N) is fully visible iff n + BLOCK_N - 1 <= start_m + offset.
        n_full = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, even_end)
    else:
        hi = Sk
        n_full = even_end
    return n_full, hi


@triton.jit
def q_range(start_n, Sq, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            IS_CAUSAL: tl.constexpr):
    """Query ranges that see the key block [start_n, start_n + BLOCK_N): (lo, m_full, even_end).

    Rows in [lo, m_full) straddle the diagonal (causal mask needed); rows in
    [m_full, even_end) see the whole key block and are full tiles (no mask); rows in
    [max(m_full, even_end), Sq) are the partial last tile (load masks needed).
    All three bounds are multiples of BLOCK_M.
    """
    even_end = (Sq // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # Row i sees key j iff i >= j - causal_offset.
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, ((Sq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        first_full = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        m_full = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        m_full = tl.maximum(m_full, lo)
    else:
        lo = 0
        m_full = 0
    return lo, m_full, even_end
