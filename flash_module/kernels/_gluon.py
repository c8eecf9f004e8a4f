"""What the Gluon kernels for Hopper (``gluon_fwd.py``, ``gluon_bwd.py``) share: the imports
(absent from the installed Triton: :data:`HAVE_GLUON` is False and the portable kernels run),
3-D TMA descriptors, and the pieces of the warp-specialized kernels (the forward and the dQ
pass): a ring of K and V stages with its barriers, the TMA producer warp that fills it, and the
key-block ranges of a query tile.

The ring protocol: stage ``j % STAGES`` holds key block j.  ``k_ready``/``v_ready`` complete
when the TMA bytes of K_j / V_j have landed; ``k_empty``/``v_empty`` take one arrival from each
of the two consumer warpgroups when they are done with K_j (after their S_j) / V_j (after the
matmul that reads it), and the producer waits for that before it loads block j + STAGES there.
"""

from __future__ import annotations

import torch

from ._common import philox, work_item

try:  # Gluon with the Hopper ops (triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "HAVE_TMA_ADD", "CONSUMER_REGS", "LOG2E_C", "descriptor_3d", "shared_layout_3d",
           "set_scratch_allocator"]
#: Whether the installed Gluon can add a shared-memory tile into global memory by TMA
#: (``cp.reduce.async.bulk.tensor``): :func:`tma_add`.
HAVE_TMA_ADD = False
if HAVE_GLUON:
    if hasattr(tma, "async_atomic_add"):  # triton >= 3.7 names it
        tma_add = tma.async_atomic_add
        HAVE_TMA_ADD = True
    else:  # triton 3.5/3.6: the op is there, its Python wrapper is not
        from triton._C.libtriton import gluon_ir as _gluon_ir
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        HAVE_TMA_ADD = hasattr(_gluon_ir.GluonOpBuilder, "create_async_tma_reduce")

        @_builtin
        def tma_add(tensor_desc, coord, src, _semantic=None):
            """Add the shared-memory tile ``src`` into ``tensor_desc`` at ``coord`` (an async
            TMA reduction, one bulk group: ``tma.store_wait`` before ``src`` is written again)."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

    __all__ += ["tma_add", "gluon", "gl", "fence_async_shared", "mbarrier", "tma", "warpgroup_mma", "warpgroup_mma_wait",
                "TensorDescriptor", "load_block", "producer", "kv_ring", "key_blocks", "window_blocks", "store_rows",
                "tanh_approx", "variant_scores", "alibi_side", "alibi_separable_p", "tile_key_blocks", "varlen_item", "sequence_descriptor", "dropout_keep_mma",
                "dropout_keep_mma_t"]

#: Registers per thread of a consumer warpgroup of the warp-specialized kernels (the producer
#: warp gets 24): 2 x 128 x 240 + 128 x 24 fills the register file.
CONSUMER_REGS = gl.constexpr(240) if HAVE_GLUON else 240
#: log2(e), for the ALiBi slopes and sink logits the kernels read in natural-log units.
LOG2E_C = gl.constexpr(1.4426950408889634) if HAVE_GLUON else 1.4426950408889634


def descriptor_3d(t: torch.Tensor, rows: int):
    """TMA descriptor of a (B, S, H, D) tensor dense in (S, H, D), read as (B, S, H*D) with
    (1, rows, D) boxes: rows past S are zero-filled, never the next batch element's."""
    b, s, h, d = t.shape
    flat = t.as_strided((b, s, h * d), (t.stride(0), h * d, 1))
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [1, rows, d], shared_layout_3d(t, rows))


def shared_layout_3d(t: torch.Tensor, rows: int):
    """The shared-memory layout of a (1, rows, D) box of ``t`` (fp16/bf16, or the backward's
    fp32 dQ buffer; D last), as the descriptors of :func:`descriptor_3d` and the kernels'
    device-side ones use it."""
    gdt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[t.dtype]
    return gl.NVMMASharedLayout.get_default_for([1, rows, t.shape[-1]], gdt)


def _scratch(size: int, alignment: int, stream):
    """Triton's scratch allocator for kernels that build TMA descriptors on the device (the
    varlen kernels: one per sequence): a byte tensor from torch's caching allocator on the
    current device and stream, so CUDA-graph capture takes it from the graph's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_scratch_allocator() -> None:
    """Give Triton :func:`_scratch` as its allocator where none is set (Triton keeps it in a
    context variable: the autograd engine's threads start without one).  An allocator the user
    set stays."""
    import triton
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


if HAVE_GLUON:

    @gluon.jit
    def tanh_approx(x):
        """The GPU's one-instruction tanh (``tanh.approx.f32``, relative error ~2^-11, as the
        portable kernels use for fp16/bf16 scores)."""
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def variant_scores(s, qk_scale, cap2, slope2, diag, keys, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr):
        """Log2-domain scores of the raw score tile ``s`` under softcap and/or ALiBi, as
        ``_common.cap`` / ``_common.alibi``: ``x = s qk_scale``; softcap ``t = tanh(x)``, ``x = t
        cap2`` (qk_scale = softmax_scale / c, cap2 = c log2 e); ALiBi ``x -= slope2 |diag - keys|``
        (slope2 = slope log2 e; ``diag`` = row + causal_offset and ``keys`` in fp32, exact below
        2^24, shaped to broadcast against ``s``).  Returns ``(x, t)``: ``t`` for the backward's
        dS (1 - t^2) (x itself without SOFTCAP, unused)."""
        x = s * qk_scale
        t = x
        if SOFTCAP:
            t = tanh_approx(x)
            x = t * cap2
        if ALIBI:
            x = x - slope2 * gl.abs(diag - keys)
        return x, t

    @gluon.jit
    def alibi_side(key0, n_keys: gl.constexpr, diag0, n_diag: gl.constexpr):
        """Where an ALiBi tile lies against the diagonal: keys key0 .. key0 + n_keys - 1 against
        diagonal positions (row + causal_offset) diag0 .. diag0 + n_diag - 1.  Returns ``(left,
        one_sided)``: ``left``, every key at or left of every diagonal position; ``one_sided``,
        that or every key at or right of them.  On such a tile the bias separates
        (:func:`alibi_separable_p`)."""
        left = key0 + n_keys - 1 <= diag0
        return left, left | (key0 >= diag0 + n_diag - 1)

    @gluon.jit
    def alibi_separable_p(s, qk_scale, slope2, left, key_off, diag_off, lse2):
        """P = exp2(s qk_scale - slope2 |diag - key| - lse2) on a tile that lies on one side of the
        diagonal (:func:`alibi_side`), where |diag - key| = +-(diag_off - key_off) with offsets
        from any common origin: a per-key and a per-row vector, so P costs one FMA and one add per
        score instead of :func:`variant_scores`' four operations.  ``key_off``, ``diag_off`` and
        ``lse2`` come shaped to broadcast against ``s`` (a (1, N) or (N, 1) vector each)."""
        sl = gl.where(left, slope2, -slope2)
        kb = key_off.to(gl.float32) * sl
        r = diag_off.to(gl.float32) * sl + lse2
        return gl.exp2(s * qk_scale + kb - r)

    @gluon.jit
    def load_block(desc, b, n, col, bar, buf):
        """Start the TMA load of block ``n`` (rows n.. of batch ``b``, columns col..) into ``buf``."""
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [b, n, col], bar, buf)

    @gluon.jit
    def kv_ring(k_desc, v_desc, STAGES: gl.constexpr):
        """Shared memory for STAGES K and V blocks and the ring's barriers, initialised:
        ``(k_smem, v_smem, k_ready, v_ready, k_empty, v_empty)``."""
        dtype: gl.constexpr = k_desc.dtype
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = k_desc.block_type.shape[2]
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        return k_smem, v_smem, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, first, total, off_b, kv_col,
                 c0, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """One warp: K and V of key blocks first .. total - 1, the i-th of them into ring
        position c = c0 + i (stage c % STAGES) as soon as both consumers have released the
        stage's previous block (``*_empty``: two arrivals per use); ``c0``: the blocks the ring
        took before (a persistent program's earlier tiles), else 0."""
        for i in range(total - first):
            c = c0 + i
            st = c % STAGES
            again = ((c // STAGES) & 1) ^ 1  # the stage's previous use (c - STAGES) is done
            n = (first + i) * BLOCK_N
            mbarrier.wait(k_empty.index(st), phase=again, pred=c >= STAGES)
            load_block(k_desc, off_b, n, kv_col, k_ready.index(st), k_smem.index(st))
            mbarrier.wait(v_empty.index(st), phase=again, pred=c >= STAGES)
            load_block(v_desc, off_b, n, kv_col, v_ready.index(st), v_smem.index(st))

    @gluon.jit
    def pass_blocks(k_ready, v_ready, k_empty, v_empty, c_lo, c_hi, STAGES: gl.constexpr):
        """A consumer's side of ring positions c_lo .. c_hi - 1 that it does not read: each K
        and V waited for, then released.  The wait comes first: released early, the arrival
        would count towards the stage's previous use, which the other consumer may still read."""
        for c in range(c_lo, c_hi):
            st = c % STAGES
            phase = (c // STAGES) & 1
            mbarrier.wait(k_ready.index(st), phase=phase)
            mbarrier.arrive(k_empty.index(st), count=1)
            mbarrier.wait(v_ready.index(st), phase=phase)
            mbarrier.arrive(v_empty.index(st), count=1)

    @gluon.jit
    def key_blocks(start_m, Sk, causal_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   IS_CAUSAL: gl.constexpr):
        """The key blocks of the query tile at rows [start_m, start_m + BLOCK_M): ``(total,
        n_full)``: blocks [0, n_full) are seen whole by every row and lie inside Sk (no mask),
        [n_full, total) need the mask (causal: bottom-right by causal_offset; the block holding
        key Sk - 1)."""
        n_end = Sk
        first_limit = Sk
        if IS_CAUSAL:
            n_end = gl.minimum(Sk, gl.maximum(start_m + BLOCK_M + causal_offset, 0))
            first_limit = gl.minimum(Sk, gl.maximum(start_m + causal_offset + 1, 0))
        return gl.cdiv(n_end, BLOCK_N), first_limit // BLOCK_N

    @gluon.jit
    def window_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """A sliding window's key blocks for the query tile at rows [start_m, start_m + BLOCK_M)
        (row r sees keys [r + causal_offset - win_l, r + causal_offset + win_r]; an unbounded
        side comes as a bound too large to bind): ``(first, total, full_lo, full_hi)``: blocks
        [first, total) hold every key some row sees, [full_lo, full_hi) are seen whole by every
        row and lie inside Sk (no mask).  ``_common.kv_range`` in block units."""
        first_row = start_m + causal_offset
        last_row = start_m + BLOCK_M - 1 + causal_offset
        first = gl.maximum(first_row - win_l, 0) // BLOCK_N
        n3 = gl.maximum(gl.minimum(Sk, last_row + win_r + 1), first * BLOCK_N)
        full_lo = gl.minimum(gl.cdiv(gl.maximum(last_row - win_l, 0), BLOCK_N), gl.cdiv(n3, BLOCK_N))
        full_hi = gl.minimum(gl.maximum(first_row + win_r + 1, 0) // BLOCK_N, Sk // BLOCK_N)
        return first, gl.cdiv(n3, BLOCK_N), full_lo, gl.maximum(full_hi, full_lo)

    @gluon.jit
    def tile_key_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """The key blocks of the query tile at rows [start_m, start_m + BLOCK_M), as
        :func:`window_blocks` gives them, ``(first, total, full_lo, full_hi)``, with or without
        a window (without: :func:`key_blocks`, from block 0)."""
        if WINDOW:
            return window_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N)
        else:
            total, full_hi = key_blocks(start_m, Sk, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
            return 0, total, 0, full_hi

    @gluon.jit
    def store_rows(X, x, row0, off_b, off_h, S, H, layout: gl.constexpr):
        """Store ``x`` (ROWS, D), fp32 in ``layout``, as rows row0 .. row0 + ROWS - 1 of head
        ``off_h`` of batch element ``off_b`` of the contiguous (B, S, H, D) tensor ``X``, in X's
        dtype; rows past S are not stored."""
        ROWS: gl.constexpr = x.shape[0]
        D: gl.constexpr = x.shape[1]
        rows = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, layout))
        cols = gl.arange(0, D, gl.SliceLayout(0, layout))
        offs = ((off_b * S + rows[:, None]).to(gl.int64) * H + off_h) * D + cols[None, :]
        gl.store(X + offs, x.to(X.dtype.element_ty), mask=rows[:, None] < S)

    @gluon.jit
    def varlen_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK: gl.constexpr, LOG_B: gl.constexpr,
                    HAS_SEQUSED: gl.constexpr):
        """``_common.work_item`` for the Gluon varlen kernels: ``(b, q_start, len_q, k_start,
        len_k, start)``.  A program past the last block gets sequence B - 1 with both lengths 0
        (it loads at most one tile and stores nothing)."""
        valid, q_start, len_q, k_start, len_k, start, b = work_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK,
                                                                    LOG_B, HAS_SEQUSED)
        return b, q_start, gl.where(valid, len_q, 0), k_start, gl.where(valid, len_k, 0), start

    @gluon.jit
    def sequence_descriptor(X, start, stride, length, width, box: gl.constexpr, layout: gl.constexpr):
        """A TMA descriptor, made on the device, of one packed sequence's rows of ``X`` (rows
        ``start`` .. ``start + length - 1``, ``stride`` elements apart, ``width`` = heads * D
        contiguous elements each), read as (1, length, width) in ``box`` boxes: rows past the
        sequence's end come in as zeros, as :func:`descriptor_3d`'s do past S.  A length of 0
        becomes 1 (TMA wants no empty dimension; callers load nothing then)."""
        return tma.make_tensor_descriptor(X + start * stride, [1, gl.maximum(length, 1), width], [stride, stride, 1],
                                          box, layout)

    @gluon.jit
    def dropout_keep_mma(seed, row0, start_n, thresh, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                         layout: gl.constexpr):
        """Dropout's keep mask of a (ROWS, BLOCK_N) score tile, the same bits as
        ``_common.dropout_keep`` (``row0``: the int64 row counter of the tile's first row, ``stream
        << 32 | i``; ``start_n``: its first key; both multiples of 16), built in ``layout``, a
        4-warp wgmma accumulator layout.  A Philox call (counter: key quad, row pair, stream, 0)
        serves rows {i, i + 8} x keys {j, j + 1, j + 8, j + 9}: exactly the entries one thread
        holds in that layout, so the calls run in a (ROWS / 2, BLOCK_N / 4) blocked layout (warp
        = 8 row pairs, lane = row pair x key quad) and the joins, reshape and permute below only
        rename registers (offline, sm_90: no shared memory, no shuffles).  Row ``i + 8s``, key
        ``j + 8k + h`` reads half ``h`` of word ``2s + k``."""
        calls: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [4, 1], [1, 0])
        P: gl.constexpr = ROWS // 2
        Q: gl.constexpr = BLOCK_N // 4
        row0 = gl.to_tensor(row0).to(gl.int64)
        stream = (row0 >> 32).to(gl.uint32)
        pair = ((row0 & 0xFFFFFFFF) // 2 + gl.arange(0, P, gl.SliceLayout(1, calls))).to(gl.uint32)
        quad = (start_n // 4 + gl.arange(0, Q, gl.SliceLayout(0, calls))).to(gl.uint32)
        zero = gl.zeros([P, Q], gl.uint32, calls)
        w = philox(seed, quad[None, :] + zero, pair[:, None] + zero, stream + zero, zero)
        keep = gl.reshape(_keep_bits(w, thresh), [ROWS // 16, 8, BLOCK_N // 16, 4, 2, 2, 2])  # a, i8, b, q, h, k, s
        keep = gl.reshape(gl.permute(keep, [0, 6, 1, 2, 5, 3, 4]), [ROWS, BLOCK_N])  # (a, s, i8), (b, k, q, h)
        return gl.convert_layout(keep, layout)

    @gluon.jit
    def _keep_bits(words, thresh):
        """The eight keep bits of each Philox call: ``(words)`` its four uint32 words; bit (h, k, s)
        (trailing dims, in that order) is half ``h`` of word ``2s + k`` compared with ``thresh``
        (``_common._keep_bits``; an int arg of 1 arrives as a constexpr)."""
        w0, w1, w2, w3 = words
        t32 = gl.to_tensor(thresh).to(gl.uint32) << 16
        k0 = gl.join(gl.join((w0 << 16) >= t32, w0 >= t32), gl.join((w1 << 16) >= t32, w1 >= t32))
        k1 = gl.join(gl.join((w2 << 16) >= t32, w2 >= t32), gl.join((w3 << 16) >= t32, w3 >= t32))
        return gl.join(k0, k1)

    @gluon.constexpr_function
    def _calls_t_layout(BLOCK_N, BLOCK_M):
        """The (BLOCK_N / 4 key quads, BLOCK_M / 2 query pairs) Philox calls of a transposed
        (keys, queries) tile, placed where a 4-warp wgmma accumulator of that tile needs them: warp
        w and lane t hold key rows 16w + t // 4 (+ 8), so quad 4w + t // 8, with lanes t and t ^ 4
        sharing each call (one takes the even key, one the odd); query columns 8n + 2 (t % 4) (+ 1),
        so pairs 8 (n // 2) + 2 (t % 4) (+ 1)."""
        reg = [[0, 1]] + [[0, 8 << i] for i in range((BLOCK_M // 16).bit_length() - 1)]
        lane = [[0, 2], [0, 4], [0, 0], [1, 0], [2, 0]]
        warp = [[4 << i, 0] for i in range((BLOCK_N // 16).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [BLOCK_N // 4, BLOCK_M // 2])

    @gluon.jit
    def dropout_keep_mma_t(seed, row0, start_n, thresh, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                           layout: gl.constexpr):
        """:func:`dropout_keep_mma` of the transposed (BLOCK_N keys, BLOCK_M queries) tile, in its
        4-warp wgmma accumulator ``layout`` (the dK/dV pass's S^T).  A thread there holds keys
        {r, r + 8} of one call's four, so two lanes compute each call
        (:func:`_calls_t_layout`) and keep the half they need; offline (sm_90) the conversion
        moves no data through shared memory."""
        calls: gl.constexpr = _calls_t_layout(BLOCK_N, BLOCK_M)
        QD: gl.constexpr = BLOCK_N // 4
        PP: gl.constexpr = BLOCK_M // 2
        row0 = gl.to_tensor(row0).to(gl.int64)
        stream = (row0 >> 32).to(gl.uint32)
        quad = (start_n // 4 + gl.arange(0, QD, gl.SliceLayout(1, calls))).to(gl.uint32)
        pair = ((row0 & 0xFFFFFFFF) // 2 + gl.arange(0, PP, gl.SliceLayout(0, calls))).to(gl.uint32)
        zero = gl.zeros([QD, PP], gl.uint32, calls)
        w = philox(seed, quad[:, None] + zero, pair[None, :] + zero, stream + zero, zero)
        keep = gl.reshape(_keep_bits(w, thresh), [QD // 4, 4, PP // 8, 8, 2, 2, 2])  # a, q, b, i8, h, k, s
        keep = gl.reshape(gl.permute(keep, [0, 5, 1, 4, 2, 6, 3]), [BLOCK_N, BLOCK_M])  # (a, k, q, h), (b, s, i8)
        return gl.convert_layout(keep, layout)
