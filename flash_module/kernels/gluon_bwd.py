"""The backward's passes for Hopper (sm_90) in Gluon: warpgroup MMA, TMA, mbarriers.

**dK/dV** (:func:`_dkdv_kernel`): the same algorithm as ``fa2_bwd._bwd_dkdv_kernel`` (FA2's
Algorithm 2, dK/dV half), written one level lower so that where each operand lives is ours to
say, not the compiler's: K and V stay in shared memory for the whole program (wgmma reads them
from there; the portable kernel holds them in registers, which is what spills at D=256), Q and
dO stream through a two-stage shared-memory ring filled by TMA one step ahead, and the four
matmuls of a step are issued asynchronously so the exponentials of P overlap the dP matmul:

    for each query block m (and each query head of the K/V head's GQA group):
        S^T  = K Q_m^T                       (BLOCK_N, BLOCK_M)   wgmma, smem x smem
        dP^T = V dO_m^T                      (BLOCK_N, BLOCK_M)   wgmma, in flight during P
        P^T  = exp2(S^T * qk_scale - lse2_m) (causal: 0 above the diagonal; rows past Sq: lse2 = +inf)
        dV  += P^T dO_m                      (BLOCK_N, D)         wgmma, P^T from registers
        dS^T = P^T * (dP^T - delta_m)
        dK  += dS^T Q_m                      (BLOCK_N, D)         wgmma, dS^T from registers
    dK *= softmax_scale

Per query head the blocks that reach above the causal diagonal run first, in a copy of the step
with the mask (:func:`_dkdv_step` with ``MASKED``), and the rest in a copy without it.  At
D=256 two warpgroups split the accumulators' columns (:func:`_mma_layouts`).

**dQ**: at D=64/128 warp-specialized (:func:`_ws_dq_kernel`: the forward's TMA producer warp
streams K and V, two consumer warpgroups own half of a 128-row query tile each); at D=256 the
plain :func:`_dq_kernel` (Q and dO in shared memory, K and V in a two-stage ring).

Softcap, ALiBi and sliding windows (with :data:`VARIANTS`): the forward's scores are recomputed
(``_gluon.variant_scores``), dS goes through the cap's ``1 - tanh^2``, and a window bounds the
query blocks of a key block (dK/dV, every step masked) and the key blocks of a query tile (dQ,
``_gluon.window_blocks``).

Scope: fp16/bf16, head dims 64, 128 and 256 (:data:`HEAD_DIMS`), no mask, dropout only with
:data:`DROPOUT` at D=64/128 (:func:`dropout_takes`: the forward's mask regenerated in each pass's
wgmma layout, ``_gluon.dropout_keep_mma`` / ``dropout_keep_mma_t``) (and at
D=256 the dQ pass takes no variant: the portable dQ runs then), contiguous (B, S, H, D) inputs.
Every pass reads them through 3-D (batch, sequence, heads * D) TMA descriptors
(``_gluon.descriptor_3d``): rows past a sequence's end come in as zeros, never the next
sequence's, so a NaN in one batch element cannot reach another's gradients.
Packed sequences (varlen: :func:`varlen_dkdv`, :func:`varlen_dq`): the dK/dV and the
warp-specialized dQ tile bodies (:func:`_dkdv_tile`, :func:`_ws_dq_tile`) run by work lists over
the sequences' key / query blocks, each program reading its own sequence through descriptors
built on the device (``_gluon.sequence_descriptor``: zeros past the sequence's end) and the
packed statistics of ``varlen._varlen_preprocess``; at D=256 the portable varlen dQ runs.
At D=64 (dense calls, :data:`FUSED_DQ`) the dK/dV pass also computes dQ, adding each step's
dS K into an fp32 buffer by TMA reductions, and the dQ pass does not run (5 matmuls per tile
pair instead of 7; :func:`fused_dq_takes`).  Its dQ is a sum in no fixed order, so
``deterministic=True`` and ``torch.use_deterministic_algorithms(True)`` run the two passes,
which have no atomics and are bitwise reproducible.
:func:`supported` says whether a call qualifies;
``fa2_bwd.fa2_backward`` uses these passes then, and the portable ones otherwise.  Not available
under the interpreter (Gluon has none): CI runs the portable kernels.
"""

from __future__ import annotations

import os

import torch

from .._runtime import cdiv
from . import _common
from ._common import LOG2E
from ._gluon import (
    CONSUMER_REGS,
    HAVE_GLUON,
    HAVE_TMA_ADD,
    LOG2E_C,
    descriptor_3d,
    set_scratch_allocator,
    shared_layout_3d,
)

if HAVE_GLUON:
    from ._gluon import (
        alibi_separable_p,
        alibi_side,
        dropout_keep_mma,
        dropout_keep_mma_t,
        fence_async_shared,
        gl,
        gluon,
        kv_ring,
        mbarrier,
        producer,
        sequence_descriptor,
        store_rows,
        tile_key_blocks,
        tma,
        tma_add,
        variant_scores,
        varlen_item,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

#: Launch configs (BLOCK_M, BLOCK_N, num_warps) of the dK/dV pass per head dim; the pass takes
#: these head dims only.  D=64 and 128: 64 x 64 tiles with one warpgroup were 0-5% faster than
#: 64 x 128 with two on an H200 (Gluon / portable 1.07-1.08x at D=64, 1.14-1.56x at D=128,
#: performance.md eleventh session).  D=256: two warpgroups on 64 x 64 tiles, each holding half
#: of the (64, 256) accumulators' columns (one warpgroup would need 256 registers per thread for
#: them alone).
DKDV_CONFIGS = {64: (64, 64, 4), 128: (64, 64, 4), 256: (64, 64, 8)}
HEAD_DIMS = tuple(DKDV_CONFIGS)
#: Head dims whose dQ pass runs in Gluon too (else the portable dQ kernel), and its configs:
#: (BLOCK_M, BLOCK_N, stages, "ws") the warp-specialized pass (two consumer warpgroups, a TMA
#: producer warp, as the forward), (BLOCK_M, BLOCK_N, num_warps) the plain one.  On an H200
#: (bf16, performance.md twelfth session) the warp-specialized dQ made the backward 1.03-1.06x
#: the portable dQ's at D=128 and 1.03x at D=64; at D=256 (where the warp-specialized consumers
#: spill) the plain pass 0.99-1.07x.  ``FLASH_MODULE_GLUON_DQ=0``: the portable dQ everywhere.
DQ_HEAD_DIMS = () if os.environ.get("FLASH_MODULE_GLUON_DQ", "") == "0" else HEAD_DIMS
DQ_CONFIGS = {64: (128, 64, 3, "ws"), 128: (128, 64, 3, "ws"), 256: (64, 64, 8)}
#: Whether softcap, ALiBi and sliding windows run in the Gluon passes too (the dK/dV pass at
#: every head dim, the warp-specialized dQ at D=64/128; else the portable kernels;
#: ``FLASH_MODULE_GLUON_BWD_VARIANTS=0``).  Dropout follows :data:`DROPOUT`; masks always take the
#: portable kernels.
VARIANTS = os.environ.get("FLASH_MODULE_GLUON_BWD_VARIANTS", "1") != "0"
#: ``FLASH_MODULE_GLUON=0`` turns the Gluon pass off (the portable kernel runs everywhere).
ENABLED = os.environ.get("FLASH_MODULE_GLUON", "1") != "0"
#: Whether dropout runs in the Gluon passes (``FLASH_MODULE_GLUON_DROPOUT=0`` turns it off, as
#: for ``gluon_fwd.DROPOUT``), at the head dims of :func:`dropout_takes`.
DROPOUT = os.environ.get("FLASH_MODULE_GLUON_DROPOUT", "1") != "0"
#: How the one-pass backward adds each step's dQ tile into the fp32 buffer: True (where the
#: installed Gluon has it, :data:`_gluon.HAVE_TMA_ADD`), the registers go to shared memory and one
#: thread issues a TMA reduction (``cp.reduce.async.bulk.tensor``) that runs under the next
#: step's matmuls; False, every thread adds its share with vector atomics (``REDG.E.ADD.F32x2``,
#: 16 per thread per step at D=64), 13-23% slower than the two passes on an H200 (seventeenth
#: session).  ``FLASH_MODULE_GLUON_FUSED_DQ_TMA=0``: the atomics.
FUSED_DQ_TMA = HAVE_TMA_ADD and os.environ.get("FLASH_MODULE_GLUON_FUSED_DQ_TMA", "1") != "0"
#: Whether the dK/dV pass also computes dQ (one pass, issue #15's first lead): dS K per step added
#: into an fp32 buffer, five matmuls per tile pair instead of seven, at :data:`FUSED_DQ_HEAD_DIMS`,
#: dense calls.  Not bitwise reproducible, so ``torch.use_deterministic_algorithms(True)`` and
#: flash-attn's ``deterministic=True`` (which the ops carry to ``fa2_bwd.fa2_backward``) keep the
#: two passes.  On by default where the TMA adds exist (H200, bf16: the backward 1.06-1.08x the
#: two passes' at D=64, 1k-16k; at D=128 0.76-0.93x, so not there);
#: ``FLASH_MODULE_GLUON_FUSED_DQ=0`` / ``=1`` turns it off / on.
FUSED_DQ = os.environ.get("FLASH_MODULE_GLUON_FUSED_DQ", "1" if FUSED_DQ_TMA else "0") == "1"
FUSED_DQ_HEAD_DIMS = (64,)
#: The one-pass dK/dV launch configs (BLOCK_M, BLOCK_N, num_warps).  D=128 (not in
#: :data:`FUSED_DQ_HEAD_DIMS`): 128 keys on two warpgroups, each holding half of dQ's columns;
#: offline it spills (8-176 bytes with the TMA adds), and on the H200 it ran at 0.76-0.93x the
#: two passes (64 x 64 on one warpgroup: 0.65-0.70x).  A step with queries as the score rows
#: (P and dS through shared memory, no spills) ran at 0.87-0.96x (performance.md twentieth
#: session) and was removed.  At D=64, 64 x 128 on two warpgroups was 0.86-0.91x the 64 x 64 one.
FUSED_DKDV_CONFIGS = {64: (64, 64, 4), 128: (64, 128, 8)}
#: Whether packed (varlen) calls run the Gluon passes too (``FLASH_MODULE_GLUON_VARLEN=0``: the
#: portable varlen kernels, as for ``gluon_fwd.VARLEN``).
VARLEN = os.environ.get("FLASH_MODULE_GLUON_VARLEN", "1") != "0"


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, variants: bool) -> bool:
    """Whether the Gluon dK/dV pass can run this call (shapes, dtypes, strides and the GPU only);
    ``variants``: the call has a variant (or explicit launch configs), which only the portable
    kernel takes."""
    if not (HAVE_GLUON and ENABLED) or variants or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    for t in (q, k, v, dout):  # (B, S, H, D) dense in (H, D), S stride H*D, B stride S*H*D
        b, s, h, d = t.shape
        if t.stride() != (s * h * d, h * d, d, 1) or t.data_ptr() % 16 or t.dtype != q.dtype:
            return False
    return q.numel() > 0 and k.shape[1] > 0


if HAVE_GLUON:

    @gluon.constexpr_function
    def _mma_layouts(rows, tile_n, head_dim, num_warps):
        """The warpgroup-MMA layouts of a pass whose program owns ``rows`` rows: the score tile
        (rows, ``tile_n``), the (rows, D) accumulators, and the score tile as the register A
        operand of the accumulators' MMA.  Warps cover the rows 16 each; warps left over (8 warps
        on 64 rows at D=256) split the columns, so each warpgroup holds half of every tile and
        the A operand, which every warpgroup needs whole, is exchanged through shared memory by
        the layout conversion."""
        wm = min(num_warps, rows // 16)
        wn = num_warps // wm
        scores = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, wn],
                                           instr_shape=[16, tile_n // wn, 16])
        acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, wn], instr_shape=[16, head_dim // wn, 16])
        return scores, acc, gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)

    @gluon.constexpr_function
    def _dkdv_layouts(block_m, block_n, head_dim, num_warps):
        """The dK/dV pass's layouts (:func:`_mma_layouts` of its (BLOCK_N, D) accumulators): the
        score tile (BLOCK_N, BLOCK_M), keys as rows, the accumulators, the score tile as their
        MMA's register A operand, a query row's statistic and a key's index."""
        scores, acc, a_op = _mma_layouts(block_n, block_m, head_dim, num_warps)
        return scores, acc, a_op, gl.SliceLayout(0, scores), gl.SliceLayout(1, scores)

    @gluon.jit
    def _stage_tiles(own_a_desc, own_b_desc, ring_a_desc, ring_b_desc, b, row, col, OWN_ROWS: gl.constexpr,
                     RING_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Shared memory of a pass: the program's own pair of (OWN_ROWS, D) tiles (K, V for dK/dV;
        Q, dO for dQ), whose TMA load from batch element ``b``, ``[row, col]`` starts here, and a
        two-stage ring for the streamed pair, with one barrier per stage.  Returns (own_a, own_b,
        own_bar, ring_a, ring_b, ring_bars); the own tiles as (OWN_ROWS, D) views, the ring's
        stages as (1, RING_ROWS, D) boxes (3-D TMA: rows past a sequence's end are zeros)."""
        dtype: gl.constexpr = own_a_desc.dtype
        own_a = gl.allocate_shared_memory(dtype, [1, OWN_ROWS, HEAD_DIM], own_a_desc.layout)
        own_b = gl.allocate_shared_memory(dtype, [1, OWN_ROWS, HEAD_DIM], own_b_desc.layout)
        ring_a = gl.allocate_shared_memory(dtype, [2, 1, RING_ROWS, HEAD_DIM], ring_a_desc.layout)
        ring_b = gl.allocate_shared_memory(dtype, [2, 1, RING_ROWS, HEAD_DIM], ring_b_desc.layout)
        own_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(own_bar, count=1)
        mbarrier.init(bars.index(0), count=1)
        mbarrier.init(bars.index(1), count=1)
        mbarrier.expect(own_bar, own_a_desc.block_type.nbytes + own_b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(own_a_desc, [b, row, col], own_bar, own_a)
        tma.async_copy_global_to_shared(own_b_desc, [b, row, col], own_bar, own_b)
        return (own_a.reshape([OWN_ROWS, HEAD_DIM]), own_b.reshape([OWN_ROWS, HEAD_DIM]), own_bar, ring_a, ring_b,
                bars)

    @gluon.jit
    def _load_pair(a_desc, b_desc, b, row, col, bar, a_smem, b_smem, nbytes: gl.constexpr):
        """Start the TMA loads of one ring stage's pair of tiles (batch element ``b``, ``[row,
        col]``), arriving on ``bar``."""
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(a_desc, [b, row, col], bar, a_smem)
        tma.async_copy_global_to_shared(b_desc, [b, row, col], bar, b_smem)

    @gluon.jit
    def _two_products(a, b, c, d, zero):
        """Start ``a b^T`` and ``c d^T`` (shared-memory operands, async warpgroup MMAs) and wait for
        the first: returns it and the second, still in flight (S and dP of one step)."""
        x = warpgroup_mma(a, b.permute((1, 0)), zero, use_acc=False, is_async=True)
        y = warpgroup_mma(c, d.permute((1, 0)), zero, use_acc=False, is_async=True)
        x = warpgroup_mma_wait(num_outstanding=1, deps=(x,))
        return x, y

    @gluon.jit
    def _release(own_bar, bars):
        mbarrier.invalidate(own_bar)
        mbarrier.invalidate(bars.index(0))
        mbarrier.invalidate(bars.index(1))

    @gluon.jit
    def _drop_args(Rng, stream0, row_off, col_off, thresh, scale, DROPOUT: gl.constexpr):
        """The dK/dV pass's dropout arguments as one tuple (:func:`_dkdv_step`): the seed read from
        ``Rng`` (0 without ``DROPOUT``), then the rest as given."""
        seed = 0
        if DROPOUT:
            seed = gl.load(Rng).to(gl.int64)
        return seed, stream0, row_off, col_off, thresh, scale

    @gluon.jit
    def _step_begin(it, total, n_m, m_first, off_b, off_hkv, GROUP, Sq, stats_len, Stats_b, q_desc, do_desc, q_smem,
                    do_smem, bars, qo_bytes: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                    stat_layout: gl.constexpr, SYNC: gl.constexpr):
        """What every dK/dV step starts with: prefetch step it + 1's Q and dO, load this query
        block's row statistics (in ``stat_layout``), wait for its Q and dO.  Returns (ring stage,
        first query row m0, query head, the rows, lse2, delta, Q and dO as (BLOCK_M, D) tiles)."""
        stage = it % 2
        m0 = (m_first + it % n_m) * BLOCK_M
        off_h = off_hkv * GROUP + it // n_m
        # The next step's Q and dO into the other stage (its last readers finished: every
        # step ends by waiting for its MMAs; with two warpgroups, a CTA barrier first, as the
        # load is issued by one thread and both read every stage).
        if SYNC:
            gl.thread_barrier()
        if it + 1 < total:
            nxt = it + 1
            nm0 = (m_first + nxt % n_m) * BLOCK_M
            nh = off_hkv * GROUP + nxt // n_m
            _load_pair(q_desc, do_desc, off_b, nm0, nh * HEAD_DIM, bars.index(1 - stage),
                       q_smem.index(1 - stage), do_smem.index(1 - stage), qo_bytes)
        # Row statistics of this query block (rows past Sq: lse2 = +inf, so P = 0).
        rows = m0 + gl.arange(0, BLOCK_M, stat_layout)
        stats = Stats_b + (off_h * 3).to(gl.int64) * stats_len
        lse2 = gl.load(stats + rows, mask=rows < Sq, other=float("inf"))
        delta = gl.load(stats + stats_len + rows, mask=rows < Sq, other=0.0)

        mbarrier.wait(bars.index(stage), phase=(it // 2) & 1)
        q_s = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        do_s = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        return stage, m0, off_h, rows, lse2, delta, q_s, do_s

    @gluon.jit
    def _add_dq(dq, it, m0, off_b, off_h, Sq, fused, q_layout: gl.constexpr, DQ_TMA: gl.constexpr):
        """Add a one-pass step's dQ tile ``dq`` (BLOCK_M, D) fp32 in ``q_layout``, times sm_scale,
        into the fp32 buffer (``fused``, as :func:`_dkdv_step`): ``DQ_TMA``, through the next of
        the (1, BLOCK_M, D) shared-memory tiles and one thread's TMA reduction (rows past Sq
        clipped by the descriptor; the caller has waited for that tile's last reduction), else by
        atomics from registers."""
        ds_smem, DQ_b, H, sm_scale, dq_desc, dq_smem = fused
        BLOCK_M: gl.constexpr = dq.shape[0]
        HEAD_DIM: gl.constexpr = dq.shape[1]
        if DQ_TMA:
            dq_s = dq_smem.index(it % dq_smem.shape[0])
            dq_s.reshape([BLOCK_M, HEAD_DIM]).store(dq * sm_scale)
            fence_async_shared()
            gl.thread_barrier()
            tma_add(dq_desc, [off_b, m0, off_h * HEAD_DIM], dq_s)
        else:
            q_rows = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, q_layout))
            cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, q_layout))
            offs = (q_rows[:, None].to(gl.int64) * H + off_h) * HEAD_DIM + cols[None, :]
            gl.atomic_add(DQ_b + offs, dq * sm_scale,
                          mask=(q_rows[:, None] < Sq) & (cols[None, :] < HEAD_DIM), sem="relaxed")

    @gluon.jit
    def _dkdv_step(it, total, n_m, m_first, off_b, off_hkv, GROUP, Sq, causal_offset, stats_len, qk_scale,
                   Stats_b, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, bars, keys, dk, dv, cap2, Alibi_b,
                   stride_ah, win_l, win_r, start_n, drop, fused,
                   qo_bytes: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   MASKED: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr,
                   DROPOUT: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr, col_layout: gl.constexpr,
                   SYNC: gl.constexpr, FUSED_DQ: gl.constexpr, DQ_TMA: gl.constexpr):
        """Step ``it`` of the dK/dV loop (query head ``it // n_m`` of the group, query block
        ``m_first + it % n_m``) with the score tiles transposed, keys as rows (S^T, dP^T:
        (BLOCK_N, BLOCK_M)): prefetch step it + 1's Q and dO, then the four matmuls.
        ``MASKED``: the block reaches above the causal diagonal (with ``WINDOW``: may reach out
        of the window).  ``SOFTCAP`` / ``ALIBI``: the forward's scores recomputed
        (``_gluon.variant_scores``), and dS through the cap's ``1 - tanh^2``.  ``DROPOUT``: ``drop`` =
        (seed, the query heads' first stream b * H, row offset, key offset, threshold, 1 / (1 - p)):
        dV takes the kept P, dS the kept dP times 1 / (1 - p) (dV is scaled once, at the end), with
        the forward's mask of the transposed tile (``_gluon.dropout_keep_mma_t``).  ``FUSED_DQ``:
        also this step's share of dQ, dQ_m += dS K sm_scale, added into the fp32 buffer by
        atomics; ``fused`` = (two shared-memory tiles for dS^T, the buffer's batch entry (Sq, H, D),
        H, sm_scale, the buffer's descriptor, its shared-memory tiles); dS^T goes through shared
        memory to be read transposed as the A operand.  ``DQ_TMA``: the dQ tile is added by a TMA
        reduction from one of the (1, BLOCK_M, D) fp32 tiles (else by atomics from registers)."""
        dtype: gl.constexpr = q_desc.dtype
        stage, m0, off_h, rows, lse2, delta, q_s, do_s = _step_begin(
            it, total, n_m, m_first, off_b, off_hkv, GROUP, Sq, stats_len, Stats_b, q_desc, do_desc, q_smem, do_smem,
            bars, qo_bytes, HEAD_DIM, BLOCK_M, col_layout, SYNC)
        s_t, dp_t = _two_products(k_smem, q_s, v_smem, do_s, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout))
        if ALIBI and not SOFTCAP:
            slope2 = gl.load(Alibi_b + off_h * stride_ah) * LOG2E_C
            left, one_sided = alibi_side(start_n, BLOCK_N, m0 + causal_offset, BLOCK_M)
            if one_sided:  # the separable bias, one FMA and one add per score
                p_t = alibi_separable_p(s_t, qk_scale, slope2, left, (keys - start_n)[:, None],
                                        (rows + (causal_offset - start_n))[None, :], lse2[None, :])
            else:
                x_t, t_t = variant_scores(s_t, qk_scale, cap2, slope2, (rows + causal_offset).to(gl.float32)[None, :],
                                          keys.to(gl.float32)[:, None], SOFTCAP, ALIBI)
                p_t = gl.exp2(x_t - lse2[None, :])
        elif SOFTCAP or ALIBI:
            slope2 = 0.0
            if ALIBI:
                slope2 = gl.load(Alibi_b + off_h * stride_ah) * LOG2E_C
            x_t, t_t = variant_scores(s_t, qk_scale, cap2, slope2, (rows + causal_offset).to(gl.float32)[None, :],
                                      keys.to(gl.float32)[:, None], SOFTCAP, ALIBI)
            p_t = gl.exp2(x_t - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        else:
            p_t = gl.exp2(s_t * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            diag = rows[None, :] + causal_offset
            if WINDOW:
                p_t = gl.where((keys[:, None] >= diag - win_l) & (keys[:, None] <= diag + win_r), p_t, 0.0)
            else:
                p_t = gl.where(keys[:, None] <= diag, p_t, 0.0)
        p_v = p_t
        if DROPOUT:
            seed, stream0, row_off, col_off, thresh, scale = drop
            row_ctr = ((stream0 + off_h).to(gl.int64) << 32) + row_off + m0
            keep_t = dropout_keep_mma_t(seed, row_ctr, start_n + col_off, thresh, BLOCK_N, BLOCK_M, s_layout)
            p_v = gl.where(keep_t, p_t, 0.0)
        dv = warpgroup_mma(gl.convert_layout(p_v.to(dtype), a_layout), do_s, dv, is_async=True)
        dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))
        if DROPOUT:
            dp_t = gl.where(keep_t, dp_t * scale, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # through c tanh(s / c): times 1 - tanh^2
            ds_t = ds_t * (1.0 - t_t * t_t)
        if FUSED_DQ:
            ds_smem, DQ_b, H, sm_scale, dq_desc, dq_smem = fused
            # dS^T (BLOCK_N, BLOCK_M) into one of two buffers (a warp storing into this one has
            # passed the step before's barrier, so every warp's matmuls of two steps ago are
            # done), the A operand of both dK (as it is) and dQ (transposed)
            ds_s = ds_smem.index(stage)
            ds_s.store(ds_t.to(dtype))
            fence_async_shared()
            if DQ_TMA:  # the TMA add that last read this step's dQ tile is done reading it (the
                # thread that issued it waits here; the barrier tells the others)
                tma.store_wait(dq_smem.shape[0] - 1)
            gl.thread_barrier()
            dk = warpgroup_mma(ds_s, q_s, dk, is_async=True)
            # (BLOCK_M, D); with two warpgroups (SYNC: 8 warps) each holds half of dQ's columns
            q_layout: gl.constexpr = _mma_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, 8 if SYNC else 4)[1]
            dq = warpgroup_mma(ds_s.permute((1, 0)), k_smem, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, q_layout),
                               use_acc=False, is_async=True)
            dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
            _add_dq(dq, it, m0, off_b, off_h, Sq, fused, q_layout, DQ_TMA)
        else:
            dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), a_layout), q_s, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        return dk, dv

    @gluon.jit
    def _probs_by_rows(s, qk_scale, cap2, slope2, rows, keys, start_n, row0, causal_offset, lse2,
                       SOFTCAP: gl.constexpr, ALIBI: gl.constexpr):
        """P = exp2(x - lse2) of a (ROWS, BLOCK_N) score tile ``s`` with queries as rows (``rows``
        from ``row0``, ``keys`` from ``start_n``), x the forward's log2-domain scores: plain, or
        with softcap / ALiBi recomputed (``_gluon.variant_scores``; ALiBi alone and one-sided,
        the separable bias, one FMA and one add per score).  Returns (P, tanh of the capped
        scores for dS, or a stand-in without ``SOFTCAP``); masks are the caller's."""
        ROWS: gl.constexpr = s.shape[0]
        BLOCK_N: gl.constexpr = s.shape[1]
        t = s
        if ALIBI and not SOFTCAP:
            left, one_sided = alibi_side(start_n, BLOCK_N, row0 + causal_offset, ROWS)
            if one_sided:
                p = alibi_separable_p(s, qk_scale, slope2, left, gl.arange(0, BLOCK_N, keys.type.layout)[None, :],
                                      (rows + (causal_offset - start_n))[:, None], lse2[:, None])
            else:
                x, t = variant_scores(s, qk_scale, cap2, slope2, (rows + causal_offset).to(gl.float32)[:, None],
                                      keys.to(gl.float32)[None, :], SOFTCAP, ALIBI)
                p = gl.exp2(x - lse2[:, None])
        elif SOFTCAP or ALIBI:
            x, t = variant_scores(s, qk_scale, cap2, slope2, (rows + causal_offset).to(gl.float32)[:, None],
                                  keys.to(gl.float32)[None, :], SOFTCAP, ALIBI)
            p = gl.exp2(x - lse2[:, None])
        else:
            p = gl.exp2(s * qk_scale - lse2[:, None])
        return p, t

    @gluon.jit
    def _dkdv_tile(q_desc, k_desc, v_desc, do_desc, Stats_b, DK, DV, off_b, off_hkv, start_n, H_KV, GROUP, Sq, Sk,
                   causal_offset, stats_len, qk_scale, sm_scale, cap2, alibi_b, stride_ah, win_l, win_r, drop, DQ_b,
                   dq_desc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr,
                   DROPOUT: gl.constexpr, num_warps: gl.constexpr, FUSED_DQ: gl.constexpr, DQ_TMA: gl.constexpr):
        """dK and dV of key rows [start_n, start_n + BLOCK_N) of K/V head ``off_hkv`` of batch
        entry ``off_b`` of the descriptors, every query head of its GQA group summed (the module
        docstring's loop); ``Stats_b``: the entry's row statistics, ``(H, 3, stats_len)``; DK and DV
        (.., Sk, H_KV, D) contiguous, keys past Sk not stored.  ``FUSED_DQ``: dQ too, added
        into ``DQ_b``, the batch entry's rows of an fp32 (.., Sq, H, D) buffer (by TMA reductions
        through ``dq_desc`` with ``DQ_TMA``, else atomics) (:func:`_dkdv_step`)."""
        # (BLOCK_N, BLOCK_M) score tiles, (BLOCK_N, D) accumulators
        s_layout: gl.constexpr = _dkdv_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[0]
        d_layout: gl.constexpr = _dkdv_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[1]
        a_layout: gl.constexpr = _dkdv_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[2]
        col_layout: gl.constexpr = _dkdv_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[3]
        row_layout: gl.constexpr = _dkdv_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[4]

        # Shared memory: K and V for the whole program, Q and dO in a two-stage ring.
        k_smem, v_smem, kv_bar, q_smem, do_smem, bars = _stage_tiles(
            k_desc, v_desc, q_desc, do_desc, off_b, start_n, off_hkv * HEAD_DIM, BLOCK_N, BLOCK_M, HEAD_DIM)

        # Query blocks that see any key of this block: causal (bottom-right by causal_offset)
        # starts at the block holding row start_n - causal_offset; a window (row r sees keys
        # [r + causal_offset - win_l, r + causal_offset + win_r]) spans rows [start_n -
        # causal_offset - win_r, start_n + BLOCK_N - 1 - causal_offset + win_l].
        m_first = 0
        m_end = gl.cdiv(Sq, BLOCK_M)
        if IS_CAUSAL:
            m_first = gl.maximum(start_n - causal_offset, 0) // BLOCK_M
        if WINDOW:
            m_first = gl.maximum(start_n - causal_offset - win_r, 0) // BLOCK_M
            m_end = gl.minimum(m_end, gl.cdiv(gl.maximum(start_n + BLOCK_N - causal_offset + win_l, 0), BLOCK_M))
        n_m = gl.maximum(m_end - m_first, 0)
        total = n_m * GROUP  # steps: (query head of the group, query block)
        qo_bytes: gl.constexpr = 2 * BLOCK_M * HEAD_DIM * 2
        ds_smem = k_smem  # dS^T's two tiles with FUSED_DQ (else stand-ins, never touched)
        dq_smem = q_smem
        if FUSED_DQ:
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], q_desc.dtype)
            ds_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
            if DQ_TMA:  # fp32 dQ tiles for the TMA adds: two while they fit (D=64: 32 KB)
                DQ_BUFS: gl.constexpr = 2 if HEAD_DIM <= 64 else 1
                dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, 1, BLOCK_M, HEAD_DIM], dq_desc.layout)
        fused = (ds_smem, DQ_b, H_KV * GROUP, sm_scale, dq_desc, dq_smem)

        # Step 0's Q and dO.
        if total > 0:
            _load_pair(q_desc, do_desc, off_b, m_first * BLOCK_M, off_hkv * GROUP * HEAD_DIM, bars.index(0),
                       q_smem.index(0), do_smem.index(0), qo_bytes)

        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        keys = start_n + gl.arange(0, BLOCK_N, row_layout)
        mbarrier.wait(kv_bar, phase=0)
        # Per query head: the blocks that reach above the causal diagonal (masked) first, then
        # the rest without a mask (a window masks every block).  ``it`` counts steps over both
        # loops (ring stage and phase).
        MASK_FIRST: gl.constexpr = IS_CAUSAL or WINDOW
        n_mask = n_m
        if IS_CAUSAL:
            n_mask = gl.minimum(gl.maximum(gl.cdiv(start_n + BLOCK_N - 1 - causal_offset - m_first * BLOCK_M,
                                                   BLOCK_M), 0), n_m)
        it = 0
        for _g in range(GROUP):
            for _ in range(n_mask):
                dk, dv = _dkdv_step(
                    it, total, n_m, m_first, off_b, off_hkv, GROUP, Sq, causal_offset, stats_len, qk_scale,
                    Stats_b, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, bars, keys, dk, dv, cap2, alibi_b,
                    stride_ah, win_l, win_r, start_n, drop, fused, qo_bytes, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_FIRST,
                    SOFTCAP, ALIBI, WINDOW, DROPOUT, s_layout, a_layout, col_layout, num_warps > 4, FUSED_DQ,
                    DQ_TMA)
                it += 1
            for _ in range(n_mask, n_m):
                dk, dv = _dkdv_step(
                    it, total, n_m, m_first, off_b, off_hkv, GROUP, Sq, causal_offset, stats_len, qk_scale,
                    Stats_b, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, bars, keys, dk, dv, cap2, alibi_b,
                    stride_ah, win_l, win_r, start_n, drop, fused, qo_bytes, HEAD_DIM, BLOCK_M, BLOCK_N, False,
                    SOFTCAP, ALIBI, WINDOW, DROPOUT, s_layout, a_layout, col_layout, num_warps > 4, FUSED_DQ,
                    DQ_TMA)
                it += 1

        _release(kv_bar, bars)
        if FUSED_DQ and DQ_TMA:  # the last TMA adds have read their tiles
            tma.store_wait(0)
        # dK, dV: (B, Sk, H_kv, D) contiguous; keys past Sk are not stored.
        store_rows(DK, dk * sm_scale, start_n, off_b, off_hkv, Sk, H_KV, d_layout)
        if DROPOUT:  # the kept P's 1 / (1 - p), once
            dv = dv * drop[5]
        store_rows(DV, dv, start_n, off_b, off_hkv, Sk, H_KV, d_layout)

    @gluon.jit
    def _dkdv_kernel(
        q_desc, k_desc, v_desc, do_desc, Stats, DK, DV,
        H, H_KV, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, sm_scale, cap2, Alibi, stride_ab, stride_ah,
        win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, DQacc, dq_desc,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr,
        SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr, DROPOUT: gl.constexpr,
        FUSED_DQ: gl.constexpr, DQ_TMA: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Program = one BLOCK_N-row key block of one K/V head of one batch entry
        (:func:`_dkdv_tile`); Stats (B * H, 3, stats_len); ``FUSED_DQ``: dQ too, added into
        ``DQacc``, fp32 (B, Sq, H, D) contiguous and zeroed (``DQ_TMA``: through ``dq_desc``, its
        :func:`descriptor_3d`)."""
        pid_bh = gl.program_id(1)
        off_b = pid_bh // H_KV
        _dkdv_tile(q_desc, k_desc, v_desc, do_desc, Stats + (off_b * H * 3).to(gl.int64) * stats_len, DK, DV, off_b,
                   pid_bh % H_KV, gl.program_id(0) * BLOCK_N, H_KV, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale,
                   sm_scale, cap2, Alibi + off_b * stride_ab, stride_ah, win_l, win_r,
                   _drop_args(Rng, off_b * H, drop_row_off, drop_col_off, drop_thresh, drop_scale, DROPOUT),
                   DQacc + (off_b * Sq * H).to(gl.int64) * HEAD_DIM, dq_desc, HEAD_DIM, BLOCK_M, BLOCK_N, IS_CAUSAL,
                   SOFTCAP, ALIBI, WINDOW, DROPOUT, num_warps, FUSED_DQ, DQ_TMA)

    @gluon.jit
    def _dq_kernel(
        q_desc, k_desc, v_desc, do_desc, Stats, DQ,
        H, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, sm_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """dQ of one query block: Q and dO stay in shared memory, K and V stream through a
        two-stage TMA ring:  S = Q K^T,  dP = dO V^T,  P = exp2(S * qk_scale - lse2),
        dS = P * (dP - delta),  dQ += dS K  (keys past Sk and, causal, above the diagonal
        masked: a key block may run into the next sequence's rows)."""
        dtype: gl.constexpr = q_desc.dtype
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        off_hkv = off_h // GROUP
        start_m = pid_m * BLOCK_M

        # (BLOCK_M, BLOCK_N) score tiles, (BLOCK_M, D) accumulator
        s_layout: gl.constexpr = _mma_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[0]
        d_layout: gl.constexpr = _mma_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[1]
        a_layout: gl.constexpr = _mma_layouts(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)[2]
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

        # Shared memory: Q and dO for the whole program, K and V in a two-stage ring.
        q_smem, do_smem, qo_bar, k_smem, v_smem, bars = _stage_tiles(
            q_desc, do_desc, k_desc, v_desc, off_b, start_m, off_h * HEAD_DIM, BLOCK_M, BLOCK_N, HEAD_DIM)

        # Key blocks this query block sees: causal stops after key start_m + BLOCK_M - 1 + offset.
        n_end = Sk
        if IS_CAUSAL:
            n_end = gl.minimum(n_end, gl.maximum(start_m + BLOCK_M + causal_offset, 0))
        total = gl.cdiv(n_end, BLOCK_N)
        kv_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * 2
        kv_col = off_hkv * HEAD_DIM
        if total > 0:
            _load_pair(k_desc, v_desc, off_b, 0, kv_col, bars.index(0), k_smem.index(0), v_smem.index(0), kv_bytes)

        rows = start_m + gl.arange(0, BLOCK_M, row_layout)
        stats = Stats + (pid_bh * 3).to(gl.int64) * stats_len
        lse2 = gl.load(stats + rows, mask=rows < Sq, other=float("inf"))
        delta = gl.load(stats + stats_len + rows, mask=rows < Sq, other=0.0)
        dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, d_layout)
        mbarrier.wait(qo_bar, phase=0)
        for it in range(total):
            stage = it % 2
            start_n = it * BLOCK_N
            if num_warps > 4:  # every warpgroup past step it - 1 before its stage refills
                gl.thread_barrier()
            if it + 1 < total:  # the next key block into the other stage
                _load_pair(k_desc, v_desc, off_b, start_n + BLOCK_N, kv_col, bars.index(1 - stage),
                           k_smem.index(1 - stage), v_smem.index(1 - stage), kv_bytes)
            mbarrier.wait(bars.index(stage), phase=(it // 2) & 1)
            k_s = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
            v_s = v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
            s, dp = _two_products(q_smem, k_s, do_smem, v_s, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout))
            keys = start_n + gl.arange(0, BLOCK_N, col_layout)
            ok = keys[None, :] < Sk
            if IS_CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None] + causal_offset)
            p = gl.where(ok, gl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
            ds = p * (dp - delta[:, None])
            dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k_s, dq, is_async=True)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))

        _release(qo_bar, bars)
        store_rows(DQ, dq * sm_scale, start_m, off_b, off_h, Sq, H, d_layout)


    @gluon.jit
    def _dq_consumer(wg, q_desc, do_desc, q_smem, do_smem, qo_bar, k_smem, v_smem, k_ready, v_ready, k_empty,
                     v_empty, Stats_b, DQ, first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk, causal_offset,
                     stats_len, qk_scale, sm_scale, start_m, cap2, Alibi_bh, win_l, win_r, Rng, drop_row0, drop_col,
                     drop_thresh, drop_scale, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr,
                     WINDOW: gl.constexpr, DROPOUT: gl.constexpr):
        """dQ of query rows [start_m + wg * ROWS, + ROWS) (one warpgroup; Q and dO in shared
        memory), over the K/V blocks j = first .. total - 1 the producer streams (the i-th in
        ring stage i % STAGES): per block, S_j = Q K_j^T, dP_j = dO V_j^T and the block before's
        dQ += dS K are issued together, and P_j = exp2(S_j qk_scale - lse2), dS_j = P_j (dP_j -
        delta) run under the last two.  Blocks outside [full_lo, full_hi) are masked (keys past
        Sk, causal, the window).  V_j is released after dP_j, K_j after its dQ matmul.
        ``SOFTCAP`` / ``ALIBI``: the forward's scores recomputed, dS through ``1 - tanh^2``.
        ``DROPOUT``: dP kept where the forward's mask keeps P (``_gluon.dropout_keep_mma``, rows from
        the row counter ``drop_row0`` of the program's row 0), times ``drop_scale``."""
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = _mma_layouts(ROWS, BLOCK_N, HEAD_DIM, 4)[0]
        d_layout: gl.constexpr = _mma_layouts(ROWS, BLOCK_N, HEAD_DIM, 4)[1]
        a_layout: gl.constexpr = _mma_layouts(ROWS, BLOCK_N, HEAD_DIM, 4)[2]
        row0 = start_m + wg * ROWS
        bar = qo_bar.index(wg)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, row0, off_h * HEAD_DIM], bar, q_smem.index(wg))
        tma.async_copy_global_to_shared(do_desc, [off_b, row0, off_h * HEAD_DIM], bar, do_smem.index(wg))
        rows = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
        stats = Stats_b + (off_h * 3).to(gl.int64) * stats_len
        lse2 = gl.load(stats + rows, mask=rows < Sq, other=float("inf"))
        delta = gl.load(stats + stats_len + rows, mask=rows < Sq, other=0.0)
        dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
        ds = gl.zeros([ROWS, BLOCK_N], dtype, a_layout)  # dS of the block before (none yet: 0)
        q_s = q_smem.index(wg).reshape([ROWS, HEAD_DIM])
        do_s = do_smem.index(wg).reshape([ROWS, HEAD_DIM])
        slope2 = 0.0
        if ALIBI:  # this head's slope, log2 domain
            slope2 = gl.load(Alibi_bh) * LOG2E_C
        seed = 0
        if DROPOUT:
            seed = gl.load(Rng).to(gl.int64)
        drop_row = drop_row0 + wg * ROWS
        mbarrier.wait(bar, phase=0)
        for i in range(total - first):
            j = first + i
            st = i % STAGES
            prev = gl.where(i > 0, (i + STAGES - 1) % STAGES, st)  # block j - 1's stage (i = 0: any loaded one)
            mbarrier.wait(k_ready.index(st), phase=(i // STAGES) & 1)
            mbarrier.wait(v_ready.index(st), phase=(i // STAGES) & 1)
            k_s = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM])
            v_s = v_smem.index(st).reshape([BLOCK_N, HEAD_DIM])
            zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
            s_tok = warpgroup_mma(q_s, k_s.permute((1, 0)), zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(do_s, v_s.permute((1, 0)), zero, use_acc=False, is_async=True)
            dq_tok = warpgroup_mma(ds, k_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok,))
            keys = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            p, t = _probs_by_rows(s, qk_scale, cap2, slope2, rows, keys, j * BLOCK_N, row0, causal_offset, lse2,
                                  SOFTCAP, ALIBI)  # (ROWS, BLOCK_N)
            if (j < full_lo) | (j >= full_hi):  # the causal diagonal, keys past Sk, the window's edges
                ok = keys[None, :] < Sk
                if IS_CAUSAL:
                    ok = ok & (keys[None, :] <= rows[:, None] + causal_offset)
                if WINDOW:
                    diag = rows[:, None] + causal_offset
                    ok = ok & (keys[None, :] >= diag - win_l) & (keys[None, :] <= diag + win_r)
                p = gl.where(ok, p, 0.0)
            dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok,))
            mbarrier.arrive(v_empty.index(st), count=1)
            if DROPOUT:
                keep = dropout_keep_mma(seed, drop_row, j * BLOCK_N + drop_col, drop_thresh, ROWS, BLOCK_N, s_layout)
                dp = gl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:  # through c tanh(s / c): times 1 - tanh^2
                ds = ds * (1.0 - t * t)
            ds = gl.convert_layout(ds.to(dtype), a_layout)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok,))
            if i > 0:
                mbarrier.arrive(k_empty.index(prev), count=1)
        if total > first:  # the last block's dQ += dS K
            dq = warpgroup_mma(ds, k_smem.index((total - first - 1) % STAGES).reshape([BLOCK_N, HEAD_DIM]), dq)
        store_rows(DQ, dq * sm_scale, row0, off_b, off_h, Sq, H, d_layout)

    @gluon.jit
    def _ws_dq_tile(q_desc, k_desc, v_desc, do_desc, Stats_b, DQ, off_b, off_h, start_m, H, GROUP, Sq, Sk,
                    causal_offset, stats_len, qk_scale, sm_scale, cap2, alibi_bh, win_l, win_r, Rng, drop_row0,
                    drop_col, drop_thresh, drop_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr,
                    DROPOUT: gl.constexpr):
        """dQ of query rows [start_m, start_m + BLOCK_M) of head ``off_h`` of batch entry ``off_b``
        of the descriptors, warp-specialized as the forward is (``gluon_fwd._attend_tile``): two
        consumer warpgroups (:func:`_dq_consumer`) own half of the rows each, one producer warp
        streams K and V (``_gluon.producer``).  ``Stats_b``: the entry's (H, 3, stats_len) row
        statistics; DQ (.., Sq, H, D) contiguous."""
        ROWS: gl.constexpr = BLOCK_M // 2
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], do_desc.layout)
        qo_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(qo_bar.index(i), count=1)
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = kv_ring(k_desc, v_desc, STAGES)
        fence_async_shared()
        first, total, full_lo, full_hi = tile_key_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M,
                                                         BLOCK_N, IS_CAUSAL, WINDOW)
        gl.warp_specialize(
            [(_dq_consumer, (0, q_desc, do_desc, q_smem, do_smem, qo_bar, k_smem, v_smem, k_ready, v_ready, k_empty,
                             v_empty, Stats_b, DQ, first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk,
                             causal_offset, stats_len, qk_scale, sm_scale, start_m, cap2, alibi_bh, win_l, win_r,
                             Rng, drop_row0, drop_col, drop_thresh, drop_scale, HEAD_DIM, ROWS, BLOCK_N, STAGES,
                             IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT)),
             (_dq_consumer, (1, q_desc, do_desc, q_smem, do_smem, qo_bar, k_smem, v_smem, k_ready, v_ready, k_empty,
                             v_empty, Stats_b, DQ, first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk,
                             causal_offset, stats_len, qk_scale, sm_scale, start_m, cap2, alibi_bh, win_l, win_r,
                             Rng, drop_row0, drop_col, drop_thresh, drop_scale, HEAD_DIM, ROWS, BLOCK_N, STAGES,
                             IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT)),
             (producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, first, total, off_b,
                          (off_h // GROUP) * HEAD_DIM, 0, BLOCK_N, STAGES))],
            [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _ws_dq_kernel(
        q_desc, k_desc, v_desc, do_desc, Stats, DQ,
        H, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, sm_scale, cap2, Alibi, stride_ab, stride_ah,
        win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr,
        DROPOUT: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Program = one BLOCK_M-row query tile of one head of one batch entry (:func:`_ws_dq_tile`);
        Stats (B * H, 3, stats_len)."""
        pid_bh = gl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        _ws_dq_tile(q_desc, k_desc, v_desc, do_desc, Stats + (off_b * H * 3).to(gl.int64) * stats_len, DQ, off_b,
                    off_h, gl.program_id(0) * BLOCK_M, H, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, sm_scale,
                    cap2, Alibi + off_b * stride_ab + off_h * stride_ah, win_l, win_r, Rng,
                    (pid_bh.to(gl.int64) << 32) + drop_row_off + gl.program_id(0) * BLOCK_M, drop_col_off,
                    drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW,
                    DROPOUT)


    @gluon.jit
    def _varlen_dkdv_kernel(
        Q, K, V, DO, Stats, DK, DV, CuQ, CuK, SeqUsedK, CuBlocks, CuStats, stride_qs, stride_ks, stride_vs,
        stride_dos, B, H_KV, GROUP, Tq, Tk, stats_len, qk_scale, sm_scale, cap2, Alibi, stride_ab, stride_ah,
        win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr,
        SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr, DROPOUT: gl.constexpr, LOG_B: gl.constexpr,
        HAS_SEQUSED: gl.constexpr, q_layout: gl.constexpr, kv_layout: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Varlen dK/dV: program (p, h_kv) = key block p of the work list ``CuBlocks`` (over
        cu_seqlens_k) for K/V head h_kv (:func:`_dkdv_tile`), through descriptors of its own
        sequence's rows (``_gluon.sequence_descriptor``: zeros past the sequence's end).  Stats
        (H, 3, stats_len) with sequence b's rows from ``16 * CuStats[b]`` (``varlen.seq_stats``);
        DK, DV (Tk, H_kv, D) contiguous; key blocks past seqused_k skip the work and store nothing."""
        off_hkv = gl.program_id(1)
        H = H_KV * GROUP
        b, q_start, len_q, k_start, len_k, start_n = varlen_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_N,
                                                                 LOG_B, HAS_SEQUSED)
        len_q = gl.where(start_n < len_k, len_q, 0)  # no query block for a key block past seqused_k
        q_box: gl.constexpr = [1, BLOCK_M, HEAD_DIM]
        kv_box: gl.constexpr = [1, BLOCK_N, HEAD_DIM]
        q_desc = sequence_descriptor(Q, q_start, stride_qs, len_q, H * HEAD_DIM, q_box, q_layout)
        do_desc = sequence_descriptor(DO, q_start, stride_dos, len_q, H * HEAD_DIM, q_box, q_layout)
        k_desc = sequence_descriptor(K, k_start, stride_ks, len_k, H_KV * HEAD_DIM, kv_box, kv_layout)
        v_desc = sequence_descriptor(V, k_start, stride_vs, len_k, H_KV * HEAD_DIM, kv_box, kv_layout)
        kv_base = k_start * (H_KV * HEAD_DIM)
        _dkdv_tile(q_desc, k_desc, v_desc, do_desc, Stats + gl.load(CuStats + b).to(gl.int64) * 16, DK + kv_base,
                   DV + kv_base, 0, off_hkv, start_n, H_KV, GROUP, len_q, len_k, len_k - len_q, stats_len, qk_scale,
                   sm_scale, cap2, Alibi + b * stride_ab, stride_ah, win_l, win_r,
                   _drop_args(Rng, b * H, drop_row_off, drop_col_off, drop_thresh, drop_scale, DROPOUT),
                   DK, q_desc, HEAD_DIM, BLOCK_M, BLOCK_N, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT, num_warps,
                   False, False)

    @gluon.jit
    def _varlen_ws_dq_kernel(
        Q, K, V, DO, Stats, DQ, CuQ, CuK, SeqUsedK, CuBlocks, CuStats, stride_qs, stride_ks, stride_vs,
        stride_dos, B, H, GROUP, Tq, Tk, stats_len, qk_scale, sm_scale, cap2, Alibi, stride_ab, stride_ah,
        win_l, win_r, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, WINDOW: gl.constexpr,
        DROPOUT: gl.constexpr, LOG_B: gl.constexpr, HAS_SEQUSED: gl.constexpr, q_layout: gl.constexpr, kv_layout: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Varlen dQ: program (p, h) = query block p of the work list ``CuBlocks`` (over
        cu_seqlens_q) for head h (:func:`_ws_dq_tile`), through its own sequence's descriptors;
        Stats as :func:`_varlen_dkdv_kernel`'s; DQ (Tq, H, D) contiguous."""
        off_h = gl.program_id(1)
        b, q_start, len_q, k_start, len_k, start_m = varlen_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_M,
                                                                 LOG_B, HAS_SEQUSED)
        q_box: gl.constexpr = [1, BLOCK_M // 2, HEAD_DIM]
        kv_box: gl.constexpr = [1, BLOCK_N, HEAD_DIM]
        width_kv = (H // GROUP) * HEAD_DIM
        q_desc = sequence_descriptor(Q, q_start, stride_qs, len_q, H * HEAD_DIM, q_box, q_layout)
        do_desc = sequence_descriptor(DO, q_start, stride_dos, len_q, H * HEAD_DIM, q_box, q_layout)
        k_desc = sequence_descriptor(K, k_start, stride_ks, len_k, width_kv, kv_box, kv_layout)
        v_desc = sequence_descriptor(V, k_start, stride_vs, len_k, width_kv, kv_box, kv_layout)
        _ws_dq_tile(q_desc, k_desc, v_desc, do_desc, Stats + gl.load(CuStats + b).to(gl.int64) * 16,
                    DQ + q_start * (H * HEAD_DIM), 0, off_h, start_m, H, GROUP, len_q, len_k, len_k - len_q,
                    stats_len, qk_scale, sm_scale, cap2, Alibi + b * stride_ab + off_h * stride_ah, win_l, win_r, Rng,
                    ((b * H + off_h).to(gl.int64) << 32) + drop_row_off + start_m, drop_col_off, drop_thresh,
                    drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW, DROPOUT)


def _variant_args(q: torch.Tensor, softmax_scale: float, causal: bool, softcap: float,
                  alibi_slopes: torch.Tensor | None, window_size: tuple[int, int], dropout_p: float = 0.0,
                  rng: torch.Tensor | None = None, drop_offsets: tuple[int, int] = (0, 0)) -> tuple[tuple, dict]:
    """The passes' scalar arguments from ``qk_scale`` on and their compile-time flags:
    ``((qk_scale, sm_scale, cap2, Alibi, stride_ab, stride_ah, win_l, win_r, Rng, drop_row_off,
    drop_col_off, drop_thresh, drop_scale), flags)`` (the forward's scales, ``_common.qk_scale``;
    causal folds into a bounded window, ``_common.window_args``; dropout as
    ``_common.dropout_args``, without the scale's low half)."""
    qk_scale, _, cap2, _ = _common.qk_scale(softmax_scale, softcap)
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    flags = dict(IS_CAUSAL=causal, SOFTCAP=bool(softcap), ALIBI=alibi_slopes is not None, WINDOW=window,
                 DROPOUT=bool(dropout_p))
    return (qk_scale, softmax_scale, cap2, *_common.alibi_args(alibi_slopes, q), win_l, win_r,
            *_common.dropout_args(dropout_p, rng, q, drop_offsets)[:5]), flags


def dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, stats: torch.Tensor,
       dq_out: torch.Tensor, softmax_scale: float, causal: bool, causal_offset: int,
       config: tuple[int, ...] | None = None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
       window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, rng: torch.Tensor | None = None,
       drop_offsets: tuple[int, int] = (0, 0)) -> None:
    """Fill ``dq_out`` (B, Sq, H, D) contiguous (callers check :func:`supported` first).
    ``config``: (BLOCK_M, BLOCK_N, num_warps) runs :func:`_dq_kernel` (no variants: callers
    check :func:`dq_takes`); (BLOCK_M, BLOCK_N, stages, "ws") the warp-specialized
    :func:`_ws_dq_kernel`.  ``softcap``, ``alibi_slopes`` and ``window_size`` as the forward had them."""
    b, sq, h, d = q.shape
    config = config or DQ_CONFIGS[d]
    sk, h_kv = k.shape[1], k.shape[2]
    if config[-1] == "ws":
        block_m, block_n, stages, _ = config
        scalars, flags = _variant_args(q, softmax_scale, causal, softcap, alibi_slopes, window_size, dropout_p,
                                       rng, drop_offsets)
        _ws_dq_kernel[(cdiv(sq, block_m), b * h)](
            descriptor_3d(q, block_m // 2), descriptor_3d(k, block_n), descriptor_3d(v, block_n),
            descriptor_3d(dout, block_m // 2), stats, dq_out, h, h // h_kv, sq, sk, causal_offset,
            stats.shape[-1], *scalars,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=4, **flags,
        )
        return
    args = (stats, dq_out, h, h // h_kv, sq, sk, causal_offset, stats.shape[-1], softmax_scale * LOG2E,
            softmax_scale)
    block_m, block_n, num_warps = config
    _dq_kernel[(cdiv(sq, block_m), b * h)](
        descriptor_3d(q, block_m), descriptor_3d(k, block_n), descriptor_3d(v, block_n), descriptor_3d(dout, block_m),
        *args, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=causal, num_warps=num_warps,
    )


def dq_takes(d: int, variants: bool) -> bool:
    """Whether the Gluon dQ pass runs at head dim ``d`` (after :func:`supported`): the
    warp-specialized pass takes softcap, ALiBi and windows, the plain one (D=256) none."""
    return d in DQ_HEAD_DIMS and (not variants or DQ_CONFIGS[d][-1] == "ws")


def dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, stats: torch.Tensor,
         dk: torch.Tensor, dv: torch.Tensor, softmax_scale: float, causal: bool, causal_offset: int,
         config: tuple[int, ...] | None = None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
         window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, rng: torch.Tensor | None = None,
         drop_offsets: tuple[int, int] = (0, 0), dq_acc: torch.Tensor | None = None) -> None:
    """Fill ``dk``/``dv`` (B, Sk, H_kv, D) contiguous from the statistics of
    ``_common.bwd_preprocess`` (callers check :func:`supported` first).  ``config``: (BLOCK_M,
    BLOCK_N, num_warps) of :func:`_dkdv_kernel`.  ``dq_acc``: a zeroed fp32 (B, Sq, H,
    D) buffer that also receives dQ, by TMA reductions or atomics (:data:`FUSED_DQ_TMA`; then
    :data:`FUSED_DKDV_CONFIGS` by default; callers check :func:`fused_dq_takes`)."""
    b, sq, h, d = q.shape
    block_m, block_n, num_warps = config or (DKDV_CONFIGS if dq_acc is None else FUSED_DKDV_CONFIGS)[d]
    sk, h_kv = k.shape[1], k.shape[2]
    scalars, flags = _variant_args(q, softmax_scale, causal, softcap, alibi_slopes, window_size, dropout_p, rng,
                                   drop_offsets)
    q_desc = descriptor_3d(q, block_m)
    dq_tma = dq_acc is not None and FUSED_DQ_TMA
    _dkdv_kernel[(cdiv(sk, block_n), b * h_kv)](
        q_desc, descriptor_3d(k, block_n), descriptor_3d(v, block_n), descriptor_3d(dout, block_m),
        stats, dk, dv, h, h_kv, h // h_kv, sq, sk, causal_offset, stats.shape[-1], *scalars,
        dk if dq_acc is None else dq_acc, descriptor_3d(dq_acc, block_m) if dq_tma else q_desc, HEAD_DIM=d,
        BLOCK_M=block_m, BLOCK_N=block_n, FUSED_DQ=dq_acc is not None, DQ_TMA=dq_tma, num_warps=num_warps, **flags,
    )


def fused_dq_takes(d: int, deterministic: bool = False) -> bool:
    """Whether the dK/dV pass also computes dQ (added up in fp32, in place of the dQ pass) at head dim
    ``d`` (after :func:`supported`): with :data:`FUSED_DQ`, at :data:`FUSED_DQ_HEAD_DIMS`, unless
    the call (``deterministic``) or ``torch.use_deterministic_algorithms(True)`` asks for bitwise
    reproducible gradients."""
    return (FUSED_DQ and d in FUSED_DQ_HEAD_DIMS and not deterministic
            and not torch.are_deterministic_algorithms_enabled())


def varlen_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, variants: bool) -> bool:
    """Whether the varlen dK/dV pass (:func:`varlen_dkdv`) can run this packed call: q and dout
    (Tq, H, D), k/v (Tk, H_kv, D), each with (H, D) dense and 16-byte aligned rows (any row
    stride); ``variants``: dropout or a variant only the portable kernels take."""
    if not (HAVE_GLUON and ENABLED and VARLEN) or variants or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    for t in (q, k, v, dout):
        _, h, d = t.shape
        if t.stride()[1:] != (d, 1) or t.stride(0) % 8 or t.data_ptr() % 16 or t.dtype != q.dtype:
            return False
    return q.numel() > 0 and k.numel() > 0


def varlen_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, stats: torch.Tensor,
                cu_stats: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, launch_meta: tuple,
                cu_blocks: torch.Tensor, softmax_scale: float, causal: bool, softcap: float = 0.0,
                alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                dropout_p: float = 0.0, rng: torch.Tensor | None = None) -> None:
    """Fill ``dk``/``dv`` (Tk, H_kv, D), contiguous and zero where no key block stores, from the
    packed statistics of ``varlen._varlen_preprocess`` (``stats``, ``cu_stats``);
    ``launch_meta`` as ``gluon_fwd.varlen_forward`` takes it, ``cu_blocks``: the key-block work
    list (``varlen.work_list`` over cu_seqlens_k) for BLOCK_N = :func:`varlen_blocks` ``[0]``."""
    tq, h, d = q.shape
    tk, h_kv = k.shape[0], k.shape[1]
    block_m, block_n, num_warps = DKDV_CONFIGS[d]
    scalars, flags = _variant_args(q, softmax_scale, causal, softcap, alibi_slopes, window_size, dropout_p, rng)
    meta, b, meta_flags = launch_meta
    set_scratch_allocator()
    _varlen_dkdv_kernel[(cdiv(tk, block_n) + b, h_kv)](
        q, k, v, dout, stats, dk, dv, *meta, cu_blocks, cu_stats, q.stride(0), k.stride(0), v.stride(0),
        dout.stride(0), b, h_kv, h // h_kv, tq, tk, stats.shape[-1], *scalars, HEAD_DIM=d, BLOCK_M=block_m,
        BLOCK_N=block_n, q_layout=shared_layout_3d(q, block_m), kv_layout=shared_layout_3d(k, block_n),
        num_warps=num_warps, **flags, **meta_flags,
    )


def varlen_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, stats: torch.Tensor,
              cu_stats: torch.Tensor, dq_out: torch.Tensor, launch_meta: tuple, cu_blocks: torch.Tensor,
              softmax_scale: float, causal: bool, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
              window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
              rng: torch.Tensor | None = None) -> None:
    """Fill ``dq_out`` (Tq, H, D) contiguous with the warp-specialized dQ pass (head dims whose
    :data:`DQ_CONFIGS` entry is "ws"; callers check :func:`varlen_dq_takes`); ``cu_blocks``: the
    query-block work list for BLOCK_M = :func:`varlen_blocks` ``[1]``; the rest as :func:`varlen_dkdv`."""
    tq, h, d = q.shape
    tk, h_kv = k.shape[0], k.shape[1]
    block_m, block_n, stages, _ = DQ_CONFIGS[d]
    scalars, flags = _variant_args(q, softmax_scale, causal, softcap, alibi_slopes, window_size, dropout_p, rng)
    meta, b, meta_flags = launch_meta
    set_scratch_allocator()
    _varlen_ws_dq_kernel[(cdiv(tq, block_m) + b, h)](
        q, k, v, dout, stats, dq_out, *meta, cu_blocks, cu_stats, q.stride(0), k.stride(0), v.stride(0),
        dout.stride(0), b, h, h // h_kv, tq, tk, stats.shape[-1], *scalars, HEAD_DIM=d, BLOCK_M=block_m,
        BLOCK_N=block_n, STAGES=stages, q_layout=shared_layout_3d(q, block_m // 2),
        kv_layout=shared_layout_3d(k, block_n), num_warps=4, **flags, **meta_flags,
    )


def varlen_dq_takes(d: int) -> bool:
    """Whether the varlen dQ pass runs in Gluon at head dim ``d`` (after :func:`varlen_supported`;
    the warp-specialized pass only: at D=256 the portable varlen dQ runs)."""
    return d in DQ_HEAD_DIMS and DQ_CONFIGS[d][-1] == "ws"


def varlen_blocks(d: int) -> tuple[int, int]:
    """(key rows per dK/dV program, query rows per dQ program) of the varlen passes at head dim ``d``."""
    return DKDV_CONFIGS[d][1], DQ_CONFIGS[d][0]


def dropout_takes(d: int) -> bool:
    """Whether the Gluon passes take dropout at head dim ``d``: with :data:`DROPOUT`, where both
    passes use one-warpgroup score tiles (the mask is built in that layout: dK/dV on 4 warps with
    keys as rows, the warp-specialized dQ), i.e. D=64 and 128."""
    return DROPOUT and DKDV_CONFIGS.get(d, (0, 0, 0))[2] == 4 and d in DQ_HEAD_DIMS and DQ_CONFIGS[d][-1] == "ws"
