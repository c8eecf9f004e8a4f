"""The steps every attention kernel is built from, named once.

Kernel steps (``@triton.jit``), in the order a kernel uses them:

* addressing: :func:`program_bh` (batch and head of this program), :func:`tile_ptrs` (a
  (rows, BLOCK_D) pointer tile, int64 base), :func:`load_tile` / :func:`store_tile` (with only the
  bound masks the tile needs);
* :func:`visible` -- **which key a query may see** (key inside Sk, causal offset).  Variants that
  restrict visibility (sliding window, sequence ends of packed batches, page bounds) go here;
* :func:`score` -- **the score step**: ``s = q k^T * softmax_scale * log2(e)``.  Variants that
  transform scores (softcap, ALiBi) go here;
* :func:`softmax_update` -- **the online-softmax update** of the running max and sum;
* :func:`lse_epilogue` -- **the normalisation epilogue**: ``1 / l`` and the natural-log LSE, with
  rows that saw no key giving O = 0 and LSE = -inf;
* :func:`kv_range` / :func:`q_range` -- the tile ranges of the loops: which tiles need masks,
  which need none, which are skipped;
* :func:`mma`, :func:`scaled`, :func:`to_dtype` -- dtype handling (fp64 exactness, interpreter
  work-arounds).

Launch helpers (host): :func:`kernel_flags`, :func:`block_d`, :func:`bsh_strides`,
:func:`split_scale`, :func:`qk_scale`; and :func:`bwd_preprocess`, the row statistics every
backward starts from.

Conventions:

* scores live in the log2 domain (``exp2`` is one MUFU op, the scale multiply is fused into the
  score tile); the saved LSE is natural-log (flash-attn's convention);
* causal: query row ``i`` sees key ``j`` iff ``j <= i + causal_offset``, where
  ``causal_offset = Sk - Sq`` (bottom-right, flash-attn) or ``0`` (top-left, torch SDPA);
* the accumulator dtype is float64 for float64 inputs, float32 otherwise; kernels derive
  everything else (exact fp64 scaling, dot precision) from the operands' dtypes;
* outputs the launchers allocate (O, dQ, dK, dV) are contiguous, so kernels compute their
  strides instead of taking them; inputs come with (batch, seq, head) strides, last dim 1.
"""

import struct

import torch
import triton
import triton.language as tl

from .. import reference
from .._runtime import INTERPRET as _INTERPRET
from .._runtime import acc_dtype, cdiv, next_power_of_2

LOG2E = 1.4426950408889634  # log2(e), for host code (qk_scale = softmax_scale * LOG2E)
# Globals read inside @triton.jit functions must be constexpr.  A float constexpr used in
# arithmetic becomes an fp32 constant, so fp64 kernels build them with tl.full(.., dtype).
LOG2E_C = tl.constexpr(LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
INTERPRET = tl.constexpr(_INTERPRET)  # the process runs kernels under the Triton interpreter


# ---------------------------------------------------------------------------------------------
# Launch helpers (host)
# ---------------------------------------------------------------------------------------------


def split_scale(x: float) -> tuple[float, float]:
    """Split a float into fp32 halves hi + lo (Triton passes float arguments as fp32).

    fp32 kernels use ``hi`` alone; fp64 kernels use ``hi + lo``, exact to ~1e-15 relative.
    """
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot size)."""
    return max(16, next_power_of_2(head_dim))


def kernel_flags(q: torch.Tensor) -> dict:
    """Compile-time arguments every attention kernel takes: the accumulator dtype."""
    return dict(ACC_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32)


def bsh_strides(*ts: torch.Tensor) -> tuple[int, ...]:
    """(batch, seq, head) strides of each (B, S, H, D) tensor (last dim contiguous), flattened."""
    return tuple(s for t in ts for s in t.stride()[:3])


def qk_scale(softmax_scale: float, softcap: float = 0.0) -> tuple[float, float, float, float]:
    """``(qk_scale, qk_scale_lo, cap2, cap2_lo)``, the kernels' score scales.  Plain: the
    log2-domain scale ``softmax_scale * log2(e)`` split as :func:`split_scale`, and ``cap2 = 0``.
    With ``softcap`` c > 0 (:func:`cap`): ``softmax_scale / c`` split, and ``cap2 = c * log2(e)``
    split the same way (fp64 kernels need both halves to be exact)."""
    if softcap:
        return (*split_scale(softmax_scale / softcap), *split_scale(softcap * LOG2E))
    return (*split_scale(softmax_scale * LOG2E), 0.0, 0.0)


def sink_args(sink: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The fp32 (H,) sink logits, or a stand-in pointer (never read: ``SINK`` is off)."""
    return sink if sink is not None else like


#: The bound an unbounded window side gets: wider than any sequence, small enough that
#: ``row + offset +- bound`` stays inside int32.
WINDOW_UNBOUNDED = 1 << 30


def window_args(window_size: tuple[int, int], causal: bool) -> tuple[int, int, bool, bool]:
    """``(win_l, win_r, WINDOW, IS_CAUSAL)`` kernel arguments for flash-attn's ``window_size =
    (left, right)`` (-1 = unbounded) and ``causal``: query i sees keys [i + off - left, i + off +
    right].  Causal is a window with ``right = 0`` (flash-attn's rule: causal overrides right);
    without a left bound that is the plain causal kernel, and (-1, -1) is no window at all."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return 0, 0, False, False
    if left < 0 and right == 0:
        return 0, 0, False, True
    bound = (lambda w: w if w >= 0 else WINDOW_UNBOUNDED)
    return bound(left), bound(right), True, False


def dropout_args(dropout_p: float, rng: torch.Tensor | None, like: torch.Tensor,
                 offsets: tuple[int, int] = (0, 0)) -> tuple:
    """``(Rng, row_off, col_off, thresh, scale, scale_lo)`` kernel arguments: the int64 seed tensor
    (a stand-in pointer without dropout), ``offsets`` = where the call's rows and keys sit in the
    mask of a longer sequence (query row i and key j draw the bits of row ``i + row_off`` and
    key ``j + col_off``: ring attention's chunks; multiples of 16, see :func:`dropout_keep`),
    the threshold and ``1 / (1 - p)`` split like the score scale (0 for p = 1: all dropped)."""
    if not dropout_p:
        return like, 0, 0, 0, 1.0, 0.0
    return (rng, int(offsets[0]), int(offsets[1]), reference.dropout_thresh(dropout_p),
            *split_scale(reference.dropout_scale(dropout_p)))


def mask_args(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor) -> tuple:
    """``(Mask, stride_b, stride_h, stride_i, stride_j, MASK)`` for an attention mask broadcastable
    to ``shape`` = (B, H, Sq, Sk): its strides as broadcast (0 on broadcast dims, no copy) and
    the kind (1 bool, 2 additive float); a stand-in pointer and kind 0 without one."""
    if attn_mask is None:
        return like, 0, 0, 0, 0, 0
    m = attn_mask.expand(shape)
    return (m, *m.stride(), 1 if m.dtype == torch.bool else 2)


def alibi_args(alibi_slopes: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """``(Alibi, stride_b, stride_h)`` kernel arguments for fp32 slopes of shape (H,) or (B, H);
    without slopes a stand-in pointer (never read: ``ALIBI`` is off) and zero strides."""
    if alibi_slopes is None:
        return like, 0, 0
    if alibi_slopes.dim() == 1:
        return alibi_slopes, 0, alibi_slopes.stride(0)
    return alibi_slopes, alibi_slopes.stride(0), alibi_slopes.stride(1)


# ---------------------------------------------------------------------------------------------
# dtype handling
# ---------------------------------------------------------------------------------------------


@triton.jit
def scaled(x, hi, lo):
    """``x * (hi + lo)``: both halves for fp64 tiles (exact scale), ``hi`` alone otherwise."""
    if x.dtype == tl.float64:
        return x * hi + x * lo
    else:
        return x * hi


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b``.  ``a`` may be an fp32 tile (P or dS) and is cast to ``b``'s dtype.

    fp32/fp64 operands use IEEE products (no tf32).  Under the interpreter, fp16/bf16 operands go
    to fp32 first (the interpreter's low-precision ``tl.dot`` is wrong), and fp32 products are
    summed in fp64 and rounded once: numpy's fp32 matmul sums in an order that depends on the
    BLAS build and on the operands' layout, so the backward's K Q^T could differ from the
    forward's Q K^T in the last bit, which at logits ~1e3 is a 1e-3 error in P (seen with numpy
    2.4 on an AMD EPYC).  On a GPU both come from the same MMA order.
    """
    if INTERPRET and (b.dtype == tl.float16 or b.dtype == tl.bfloat16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif INTERPRET and b.dtype == tl.float32:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32) + acc
    elif b.dtype == tl.float16 or b.dtype == tl.bfloat16:
        return tl.dot(a.to(b.dtype), b, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        # out_dtype must name the accumulator's dtype (fp64 for fp64 inputs; triton 3.6 checks).
        return tl.dot(a.to(b.dtype), b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """Cast an fp32 tile to ``dtype``, rounding to nearest-even.

    (The interpreter truncates fp32 -> bf16; there the rounding is done by hand.)
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Addressing
# ---------------------------------------------------------------------------------------------


@triton.jit
def program_bh(H):
    """(batch, head) of this program from grid axis 1 (= B * H programs), as int64."""
    pid_bh = tl.program_id(1)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def tile_ptrs(base, start, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to rows [start, start + BLOCK_R) x [0, BLOCK_D) of a (S, D) matrix at ``base``.

    The int64 part (start * stride) goes into the base; the block-relative offsets stay int32.
    """
    return (base + tl.cast(start, tl.int64) * stride + tl.arange(0, BLOCK_R)[:, None] * stride
            + tl.arange(0, BLOCK_D)[None, :])


@triton.jit
def _d_ok(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    return tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM


@triton.jit
def load_tile(ptrs, rows, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (R, BLOCK_D) tile, zero-filled where out of bounds.

    Masks only what can be out of bounds: rows >= ``n_rows`` when ``CHECK_ROWS``, and the
    padded head dim when ``HEAD_DIM < BLOCK_D``.  A full tile of a power-of-two head dim loads
    without any mask (the hot loops).
    """
    BLOCK_D: tl.constexpr = ptrs.shape[1]
    if CHECK_ROWS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & _d_ok(BLOCK_D, HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=_d_ok(BLOCK_D, HEAD_DIM), other=0.0)


@triton.jit
def store_tile(ptrs, x, rows, n_rows, HEAD_DIM: tl.constexpr):
    """Store an accumulator tile into a (R, BLOCK_D) tile of ``ptrs``' dtype, rows < n_rows."""
    BLOCK_D: tl.constexpr = ptrs.shape[1]
    tl.store(ptrs, to_dtype(x, ptrs.dtype.element_ty), mask=(rows[:, None] < n_rows) & _d_ok(BLOCK_D, HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# The attention steps
# ---------------------------------------------------------------------------------------------


@triton.jit
def in_window(rows, cols, causal_offset, win_l, win_r):
    """The sliding window (flash-attn's ``window_size``): key ``col`` lies in
    ``[row + causal_offset - win_l, row + causal_offset + win_r]``.  An unbounded side comes as
    a bound too large to bind (:func:`window_args`)."""
    diag = rows + causal_offset
    return (cols >= diag - win_l) & (cols <= diag + win_r)


@triton.jit
def visible(rows, cols, Sk, causal_offset, IS_CAUSAL: tl.constexpr, win_l=0, win_r=0, WINDOW: tl.constexpr = False):
    """True where query ``rows`` may see key ``cols``: the key lies inside Sk and, with causal,
    ``col <= row + causal_offset``; with ``WINDOW`` also inside the window (:func:`in_window`;
    a causal window comes as ``win_r = 0`` with ``IS_CAUSAL`` off).

    ``rows`` and ``cols`` come shaped to broadcast against each other: (M, 1) and (1, N) for a
    score tile, (1, M) and (N, 1) for the transposed tile of the dK/dV pass.  ``Sk=None`` drops
    the key bound, for a caller that never stores results of keys past the end.
    """
    if Sk is None:
        tl.static_assert(IS_CAUSAL or WINDOW, "visible(): Sk=None leaves only the causal or window bound")
        if WINDOW:
            ok = in_window(rows, cols, causal_offset, win_l, win_r)
        else:
            ok = cols <= rows + causal_offset
    else:
        ok = cols < Sk
        if IS_CAUSAL:
            ok = ok & (cols <= rows + causal_offset)
        if WINDOW:
            ok = ok & in_window(rows, cols, causal_offset, win_l, win_r)
    return ok


@triton.jit
def score(a, b_t, qk_scale, qk_scale_lo):
    """The score tile ``a @ b_t * softmax_scale * log2(e)`` in the accumulator dtype.

    ``q @ k^T`` gives S (rows = queries); ``k @ q^T`` gives S^T (the dK/dV pass).
    """
    acc_t: tl.constexpr = tl.float64 if a.dtype == tl.float64 else tl.float32
    s = mma(a, b_t, tl.zeros([a.shape[0], b_t.shape[1]], acc_t))
    if a.dtype == tl.float32 and not INTERPRET:
        # fp32 inputs: the scaled score must be rounded the same way in every pass.  Left to
        # the compiler, ``s * scale`` fuses into an FMA with whatever subtracts from it next in
        # some tiles (unmasked ones) and not in others, so the backward's P drifted from the
        # forward's by up to half an ulp of the logit.  ``mul.rn`` is never fused.
        scale = qk_scale + tl.zeros(s.shape, tl.float32)
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [s, scale],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return scaled(s, qk_scale, qk_scale_lo)


@triton.jit
def tanh(x):
    """tanh in x's dtype, from exp2 (the interpreter and every Triton version have it):
    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, sign restored.  Absolute error ~1 ulp of 1."""
    # exp(-2|x|) = 2^(-2 log2(e) |x|); tl.full keeps the constant's fp64 digits (a bare float
    # literal is an fp32 constant, 3e-8 off for fp64 tiles)
    e = tl.math.exp2(tl.abs(x) * tl.full([], -2.8853900817779268, x.dtype))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def tanh_approx(x):
    """The GPU's one-instruction ``tanh.approx.f32`` (sm_75+; relative error ~2^-11, finer
    than the rounding of fp16/bf16 scores, so flash-attn uses it too)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def cap(x, cap2, cap2_lo, SOFTCAP: tl.constexpr, IN_DTYPE: tl.constexpr):
    """Softcapping (Gemma 2, flash-attn's ``softcap`` c): with ``SOFTCAP`` the score step gave
    ``x = s / c`` (``qk_scale`` was split from softmax_scale / c), and the capped score in the
    log2 domain is ``c tanh(x) log2(e) = tanh(x) * (cap2 + cap2_lo)``.  Returns ``(score, t)``, ``t =
    tanh(x)`` for the backward's ``dS * (1 - t^2)``; without ``SOFTCAP`` ``(x, x)`` (the second
    is never used, and compiles away).  fp16/bf16 inputs (``IN_DTYPE``) on the GPU use the
    hardware :func:`tanh_approx` (one MUFU op instead of an exp2 and a division: the softcap
    overhead at D=128, N=8k causal bf16 fell from 37% to 14% forward / 17% backward on an H100);
    fp32/fp64 and the interpreter the exact :func:`tanh`."""
    if SOFTCAP:
        if (IN_DTYPE == tl.float16 or IN_DTYPE == tl.bfloat16) and not INTERPRET:
            t = tanh_approx(x)
        else:
            t = tanh(x)
        return scaled(t, cap2, cap2_lo), t
    else:
        return x, x


@triton.jit
def head_slope(Alibi_b, heads, stride_ah, ACC_DTYPE: tl.constexpr, ALIBI: tl.constexpr):
    """ALiBi slope of query head(s) ``heads`` in the log2 domain (``slope * log2(e)``), read from
    ``Alibi_b`` (this batch's row of the (B, H) or (H,) fp32 slopes); 0 without ``ALIBI``."""
    if ALIBI:
        return tl.load(Alibi_b + heads * stride_ah).to(ACC_DTYPE) * tl.full([], LOG2E_C, ACC_DTYPE)
    else:
        return 0.0


@triton.jit
def alibi(s, slope2, rows, cols, causal_offset, ALIBI: tl.constexpr):
    """ALiBi (flash-attn's ``alibi_slopes``): the score of query ``i`` and key ``j`` gets the bias
    ``-slope * |i + causal_offset - j|`` (causal_offset = Sk - Sq: distances from the
    bottom-right diagonal).  ``rows``/``cols`` broadcast as for :func:`visible`; ``slope2`` is
    :func:`head_slope`'s value, shaped to broadcast the same way.  The bias is a constant of
    the inputs, so the backward needs it only where it recomputes the scores."""
    if ALIBI:
        return s - slope2 * tl.abs(rows + causal_offset - cols).to(s.dtype)
    else:
        return s


@triton.jit
def attn_mask(s, Mask_bh, stride_mi, stride_mj, rows, cols, n_rows, n_cols, MASK: tl.constexpr):
    """SDPA's ``attn_mask`` on a log2-domain score tile: ``MASK`` 1, a boolean mask (False hides
    the key, as in torch); 2, an additive float mask (added to the scaled scores, so times
    log2 e here; -inf hides the key); 0, none.  ``Mask_bh`` points at this (batch, head)'s
    (Sq, Sk) slice of the mask broadcast to (B, H, Sq, Sk) (stride 0 on broadcast dims: the
    mask is read in place, never expanded); ``rows``/``cols`` broadcast as for :func:`visible`,
    and entries outside ``n_rows`` x ``n_cols`` are not read."""
    if MASK == 0:
        return s
    ok = (rows < n_rows) & (cols < n_cols)
    ptrs = Mask_bh + rows.to(tl.int64) * stride_mi + cols.to(tl.int64) * stride_mj
    if MASK == 1:
        return tl.where(tl.load(ptrs, mask=ok, other=0) != 0, s, float("-inf"))
    else:
        return s + tl.load(ptrs, mask=ok, other=0.0).to(s.dtype) * tl.full([], LOG2E_C, s.dtype)


@triton.jit
def mask_grad_add(ds, DMask_bh, stride_dmi, stride_dmj, rows, cols, n_rows, n_cols, MASK_GRAD: tl.constexpr):
    """Add a (BLOCK_M, BLOCK_N) tile of dS (the gradient w.r.t. the scaled scores, which is the
    additive mask's own gradient) to the mask's gradient at ``DMask_bh``: the fp32/fp64 buffer of
    the mask's shape, this (batch, head)'s slice (stride 0 over the batch / head dims the mask
    broadcasts).  ``MASK_GRAD`` 1: one entry per (row, key); 2: the mask broadcasts over rows,
    so the tile's rows are summed first; 3: over keys (the keys are summed); 4: both; 0: off.
    Atomic adds: several programs meet in one entry exactly where the mask broadcasts."""
    if MASK_GRAD != 0:
        ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        g = tl.where(ok, ds, 0.0)
        if MASK_GRAD == 1:
            ptrs = DMask_bh + rows.to(tl.int64)[:, None] * stride_dmi + cols.to(tl.int64)[None, :] * stride_dmj
            tl.atomic_add(ptrs, g, mask=ok)
        elif MASK_GRAD == 2:
            tl.atomic_add(DMask_bh + cols.to(tl.int64) * stride_dmj, tl.sum(g, 0), mask=cols < n_cols)
        elif MASK_GRAD == 3:
            tl.atomic_add(DMask_bh + rows.to(tl.int64) * stride_dmi, tl.sum(g, 1), mask=rows < n_rows)
        else:
            tl.atomic_add(DMask_bh, tl.sum(tl.sum(g, 1), 0))


# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
# 7 rounds, as flash-attn's dropout uses (Philox-4x32-7 passes BigCrush; each round costs ~7%
# of a bf16 forward with dropout on an H100).
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox-4x32-7: four uint32 counter words -> four random uint32 words, keyed by the
    int64 ``seed`` (its low and high halves).  The same function as
    :func:`flash_module.reference.philox` (the PyTorch path regenerates the same bits)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        a0 = c0
        a2 = c2
        c0 = tl.math.umulhi(a2, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.math.umulhi(a0, PHILOX_M0) ^ c3 ^ k1
        c1 = a2 * PHILOX_M1
        c3 = a0 * PHILOX_M0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _keep_bits(word, lane: tl.constexpr, thresh32):
    """Lanes ``lane`` (the word's low half) and ``lane + 1`` (its high half) as keep bits at those
    positions: a half is kept iff it is >= thresh, compared as ``half << 16 >= thresh << 16`` (the
    bits below the half only break ties that cannot change the answer)."""
    lo = ((word << 16) >= thresh32).to(tl.int32)
    hi = (word >= thresh32).to(tl.int32)
    return (lo << lane) | (hi << (lane + 1))


@triton.jit
def dropout_keep(seed, row0, M: tl.constexpr, start_n, thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False):
    """Dropout's keep mask of an (M, BLOCK_N) score tile (``TRANS``: of its transpose,
    (BLOCK_N, M)): True where the probability of query row ``row0 + r`` and key ``start_n + j``
    is kept.  Row counters (int64) are ``stream << 32 | i``: ``stream = b * H + h`` names the
    (batch or varlen sequence, query head) and ``i`` is the row within that sequence
    (:func:`drop_row_base`); ``row0`` (the tile's first row) and ``start_n`` are multiples of 16.  Every pass
    (forward, dK/dV, dQ) regenerates the same mask; :func:`flash_module.reference.dropout_keep`
    is the same function in PyTorch.

    One Philox-4x32-7 call gives four 32-bit words, eight 16-bit uniforms; a probability is kept
    iff its uniform is ``>= thresh`` (``round(p * 65536)``: the keep rate is exact to 2^-17).  The
    call with counter ``(key quad, row pair, stream, 0)`` serves the eight (row, key) pairs
    ``{i, i + 8} x {j, j + 1, j + 8, j + 9}`` (i % 16 < 8, j % 16 < 8, j even): row pair
    ``(i // 16) * 8 + i % 8``, key quad ``(j // 16) * 4 + (j % 8) // 2``; row ``i + 8s`` and key
    ``j + 8k + h`` read half ``h`` of word ``2s + k``.

    Why this shape: it is the set of accumulator entries one thread holds in the tensor cores'
    layout (rows r and r + 8, column pairs 8 apart), so each thread runs the calls for its own
    entries, and the broadcasts and reshapes below put the bits in place without moving data
    between threads.  Joining eight lanes per key group instead cost 48% of the forward at N=8k
    (conversions between layouts); this form, 32% (``docs/performance.md``).
    """
    A: tl.constexpr = M // 16
    B: tl.constexpr = BLOCK_N // 16
    row0 = tl.zeros([], tl.int64) + row0
    stream = (row0 >> 32).to(tl.uint32)
    pair = ((row0 & 0xFFFFFFFF) // 2 + tl.arange(0, A)[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.uint32)  # (A, 8)
    quad = ((start_n // 16 + tl.arange(0, B))[:, None] * 4 + tl.arange(0, 4)[None, :]).to(tl.uint32)  # (B, 4)
    zero = tl.zeros([A, 8, B, 4], tl.uint32)
    c0 = quad[None, None, :, :] + zero
    c1 = pair[:, :, None, None] + zero
    c2 = stream + zero
    w0, w1, w2, w3 = philox(seed, c0, c1, c2, zero)
    thresh = (tl.zeros([], tl.int32) + thresh).to(tl.uint32) << 16  # (an int arg of 1 arrives as a constexpr)
    # (A, 8, B, 4): bit 4s + 2k + h of a call = row i + 8s, key j + 8k + h
    bits = _keep_bits(w0, 0, thresh) | _keep_bits(w1, 2, thresh) | _keep_bits(w2, 4, thresh) | _keep_bits(w3, 6, thresh)
    s = tl.arange(0, 2)
    k = tl.arange(0, 2)
    h = tl.arange(0, 2)
    if TRANS:  # axes (key block, k, quad, h, row block, s, row) -> (BLOCK_N, M)
        b7 = tl.reshape(tl.permute(bits, (2, 3, 0, 1)), [B, 1, 4, 1, A, 1, 8])
        shift = (s[None, None, None, None, None, :, None] * 4 + k[None, :, None, None, None, None, None] * 2
                 + h[None, None, None, :, None, None, None])
        keep = tl.reshape((b7 >> shift) & 1, [BLOCK_N, M])
    else:  # axes (row block, s, row, key block, k, quad, h) -> (M, BLOCK_N)
        b7 = tl.reshape(bits, [A, 1, 8, B, 1, 4, 1])
        shift = (s[None, :, None, None, None, None, None] * 4 + k[None, None, None, None, :, None, None] * 2
                 + h[None, None, None, None, None, None, :])
        keep = tl.reshape((b7 >> shift) & 1, [M, BLOCK_N])
    return keep != 0


@triton.jit
def drop_row_base(stream):
    """Dropout's row counter of row 0 of ``stream = b * H + h`` (batch or varlen sequence b,
    query head h): ``stream << 32`` (:func:`dropout_keep`)."""
    return (tl.zeros([], tl.int64) + stream) << 32


@triton.jit
def drop_seed_of(Rng, DROPOUT: tl.constexpr):
    """The dropout seed (int64) the launcher drew from torch's generator, read on the device;
    0 without ``DROPOUT`` (not read)."""
    if DROPOUT:
        return tl.load(Rng).to(tl.int64)
    else:
        return tl.zeros([], tl.int64)


@triton.jit
def softmax_update(m_i, l_i, s, MASKED: tl.constexpr):
    """One online-softmax step over a score tile ``s`` (log2 domain, masked entries -inf).

    Returns ``(p, alpha, l_new, m_new)``: ``p = exp2(s - m_new)``, ``alpha = exp2(m_i - m_new)``
    (the rescale of everything accumulated so far) and the new running sum and max.  A row that
    has seen only masked keys keeps ``m = -inf`` and subtracts 0 instead (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_new, m_new


@triton.jit
def lse_epilogue(l_i, m_i, PRECISE: tl.constexpr = False):
    """``(l_safe, lse)``: the divisor of the output (1 where a row saw no key) and the
    natural-log LSE ``(m + log2 l) ln 2`` (-inf where a row saw no key).

    ``PRECISE`` (fp32 inputs) returns an fp64 LSE, formed in fp64 from the fp32 ``m`` and
    ``log2 l``, both exact enough: the fp32 sum of ``m`` (~1.44x the largest logit) and
    ``log2 l`` would be off by half an ulp of ``m`` (3e-5 at logits ~1e3), a relative error on
    every P the backward recomputes from it (see ``_runtime.lse_dtype``).  fp16/bf16 keep the
    fp32 formula (their P is rounded to 8-11 bits anyway).
    """
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    if PRECISE:
        lse = (m_i.to(tl.float64) + tl.math.log2(l_safe).to(tl.float64)) * tl.full([], LN2, tl.float64)
    else:
        lse = (m_i + tl.math.log2(l_safe)) * tl.full([], LN2, l_i.dtype)
    return l_safe, tl.where(seen, lse, float("-inf"))


@triton.jit
def add_sink(acc, l_i, m_i, Sink, heads, SINK: tl.constexpr):
    """Attention sinks (gpt-oss, FA4's ``learnable_sink``): the head's logit ``Sink[heads]`` (fp32,
    natural-log domain, like the scaled scores) joins the softmax denominator of every row and
    attends to no value: one more online-softmax step with ``p = exp(sink - m)`` and nothing
    added to ``acc``.  A row that saw no key gets ``l = 1, m = sink``: O = 0, LSE = sink.
    ``heads``: a scalar, or the (BLOCK_M,) heads of GQA-packed rows."""
    if SINK:
        sink2 = tl.load(Sink + heads).to(m_i.dtype) * tl.full([], LOG2E_C, m_i.dtype) + tl.zeros_like(m_i)
        m_new = tl.maximum(m_i, sink2)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a sink of -inf and no key: stays empty
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_sub)
        acc = acc * alpha[:, None]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attend_block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, rows, start_n, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """FA2's inner-loop body: fold the key block at ``start_n`` (its K/V tiles at ``k_ptrs`` /
    ``v_ptrs``, (BLOCK_N, BLOCK_D)) into the running (acc, l, m) of the query rows ``rows``.
    With ``DROPOUT`` the dropped probabilities leave ``acc`` but stay in ``l`` (the softmax is
    normalised before dropout; :func:`dropout_keep`)."""
    BLOCK_N: tl.constexpr = k_ptrs.shape[0]
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(k_ptrs, cols, Sk, HEAD_DIM, MASKED)  # (BLOCK_N, BLOCK_D)
    s = score(q, tl.trans(k), qk_scale, qk_scale_lo)  # (BLOCK_M, BLOCK_N), log2 domain
    s, _ = cap(s, cap2, cap2_lo, SOFTCAP, q.dtype)
    s = alibi(s, slope2[:, None], rows[:, None], cols[None, :], causal_offset, ALIBI)  # slope2: (BLOCK_M,)
    s = attn_mask(s, Mask_bh, stride_mi, stride_mj, rows[:, None], cols[None, :], mask_rows, mask_cols, MASK)
    if MASKED:
        s = tl.where(visible(rows[:, None], cols[None, :], Sk, causal_offset, IS_CAUSAL, win_l, win_r, WINDOW), s,
                     float("-inf"))
    # (a mask may hide whole rows in any block: then every block needs the -inf-safe update)
    p, alpha, l_i, m_i = softmax_update(m_i, l_i, s, MASKED or MASK != 0)
    if DROPOUT:
        # (rows are one tile, consecutive: the reduction is loop-invariant, hoisted by the compiler)
        keep = dropout_keep(drop_seed, drop_row0 + tl.min(rows, 0), rows.shape[0], drop_col0 + start_n, drop_thresh,
                            BLOCK_N)
        p = tl.where(keep, p, 0.0)
    acc = acc * alpha[:, None]
    v = load_tile(v_ptrs, cols, Sk, HEAD_DIM, MASKED)
    acc = mma(p, v, acc)  # (BLOCK_M, BLOCK_D)
    return acc, l_i, m_i


@triton.jit
def attend_kv(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
    rows, n_start, n_end, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """FA2's inner loop: fold key blocks [n_start, n_end) into the running (acc, l, m) of the
    query rows ``rows``.  ``k_ptrs``/``v_ptrs`` point at the (BLOCK_N, BLOCK_D) tile of key
    ``n_start``; ``MASKED`` loops apply the visibility mask, unmasked ones need none."""
    BLOCK_N: tl.constexpr = k_ptrs.shape[0]
    for start_n in range(n_start, n_end, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, rows, start_n, Sk, causal_offset, win_l, win_r,
                                     qk_scale, qk_scale_lo, cap2, cap2_lo, slope2, drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols,
                                     HEAD_DIM, MASKED, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def page_entries(Pages, start_n, n_table, num_pages, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block-table entries of key block ``start_n`` (a multiple of BLOCK_N), clamped into the
    cache: one page (a scalar) when pages hold whole blocks (PAGE a multiple of BLOCK_N), else one
    per key, (BLOCK_N,).  Keys past the table (the last block of a full cache, masked by Sk) read
    its last entry (``n_table``, the table's keys, is a multiple of PAGE).

    Pages that divide the block (16 or 32 keys in a 64-key block) read one scalar entry per page,
    the same for every thread, and give each row its page by selects; with the rows' places in
    their pages fixed (:func:`page_tile_ptrs`) the split-KV key loop is 421 SASS instructions
    against 644 per row and 358 contiguous, and 16-key pages decode at 0.89x a contiguous cache
    on an H200 (0.80x per row).  (A (BLOCK_N // PAGE,) vector broadcast to the rows through a
    reshape ran at 0.33x: ``docs/performance.md``.)"""
    if PAGE % BLOCK_N == 0:
        pages = tl.load(Pages + tl.minimum(start_n, n_table - 1) // PAGE)
    elif BLOCK_N % PAGE == 0:
        page_of_row = tl.arange(0, BLOCK_N) // PAGE
        pages = tl.zeros([BLOCK_N], tl.int32)
        for i in tl.static_range(BLOCK_N // PAGE):
            entry = tl.load(Pages + tl.minimum(start_n + i * PAGE, n_table - 1) // PAGE)
            pages = tl.where(page_of_row == i, entry, pages)
    else:
        pages = tl.load(Pages + tl.minimum(start_n + tl.arange(0, BLOCK_N), n_table - 1) // PAGE)
    return tl.minimum(tl.maximum(pages, 0), num_pages - 1).to(tl.int64)


@triton.jit
def page_tile_ptrs(Cache_head, pages, start_n, stride_page, stride_s, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Pointers to the (BLOCK_N, BLOCK_D) tile of key block ``start_n`` of a paged cache whose
    table entries for it are ``pages`` (:func:`page_entries`): key ``n`` is row ``n % PAGE`` of
    page ``Pages[n // PAGE]``.  Pages holding whole blocks: a plain strided tile.  Otherwise each
    row finds its own page, so a tile spans pages (any page size).  Either way the key blocks
    are those of a contiguous cache."""
    if PAGE % BLOCK_N == 0:
        first = pages * stride_page + tl.cast(start_n % PAGE, tl.int64) * stride_s
        ptrs = tile_ptrs(Cache_head + first, 0, stride_s, BLOCK_N, BLOCK_D)
    else:
        if BLOCK_N % PAGE == 0:  # start_n is a multiple of the page: each row's place in its page is fixed
            in_page = tl.arange(0, BLOCK_N) % PAGE
        else:
            in_page = (start_n + tl.arange(0, BLOCK_N)) % PAGE
        rows = pages * stride_page + in_page.to(tl.int64) * stride_s
        ptrs = Cache_head + rows[:, None] + tl.arange(0, BLOCK_D)[None, :]
    return ptrs


@triton.jit
def attend_keys(
    acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, Pages, stride_kpage, stride_vpage, num_pages, n_table,
    rows, n_start, n_end, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr = False, MASK: tl.constexpr = 0,
):
    """Key blocks [n_start, n_end) of a head whose keys start at ``K_head``/``V_head``: contiguous
    (:func:`attend_kv`), or with ``PAGED`` a paged cache (``K_head``/``V_head``: the head's row 0
    of page 0; ``Pages``: this sequence's block-table row, covering ``n_table`` keys; the page
    arguments are not read otherwise).  Paged or not, the blocks and their order are the same,
    so a paged cache gives the contiguous result bit for bit."""
    BLOCK_D: tl.constexpr = q.shape[1]
    if PAGED:
        # The table entries are read one block ahead (a loop-carried value): when a block's K/V
        # addresses depend on a table read in the same iteration, the compiler pipelines the K/V
        # loads only one block deep instead of num_stages - 1.
        pages = page_entries(Pages, n_start, n_table, num_pages, PAGE, BLOCK_N)
        for start_n in range(n_start, n_end, BLOCK_N):
            cur = pages
            pages = page_entries(Pages, start_n + BLOCK_N, n_table, num_pages, PAGE, BLOCK_N)
            k_ptrs = page_tile_ptrs(K_head, cur, start_n, stride_kpage, stride_ks, PAGE, BLOCK_N, BLOCK_D)
            v_ptrs = page_tile_ptrs(V_head, cur, start_n, stride_vpage, stride_vs, PAGE, BLOCK_N, BLOCK_D)
            acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, rows, start_n, Sk,
                                         causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
                                         drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, HEAD_DIM, MASKED, IS_CAUSAL,
                                         SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
    else:
        acc, l_i, m_i = attend_kv(
            acc, l_i, m_i, q, tile_ptrs(K_head, n_start, stride_ks, BLOCK_N, BLOCK_D),
            tile_ptrs(V_head, n_start, stride_vs, BLOCK_N, BLOCK_D), stride_ks, stride_vs,
            rows, n_start, n_end, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
            drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, HEAD_DIM, MASKED, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
    return acc, l_i, m_i


@triton.jit
def attend_rows(
    q, K_head, V_head, stride_ks, stride_vs, rows, start_m, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    Pages, stride_kpage, stride_vpage, num_pages, n_table, drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """FA2's forward for one query block: ``(acc, l, m)`` over every key it sees, in
    :func:`kv_range`'s order: the window's left edge masked, the full key blocks without masks,
    then the diagonal / ragged ones masked.
    ``K_head``/``V_head`` point at the head's key 0 or, with ``PAGED``, at its row 0 of page 0
    of a paged cache whose pages for these keys are ``Pages`` (:func:`attend_keys`)."""
    BLOCK_M: tl.constexpr = q.shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)  # unnormalised O
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)  # running sum of exp2(s - m)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # running max (log2 domain)
    n0, n1, n2, n3 = kv_range(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW)
    for part in tl.static_range(3):  # keys [n0, n1) masked (window only), [n1, n2) unmasked, [n2, n3) masked
        if WINDOW or part > 0:
            a, b = range_part(part, n0, n1, n2, n3)
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, Pages, stride_kpage, stride_vpage, num_pages,
                n_table, rows, a, b, Sk, causal_offset, win_l, win_r, qk_scale,
                qk_scale_lo, cap2, cap2_lo, slope2, drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, HEAD_DIM, BLOCK_N, part != 1,
                IS_CAUSAL, PAGED, PAGE, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
    return acc, l_i, m_i


@triton.jit
def range_part(part: tl.constexpr, r0, r1, r2, r3):
    """Part ``part`` (0, 1 or 2) of :func:`kv_range` / :func:`q_range`'s three ranges:
    ``[r0, r1)``, ``[r1, r2)`` or ``[r2, r3)``."""
    if part == 0:
        return r0, r1
    elif part == 1:
        return r1, r2
    else:
        return r2, r3


@triton.jit
def kv_range(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key ranges of the query block [start_m, start_m + BLOCK_M): ``(n0, n1, n2, n3)``.

    Keys in [n1, n2) are visible to every row of the block and lie inside Sk, so that loop
    needs no mask; [n0, n1) (the window's left edge) and [n2, n3) (the diagonal, the window's
    right edge, the ragged end) need the visibility mask; keys outside [n0, n3) are invisible to
    every row and are skipped.  n0, n1 and n2 are multiples of BLOCK_N (or equal to n3).
    Without ``WINDOW``, n0 = n1 = 0.
    """
    even_end = (Sk // BLOCK_N) * BLOCK_N
    if WINDOW:
        # Row r sees keys [r + off - win_l, r + off + win_r]: the block's first row sets the
        # lowest and the fully visible right end, its last row the highest and the fully
        # visible left end.
        first_row = start_m + causal_offset
        last_row = start_m + BLOCK_M - 1 + causal_offset
        n0 = (tl.maximum(first_row - win_l, 0) // BLOCK_N) * BLOCK_N
        n3 = tl.maximum(tl.minimum(Sk, last_row + win_r + 1), n0)
        n1 = tl.minimum(((tl.maximum(last_row - win_l, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, n3)
        n2 = tl.minimum((tl.maximum(first_row + win_r + 1, 0) // BLOCK_N) * BLOCK_N, even_end)
        n2 = tl.maximum(n2, n1)  # a window narrower than a block: no unmasked part
    elif IS_CAUSAL:
        n0 = 0
        n1 = 0
        # Last key any row of the block may see is start_m + BLOCK_M - 1 + causal_offset.
        n3 = tl.minimum(Sk, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        # A key block [n, n + BLOCK_N) is fully visible iff n + BLOCK_N - 1 <= start_m + offset.
        n2 = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        n2 = tl.minimum(n2, even_end)
    else:
        n0 = 0
        n1 = 0
        n3 = Sk
        n2 = even_end
    return n0, n1, n2, n3


@triton.jit
def q_range(start_n, Sq, causal_offset, win_l, win_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query ranges that see the key block [start_n, start_n + BLOCK_N): ``(m0, m1, m2, m3)``.

    Rows in [m1, m2) see the whole key block and are full tiles (no mask); rows in [m0, m1)
    (the diagonal, the window's right edge) and [m2, m3) (the window's left edge, the partial
    last tile) need masks; other rows see none of the block.  m0, m1 and m2 are multiples of
    BLOCK_M (or equal to m3).
    """
    even_end = (Sq // BLOCK_M) * BLOCK_M
    if WINDOW:
        # Row i sees key j iff j - off - win_r <= i <= j - off + win_l.
        first_key = start_n - causal_offset
        last_key = start_n + BLOCK_N - 1 - causal_offset
        m0 = (tl.maximum(first_key - win_r, 0) // BLOCK_M) * BLOCK_M
        m3 = tl.maximum(tl.minimum(Sq, last_key + win_l + 1), m0)
        m1 = tl.minimum(((tl.maximum(last_key - win_r, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m3)
        m2 = tl.minimum((tl.maximum(first_key + win_l + 1, 0) // BLOCK_M) * BLOCK_M, even_end)
        m2 = tl.maximum(m2, m1)
    elif IS_CAUSAL:
        # Row i sees key j iff i >= j - causal_offset.
        m0 = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m0 = tl.minimum(m0, ((Sq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        first_full = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        m_full = tl.maximum(((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m0)
        m1 = tl.minimum(m_full, ((Sq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        m2 = tl.maximum(m1, even_end)
        m3 = Sq
    else:
        m0 = 0
        m1 = 0
        m2 = even_end
        m3 = Sq
    return m0, m1, m2, m3


# ---------------------------------------------------------------------------------------------
# Backward preprocess (shared by every backward)
# ---------------------------------------------------------------------------------------------


@triton.jit
def preprocess_rows(o_ptrs, do_ptrs, Lse_rows, DLse_rows, rows, n_rows, HEAD_DIM: tl.constexpr,
                    HAS_DLSE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The three statistics of the rows ``rows`` (``< n_rows`` are real): ``(lse2, delta,
    lse2_lo)`` from their O and dO tiles and their LSE (``Lse_rows + rows``), see
    :func:`bwd_preprocess`."""
    row_ok = rows < n_rows
    o = load_tile(o_ptrs, rows, n_rows, HEAD_DIM, True).to(ACC_DTYPE)
    do = load_tile(do_ptrs, rows, n_rows, HEAD_DIM, True).to(ACC_DTYPE)
    delta = tl.sum(o * do, 1)  # (BLOCK_M,)
    if HAS_DLSE:
        # d lse_i / d s_ij = P_ij, so a gradient into LSE adds dlse_i * P_ij to dS_ij.
        delta -= tl.load(DLse_rows + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    lse = tl.load(Lse_rows + rows, mask=row_ok, other=0.0)  # fp64 for fp32/fp64 inputs
    seen = lse != float("-inf")
    lse2 = tl.where(seen, lse, 0.0) * tl.full([], LOG2E_C, lse.dtype)
    hi = lse2.to(ACC_DTYPE)
    lo = (lse2 - hi).to(ACC_DTYPE)  # nonzero for fp32 inputs only
    hi = tl.where(seen, hi, float("inf"))
    return hi, delta, lo


@triton.jit
def store_row_stats(Stats_head, stats_len, rows, n_rows, lse2, delta, lse2_lo):
    """Write one head's rows of the (3, stats_len) statistics (see :func:`row_stats`)."""
    row_ok = rows < n_rows
    tl.store(Stats_head + rows, lse2, mask=row_ok)
    tl.store(Stats_head + stats_len + rows, delta, mask=row_ok)
    tl.store(Stats_head + 2 * stats_len + rows, lse2_lo, mask=row_ok)


@triton.jit
def dense_preprocess(
    Out, DOut, Lse, DLse, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """:func:`preprocess_rows` of this program's query block (grid axis 0) of one (batch, head)
    (axis 1) of dense (B, Sq, H, D) O / dO and (B, H, Sq) LSEs: ``(off_b, off_h, rows, lse2,
    delta, lse2_lo)``."""
    off_b, off_h = program_bh(H)
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    o_ptrs = tile_ptrs(Out + off_b * stride_ob + off_h * stride_oh, start_m, stride_os, BLOCK_M, BLOCK_D)
    do_ptrs = tile_ptrs(DOut + off_b * stride_dob + off_h * stride_doh, start_m, stride_dos, BLOCK_M, BLOCK_D)
    lse_row = (off_b * H + off_h) * Sq
    hi, delta, lo = preprocess_rows(o_ptrs, do_ptrs, Lse + lse_row, DLse + lse_row, rows, Sq, HEAD_DIM, HAS_DLSE,
                                    ACC_DTYPE)
    return off_b, off_h, rows, hi, delta, lo


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Lse, DLse, Stats, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, H, Sq,
    stats_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    off_b, off_h, rows, hi, delta, lo = dense_preprocess(
        Out, DOut, Lse, DLse, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, H, Sq, HEAD_DIM,
        BLOCK_D, BLOCK_M, HAS_DLSE, ACC_DTYPE)
    store_row_stats(stats_head(Stats, off_b, off_h, H, stats_len), stats_len, rows, Sq, hi, delta, lo)


def stats_row_len(rows: int) -> int:
    """Length of one statistics row for ``rows`` query rows: rounded up to a multiple of 16, so
    that every head's statistics start 64-byte aligned and the kernels, which Triton specialises
    on an int divisible by 16, load them as vectors.  (Measured on an H100: with an odd Sq the
    dK/dV kernel ran 2.2x slower, its statistics loads split into single floats.)"""
    return cdiv(rows, 16) * 16


def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                   dlse: torch.Tensor | None) -> torch.Tensor:
    """The row statistics every backward reads (with :func:`stats_head` and :func:`row_stats`):
    a (B, H, 3, stats_row_len(Sq)) tensor in the accumulator dtype holding ``lse2 = lse *
    log2(e)`` (``+inf`` for rows that saw no key, so that ``P = exp2(s - lse2)`` is 0 there, not
    NaN), ``delta = rowsum(dO * O) - dlse`` and ``lse2_lo``, the part of ``lse2`` that the first
    row could not hold.  ``lse2_lo`` is nonzero only for fp32 inputs, whose LSE is float64
    (``_runtime.lse_dtype``): the kernels then subtract ``lse2`` and ``lse2_lo`` in turn, which
    keeps P as exact as an fp64 LSE would, with fp32 registers only.  The kernels take the
    last dim (``stats.shape[-1]``) as ``stats_len``.

    ``out`` (B, Sq, H, D) and ``dout`` like it, any strides with the last dim contiguous.
    """
    b, sq, h, d = out.shape
    stats = torch.empty((b, h, 3, stats_row_len(sq)), dtype=acc_dtype(out.dtype), device=out.device)
    block_m = 64 if _INTERPRET else 128
    _bwd_preprocess_kernel[(cdiv(sq, block_m), b * h)](
        out, dout, lse, dlse if dlse is not None else lse, stats, *bsh_strides(out, dout), h, sq, stats.shape[-1],
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, HAS_DLSE=dlse is not None, **kernel_flags(out),
    )
    return stats


@triton.jit
def _sink_grad_kernel(
    Out, DOut, Lse, DLse, Sink, Partial, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, H,
    Sq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    off_b, off_h, rows, lse2, delta, lo = dense_preprocess(
        Out, DOut, Lse, DLse, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, H, Sq, HEAD_DIM,
        BLOCK_D, BLOCK_M, HAS_DLSE, ACC_DTYPE)
    sink2 = tl.load(Sink + off_h).to(ACC_DTYPE) * tl.full([], LOG2E_C, ACC_DTYPE)
    p_sink = tl.where(rows < Sq, tl.math.exp2(sink2 - lse2 - lo), 0.0)  # the sink's share of each row
    tl.store(Partial + (off_b * H + off_h) * tl.num_programs(0) + tl.program_id(0), -tl.sum(p_sink * delta))


def sink_grad(sink: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
              dlse: torch.Tensor | None) -> torch.Tensor:
    """The attention sinks' gradient ``dsink_h = -sum_rows exp(sink_h - lse) * delta`` (``delta =
    rowsum(dO * O) - dlse``, :func:`bwd_preprocess`'s statistic) in one pass over O and dO:
    per-block partial sums, then a fixed-order sum (deterministic).  ``out``/``dout`` (B, Sq, H,
    D), ``lse`` (B, H, Sq) contiguous, ``sink`` (H,)."""
    b, sq, h, d = out.shape
    block_m = 64 if _INTERPRET else 128
    partial = torch.empty((b, h, cdiv(sq, block_m)), dtype=acc_dtype(out.dtype), device=out.device)
    _sink_grad_kernel[(cdiv(sq, block_m), b * h)](
        out, dout, lse, dlse if dlse is not None else lse, sink, partial, *bsh_strides(out, dout), h, sq,
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, HAS_DLSE=dlse is not None, **kernel_flags(out),
    )
    return partial.sum((0, 2)).to(sink.dtype)


@triton.jit
def stats_head(Stats, off_b, off_h, H, stats_len):
    """Where head ``(off_b, off_h)``'s (3, stats_len) statistics start (see :func:`bwd_preprocess`)."""
    return Stats + (off_b * H + off_h) * 3 * stats_len


@triton.jit
def row_stats(Stats_head, stride, rows, Sq, q, MASKED: tl.constexpr):
    """``(lse2, lse2_lo, delta)`` of the query rows ``rows`` (``q``: their tile, for its dtype).

    ``Stats_head`` points at row 0's ``lse2``; ``stride`` is the distance between the three
    statistics rows (Sq for a dense head, the total token count for varlen).  ``lse2_lo`` is
    read for fp32 inputs only (zeros otherwise); pass all three to :func:`probs`.
    ``MASKED``: rows past Sq get ``lse2 = +inf`` (P = 0) and ``delta = 0``.
    """
    if MASKED:
        lse2 = tl.load(Stats_head + rows, mask=rows < Sq, other=float("inf"))
        delta = tl.load(Stats_head + stride + rows, mask=rows < Sq, other=0.0)
    else:
        lse2 = tl.load(Stats_head + rows)
        delta = tl.load(Stats_head + stride + rows)
    if q.dtype == tl.float32:
        lse2_lo = tl.load(Stats_head + 2 * stride + rows, mask=rows < Sq, other=0.0)
    else:
        lse2_lo = tl.zeros_like(lse2)
    return lse2, lse2_lo, delta


@triton.jit
def probs(s, lse2, lse2_lo, q):
    """The backward's ``P = exp2(s - lse2)`` from log2-domain scores ``s`` (a tile of ``q``'s
    rows) and the broadcast row statistics.

    For fp32 inputs the LSE is ``lse2 + lse2_lo``: ``s - lse2`` is exact for every entry that
    matters (both ~1.44x the logit), then ``lse2_lo`` is taken off, so P carries only the
    scores' own rounding (an fp32 LSE alone made dV 2-4x torch's fp32 error at logits ~1e3).
    """
    if q.dtype == tl.float32:
        return tl.math.exp2(s - lse2 - lse2_lo)
    else:
        return tl.math.exp2(s - lse2)


# ---------------------------------------------------------------------------------------------
# The backward's two loops (FA2's dK/dV and dQ passes; dense and varlen kernels)
# ---------------------------------------------------------------------------------------------


@triton.jit
def dkdv_loop(
    dk, dv, k, v, q_ptrs, do_ptrs, stride_qs, stride_dos, Stats_head, stats_stride,
    start_n, m_start, m_end, Sq, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """Fold query blocks [m_start, m_end) of one head into the dK/dV of the key block at ``start_n``.
    With ``DROPOUT`` (the forward's mask, regenerated: :func:`dropout_keep`) dV gets the kept
    P (unscaled: the caller scales dV once) and dP is taken w.r.t. the dropped, rescaled P.
    ``q_ptrs``/``do_ptrs`` point at the (BLOCK_M, BLOCK_D) tile of row ``m_start``;
    ``Stats_head``/``stats_stride`` locate the rows' statistics (:func:`row_stats`)."""
    BLOCK_M: tl.constexpr = q_ptrs.shape[0]
    BLOCK_N: tl.constexpr = k.shape[0]
    offs_r = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    for start_m in range(m_start, m_end, BLOCK_M):
        rows = start_m + offs_r
        q = load_tile(q_ptrs, rows, Sq, HEAD_DIM, MASKED)  # (BLOCK_M, BLOCK_D)
        do = load_tile(do_ptrs, rows, Sq, HEAD_DIM, MASKED)
        lse2, lse2_lo, delta = row_stats(Stats_head, stats_stride, rows, Sq, q, MASKED)  # rows past Sq: P = 0
        s_t, t_t = cap(score(k, tl.trans(q), qk_scale, qk_scale_lo), cap2, cap2_lo, SOFTCAP, q.dtype)  # S^T
        s_t = alibi(s_t, slope2, rows[None, :], cols[:, None], causal_offset, ALIBI)  # one head: a scalar
        s_t = attn_mask(s_t, Mask_bh, stride_mi, stride_mj, rows[None, :], cols[:, None], mask_rows, mask_cols, MASK)
        p_t = probs(s_t, lse2[None, :], lse2_lo[None, :], q)  # P^T
        if MASKED:
            if IS_CAUSAL or WINDOW:  # keys past Sk need no mask here: their dK/dV rows are never stored
                p_t = tl.where(visible(rows[None, :], cols[:, None], None, causal_offset, IS_CAUSAL, win_l, win_r,
                                       WINDOW), p_t, 0.0)
        if DROPOUT:
            keep_t = dropout_keep(drop_seed, drop_row0 + start_m, BLOCK_M, drop_col0 + start_n, drop_thresh, BLOCK_N, True)  # (N, M)
            dv = mma(tl.where(keep_t, p_t, 0.0), do, dv)
        else:
            dv = mma(p_t, do, dv)  # (BLOCK_N, BLOCK_D)
        dp_t = mma(v, tl.trans(do), tl.zeros(p_t.shape, dk.dtype))  # (BLOCK_N, BLOCK_M) = dP^T
        if DROPOUT:  # O = (P * keep / (1 - p)) V: the softmax sees dP * keep / (1 - p)
            dp_t = tl.where(keep_t, scaled(dp_t, drop_scale, drop_scale_lo), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T
        if SOFTCAP:  # through c tanh(s / c): times 1 - tanh^2
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = mma(ds_t, q, dk)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit
def dq_loop(
    dq, q, do, lse2, lse2_lo, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
    rows, n_start, n_end, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
    DMask_bh, stride_dmi, stride_dmj,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
):
    """Fold key blocks [n_start, n_end) into the dQ of the query rows ``rows`` (dropout as
    :func:`dkdv_loop`; with ``MASK_GRAD`` also add dS to the float mask's gradient,
    :func:`mask_grad_add`).
    ``k_ptrs``/``v_ptrs`` point at the (BLOCK_N, BLOCK_D) tile of key ``n_start``."""
    BLOCK_N: tl.constexpr = k_ptrs.shape[0]
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(n_start, n_end, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_ptrs, cols, Sk, HEAD_DIM, MASKED)
        v = load_tile(v_ptrs, cols, Sk, HEAD_DIM, MASKED)
        s, t = cap(score(q, tl.trans(k), qk_scale, qk_scale_lo), cap2, cap2_lo, SOFTCAP, q.dtype)
        s = alibi(s, slope2, rows[:, None], cols[None, :], causal_offset, ALIBI)  # one head: a scalar
        s = attn_mask(s, Mask_bh, stride_mi, stride_mj, rows[:, None], cols[None, :], mask_rows, mask_cols, MASK)
        p = probs(s, lse2[:, None], lse2_lo[:, None], q)  # (M, N)
        if MASKED:
            p = tl.where(visible(rows[:, None], cols[None, :], Sk, causal_offset, IS_CAUSAL, win_l, win_r, WINDOW),
                         p, 0.0)
        dp = mma(do, tl.trans(v), tl.zeros(p.shape, dq.dtype))
        if DROPOUT:
            keep = dropout_keep(drop_seed, drop_row0 + tl.min(rows, 0), rows.shape[0], drop_col0 + start_n, drop_thresh,
                            BLOCK_N)
            dp = tl.where(keep, scaled(dp, drop_scale, drop_scale_lo), 0.0)
        ds = p * (dp - delta[:, None])
        mask_grad_add(ds, DMask_bh, stride_dmi, stride_dmj, rows, cols, mask_rows, mask_cols, MASK_GRAD)
        if SOFTCAP:  # through c tanh(s / c): times 1 - tanh^2
            ds = ds * (1.0 - t * t)
        dq = mma(ds, k, dq)  # (BLOCK_M, BLOCK_D)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def dkdv_head(
    dk, dv, k, v, Q_head, DO_head, stride_qs, stride_dos, Stats_head, stats_stride,
    start_n, m0, m1, m2, m3, Sq, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """One query head's part of a key block's dK/dV, over :func:`q_range`'s ranges: the
    diagonal tiles (masked), the full tiles (no mask), then the window's left edge and the
    ragged last tile (masked).  ``Q_head``/``DO_head`` point at the head's row 0."""
    BLOCK_D: tl.constexpr = k.shape[1]
    for part in tl.static_range(3):
        a, b = range_part(part, m0, m1, m2, m3)
        dk, dv = dkdv_loop(
            dk, dv, k, v, tile_ptrs(Q_head, a, stride_qs, BLOCK_M, BLOCK_D),
            tile_ptrs(DO_head, a, stride_dos, BLOCK_M, BLOCK_D), stride_qs, stride_dos, Stats_head, stats_stride,
            start_n, a, b, Sq, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
            drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo, HEAD_DIM,
            part != 1, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
    return dk, dv


@triton.jit
def dkdv_block(
    K_head, V_head, Q_seq, DO_seq, Stats_seq, DK_head, DV_head, stride_ks, stride_vs, stride_qs, stride_qh,
    stride_dos, stride_doh, stats_len, stride_dks, off_hkv, GROUP, start_n, Sq, Sk, causal_offset, win_l, win_r,
    qk_scale, qk_scale_lo, cap2, cap2_lo, Alibi_b, stride_ah, sm_scale, sm_scale_lo,
    drop_seed, drop_row_b, drop_head_rows, drop_col0, drop_thresh, drop_scale, drop_scale_lo, Mask_b, stride_mh, stride_mi,
    stride_mj,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr,
):
    """A key block's dK/dV (dense and varlen kernels): load it, sum every query head of its
    group in registers (:func:`dkdv_head`), scale dK, store both.  ``*_seq`` point at the
    sequence's row 0 (Q/dO: of head 0; statistics: of head 0, (3, stats_len) per head);
    ``*_head`` at this K/V head's key 0; DK/DV rows are ``stride_dks`` apart.  Dropout's row
    counters of query head h start at ``drop_row_b + h * drop_head_rows`` (:func:`drop_row_base`)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(tile_ptrs(K_head, start_n, stride_ks, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
    v = load_tile(tile_ptrs(V_head, start_n, stride_vs, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    m0, m1, m2, m3 = q_range(start_n, Sq, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW)
    for g in range(GROUP):  # the query heads that share this K/V head, summed in order
        off_h = off_hkv * GROUP + g
        slope2 = head_slope(Alibi_b, off_h, stride_ah, ACC_DTYPE, ALIBI)
        dk, dv = dkdv_head(
            dk, dv, k, v, Q_seq + off_h * stride_qh, DO_seq + off_h * stride_doh, stride_qs, stride_dos,
            Stats_seq + off_h * 3 * stats_len, stats_len, start_n, m0, m1, m2, m3, Sq, causal_offset, win_l, win_r,
            qk_scale, qk_scale_lo, cap2, cap2_lo, slope2, drop_seed, drop_row_b + off_h * drop_head_rows, drop_col0, drop_thresh,
            Mask_b + off_h * stride_mh, stride_mi, stride_mj, Sq, Sk, drop_scale, drop_scale_lo, HEAD_DIM, BLOCK_M, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK)
    dk = scaled(dk, sm_scale, sm_scale_lo)  # dS was taken w.r.t. the scaled scores
    if DROPOUT:
        dv = scaled(dv, drop_scale, drop_scale_lo)  # the kept P, rescaled once
    store_tile(tile_ptrs(DK_head, start_n, stride_dks, BLOCK_N, BLOCK_D), dk, cols, Sk, HEAD_DIM)
    store_tile(tile_ptrs(DV_head, start_n, stride_dks, BLOCK_N, BLOCK_D), dv, cols, Sk, HEAD_DIM)


@triton.jit
def dq_rows(
    dq, q, do, lse2, lse2_lo, delta, K_head, V_head, stride_ks, stride_vs,
    rows, n0, n1, n2, n3, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
    DMask_bh, stride_dmi, stride_dmj,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
):
    """A query block's dQ over :func:`kv_range`'s ranges: keys [n0, n1) masked (window only),
    [n1, n2) without masks, then [n2, n3) masked.  ``K_head``/``V_head`` point at the head's key 0."""
    BLOCK_D: tl.constexpr = q.shape[1]
    for part in tl.static_range(3):
        if WINDOW or part > 0:
            a, b = range_part(part, n0, n1, n2, n3)
            dq = dq_loop(dq, q, do, lse2, lse2_lo, delta, tile_ptrs(K_head, a, stride_ks, BLOCK_N, BLOCK_D),
                         tile_ptrs(V_head, a, stride_vs, BLOCK_N, BLOCK_D), stride_ks, stride_vs,
                         rows, a, b, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
                         drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
                         DMask_bh, stride_dmi, stride_dmj,
                         HEAD_DIM, part != 1, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK, MASK_GRAD)
    return dq


@triton.jit
def dq_block(
    Q_head, DO_head, Stats_head, K_head, V_head, DQ_head, stride_qs, stride_dos, stats_len, stride_ks, stride_vs,
    stride_dqs, start_m, Sq, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2, sm_scale, sm_scale_lo,
    drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
    DMask_bh, stride_dmi, stride_dmj,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr, MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
):
    """A query block's whole dQ (dense and varlen kernels): load Q, dO and the rows' statistics,
    :func:`dq_rows`, scale, store.  ``*_head`` point at the head's row 0 / key 0; DQ rows are
    ``stride_dqs`` apart."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(tile_ptrs(Q_head, start_m, stride_qs, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, True)
    do = load_tile(tile_ptrs(DO_head, start_m, stride_dos, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, True)
    lse2, lse2_lo, delta = row_stats(Stats_head, stats_len, rows, Sq, q, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    n0, n1, n2, n3 = kv_range(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW)
    dq = dq_rows(dq, q, do, lse2, lse2_lo, delta, K_head, V_head, stride_ks, stride_vs,
                 rows, n0, n1, n2, n3, Sk, causal_offset, win_l, win_r, qk_scale, qk_scale_lo, cap2, cap2_lo, slope2,
                 drop_seed, drop_row0, drop_col0, drop_thresh, Mask_bh, stride_mi, stride_mj, mask_rows, mask_cols, drop_scale, drop_scale_lo,
                 DMask_bh, stride_dmi, stride_dmj, HEAD_DIM, BLOCK_N, IS_CAUSAL,
                 SOFTCAP, ALIBI, WINDOW, DROPOUT, MASK, MASK_GRAD)
    dq = scaled(dq, sm_scale, sm_scale_lo)  # dS was taken w.r.t. the scaled scores
    store_tile(tile_ptrs(DQ_head, start_m, stride_dqs, BLOCK_M, BLOCK_D), dq, rows, Sq, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# packed sequences (varlen): which sequence a work item belongs to
# ---------------------------------------------------------------------------------------------


@triton.jit
def seq_of_block(CuBlocks, p, B, LOG_B: tl.constexpr):
    """The sequence ``b`` whose query blocks include work item ``p``: the largest ``b`` in
    [0, B] with ``cu_blocks[b] <= p`` (``B`` when ``p`` is past the last block).  Sequences with
    no block (length 0) are skipped by construction.  ``2**LOG_B > B``."""
    b = p * 0
    for i in tl.static_range(LOG_B):
        cand = b + (1 << (LOG_B - 1 - i))
        start = tl.load(CuBlocks + cand, mask=cand <= B, other=2147483647)
        b = tl.where(start <= p, cand, b)
    return b


@triton.jit
def seq_bounds(Cu, b, T):
    """(start, length) of sequence ``b`` from its cu_seqlens, clamped into [0, T]."""
    start = tl.minimum(tl.maximum(tl.load(Cu + b), 0), T)
    end = tl.minimum(tl.maximum(tl.load(Cu + b + 1), start), T)
    return start.to(tl.int64), end - start


@triton.jit
def work_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK: tl.constexpr, LOG_B: tl.constexpr,
              HAS_SEQUSED: tl.constexpr):
    """This program's work item (axis 0 walks the work list of ``CuBlocks``, in blocks of
    ``BLOCK`` rows): ``(valid, q_start, len_q, k_start, len_k, start, b)``, where ``start`` is
    the block's first row inside its sequence, ``b`` the sequence (clamped into [0, B - 1]) and
    ``valid`` is False past the last block (B >= 1).
    With ``HAS_SEQUSED`` only the first ``seqused_k[b]`` keys of sequence ``b`` exist (clamped
    into [0, its cu_seqlens_k length])."""
    p = tl.program_id(0)
    b = seq_of_block(CuBlocks, p, B, LOG_B)
    bc = tl.minimum(b, B - 1)  # in bounds even for the programs that have no work
    q_start, len_q = seq_bounds(CuQ, bc, Tq)
    k_start, len_k = seq_bounds(CuK, bc, Tk)
    if HAS_SEQUSED:
        len_k = tl.minimum(tl.maximum(tl.load(SeqUsedK + bc), 0), len_k)
    return b < B, q_start, len_q, k_start, len_k, (p - tl.load(CuBlocks + bc)) * BLOCK, bc
