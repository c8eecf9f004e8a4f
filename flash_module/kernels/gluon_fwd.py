"""The FA2 forward for Hopper (sm_90) in Gluon, warp-specialized: a TMA producer warp and two
consumer warpgroups, each overlapping its softmax with its own P V matmul.

The algorithm is ``fa2_fwd._fa2_fwd_kernel``'s (FA2's Algorithm 1); what changes is who does
what, and in which order.  A program owns a BLOCK_M-row query tile:

* the **producer** (one warp, 24 registers) streams K and V blocks into a ring of ``STAGES``
  shared-memory stages with TMA, each stage refilled as soon as both consumers have released it
  (``*_ready``: the TMA transaction landed; ``*_empty``: two arrivals, one per consumer; K and V
  have barriers of their own, as K is done with one step before V);
* each **consumer** (a warpgroup, 240 registers) owns half of the tile's rows and runs the loop
  with its two matmuls issued together, so that the exponentials of one key block run while
  the tensor cores work on the P V of the block before (FlashAttention-3's intra-warpgroup
  overlap), and the two consumers, not tied by any barrier, drift so that one's softmax runs
  under the other's matmuls:

    S_0 = Q K_0^T;  (m, l, P_0) = softmax step
    for j = 1 .. T-1:
        issue S_j = Q K_j^T                  (ROWS, BLOCK_N)  async wgmma, smem x smem
        issue O  += P_{j-1} V_{j-1}          (ROWS, D)        async wgmma, P from registers
        wait S_j; release K_j;  m_j = max(m, rowmax S_j);  P_j = exp2(S_j - m_j);  l = l alpha + rowsum P_j
        wait O;   release V_{j-1};  O *= alpha = exp2(m_{j-1} - m_j)
    O += P_{T-1} V_{T-1};  O /= l;  lse = (m + log2 l) ln 2

Scores are in the log2 domain (``qk_scale`` = softmax_scale * log2 e; the running max is taken on
the raw scores and scaled per row, so P costs one FMA and one exp2 per score).  Key blocks that
every row of the tile sees, inside Sk, run without a mask; the causal diagonal and the ragged
end of Sk run the masked step; each consumer narrows this to its own rows where a block is no
wider than them (causal or windowed; :func:`_consumer`).  Q, K and V are read through 3-D TMA
descriptors (batch, sequence, heads * D): rows past a sequence's end are zero-filled by the TMA
unit, never the next sequence's, so a NaN in one batch entry cannot reach another.

With :data:`PERSISTENT` (the default) dense calls run :func:`_persistent_fwd_kernel`: one program
per SM walks its tiles (:func:`_tile_of`) with one set-up, the ring and the Q barriers running
on from tile to tile, so a tile's first loads and its Q overlap the tile before's last P V and
epilogue.

Scope: fp16/bf16, head dims in :data:`FWD_CONFIGS`, softmax_scale > 0, (B, S, H, D) inputs dense
in (S, H, D) (:func:`supported`); no mask; dropout with :data:`DROPOUT` (the portable kernels'
mask, ``_gluon.dropout_keep_mma``); softcap, ALiBi, attention sinks and sliding
windows (key blocks outside the window skipped, ``_gluon.window_blocks``) unless
:data:`VARIANTS` is off.  No interpreter (Gluon has none): CI runs the portable kernel.

Packed sequences (varlen, :func:`varlen_forward`): the same tile body (:func:`_attend_tile`) run
by a work list over the sequences' query blocks, as ``varlen._varlen_fwd_kernel``'s; each program
builds TMA descriptors of its own sequence's rows on the device
(``_gluon.sequence_descriptor``), so a tile past the sequence's end reads zeros here too.  A
paged cache takes the portable varlen kernel.
"""

from __future__ import annotations

import os

import torch

from .._runtime import cdiv
from . import _common
from ._gluon import CONSUMER_REGS, HAVE_GLUON, LOG2E_C, descriptor_3d, set_scratch_allocator, shared_layout_3d

if HAVE_GLUON:
    from ._gluon import (
        dropout_keep_mma,
        fence_async_shared,
        gl,
        gluon,
        kv_ring,
        mbarrier,
        pass_blocks,
        producer,
        sequence_descriptor,
        store_rows,
        tanh_approx,
        tile_key_blocks,
        tma,
        variant_scores,
        varlen_item,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

#: (BLOCK_M, BLOCK_N, stages) per head dim; the Gluon forward runs at these head dims only.
#: Shared memory holds Q and ``stages`` K and V blocks (D=128: 32 + 3 x 64 KiB).  On an H200
#: (bf16, performance.md twelfth session): D=128 0.99-1.05x cuDNN at N >= 4k, D=256 0.99-1.07x,
#: D=64 0.95-0.97x (1.13-1.25x the portable kernel at every shape but D=64 at 1k).
FWD_CONFIGS = {64: (128, 128, 2), 128: (128, 128, 3), 256: (128, 64, 2)}
#: At D=64 the portable kernel is faster for short keys when causal or windowed (H200, bf16, 1k
#: causal: 294 against 234 TFLOP/s, 275 at (128, 64, 3); even at 2k); without a mask the Gluon
#: forward wins from 512 keys on (+4% at 512, +16% at 1k, +20% at 2k; performance.md
#: twenty-first session), so the rule binds masked calls only.
D64_MIN_KEYS = 2048
#: Causal calls with at most this many keys take :data:`SHORT_CAUSAL_CONFIGS` at their head dim:
#: short causal tiles are mostly diagonal, and with BLOCK_N = 64 = the rows of one consumer the
#: diagonal's last block is skipped by consumer 0 and its first needs no mask in consumer 1
#: (:func:`_consumer`).  H200, bf16, D=128 causal: 1k 335.6 -> 364.6 TFLOP/s; 2k 446.4 against
#: 437.3, 4k 519.7 against 472.9 (the default wins from 2k on).
SHORT_CAUSAL_KEYS = 1024
SHORT_CAUSAL_CONFIGS = {128: (128, 64, 3)}
#: Whether softcap, ALiBi, attention sinks and sliding windows run in the Gluon forward too (else
#: those calls take the portable kernel; ``FLASH_MODULE_GLUON_VARIANTS=0``).  H100, bf16, B=2,
#: N=8k, D=128 (performance.md, thirteenth session), forward TFLOP/s portable -> Gluon: softcap
#: 411 -> 532, ALiBi 448 -> 598, sink 478 -> 686; a 4k window over 64k causal keys 7.96x faster
#: than full causal.
VARIANTS = os.environ.get("FLASH_MODULE_GLUON_VARIANTS", "1") != "0"
#: Whether dropout runs in the Gluon forward (``FLASH_MODULE_GLUON_DROPOUT=0``: the portable
#: kernel takes it).  The mask (``_gluon.dropout_keep_mma``) is the portable kernels' bit for bit.
DROPOUT = os.environ.get("FLASH_MODULE_GLUON_DROPOUT", "1") != "0"
#: Whether the dense forward runs persistent (``FLASH_MODULE_GLUON_PERSISTENT=0`` turns it off): one
#: program per SM walks the query tiles (:func:`_persistent_fwd_kernel`), so a tile's loads overlap
#: the one before's epilogue.  On an H200 (bf16, performance.md sixteenth session): +4-7% at 1k
#: (D=128), +5-11% at D=256 1k, +1-5% at 2k-8k, equal within noise at 16k; the same bits as the
#: one-tile kernel.  Its tiles are assigned statically, so a program that starts late (its SM busy
#: with a kernel on another stream: NCCL's under ring attention or FSDP) would delay the whole
#: kernel by that long; under the ring's NCCL kernels (2x H200, 16k per GPU, seventeenth session)
#: the ring step took as long as with one-tile programs (43.51 / 43.44 ms non-causal, 24.67 / 24.15
#: causal), so it is the default.  A tile counter taken with atomics (dynamic assignment) would
#: remove the risk altogether.
PERSISTENT = os.environ.get("FLASH_MODULE_GLUON_PERSISTENT", "1") == "1"
#: The persistent kernel's program count (None: one per SM; tests set a few, so that every
#: program walks many tiles).
PROGRAMS: int | None = None
#: ``FLASH_MODULE_GLUON_FWD=0`` turns the Gluon forward off (the portable kernel runs).
ENABLED = os.environ.get("FLASH_MODULE_GLUON_FWD", "1") != "0"
#: Whether packed (varlen) calls run the Gluon forward too (``FLASH_MODULE_GLUON_VARLEN=0``: the
#: portable varlen kernel).
VARLEN = os.environ.get("FLASH_MODULE_GLUON_VARLEN", "1") != "0"


def config_for(d: int, causal: bool, sk: int) -> tuple[int, int, int]:
    """The dense forward's (BLOCK_M, BLOCK_N, stages) at head dim ``d`` (one of
    :data:`FWD_CONFIGS`) for ``sk`` keys; ``causal``: plain causal, no window."""
    if causal and sk <= SHORT_CAUSAL_KEYS and d in SHORT_CAUSAL_CONFIGS:
        return SHORT_CAUSAL_CONFIGS[d]
    return FWD_CONFIGS[d]


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variants: bool, masked: bool = True) -> bool:
    """Whether the Gluon forward can run this call (shapes, dtypes, strides and the GPU only);
    ``variants``: the call has a variant, an explicit launch config or a softmax scale <= 0
    (the running max is taken before scaling), which only the portable kernel takes;
    ``masked``: the call is causal or windowed (:data:`D64_MIN_KEYS` applies)."""
    if not (HAVE_GLUON and ENABLED) or variants or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in FWD_CONFIGS:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.shape[-1] == 64 and masked and k.shape[1] < D64_MIN_KEYS:
        return False
    for t in (q, k, v):  # (B, S, H, D) dense in (S, H, D); TMA needs 16-byte strides and base
        _, s, h, d = t.shape
        if t.stride()[1:] != (h * d, d, 1) or t.stride(0) % 8 or t.data_ptr() % 16 or t.dtype != q.dtype:
            return False
    return q.numel() > 0 and k.shape[1] > 0


if HAVE_GLUON:

    @gluon.jit
    def _softmax_step(s, m_i, l_i, rows, keys, Sk, causal_offset, qk_scale, cap2, slope2, win_l, win_r,
                      MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr,
                      WINDOW: gl.constexpr):
        """The online-softmax update for one (BLOCK_M, BLOCK_N) score tile: returns P (fp32),
        alpha (the old accumulator's scale), and the new running max and sum.  ``MASKED``:
        keys past Sk and, causal, above the diagonal get P = 0 (a row that has seen no key
        keeps m = -inf and l = 0).  ``SOFTCAP``: scores ``cap2 tanh(s qk_scale)`` (qk_scale =
        softmax_scale / c, cap2 = c log2 e); ``ALIBI``: minus ``slope2 |row + causal_offset -
        key|`` (slope2 = slope log2 e), as ``_common.cap`` / ``_common.alibi``; ``WINDOW``: the
        mask also keeps keys inside [row + causal_offset - win_l, row + causal_offset + win_r]."""
        if MASKED:
            ok = keys[None, :] < Sk
            if IS_CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None] + causal_offset)
            if WINDOW:
                diag = rows[:, None] + causal_offset
                ok = ok & (keys[None, :] >= diag - win_l) & (keys[None, :] <= diag + win_r)
        # The row max is taken on scores in a unit that still needs one positive scale per row
        # (``shift``), so that P costs one FMA and one exp2 per score: the raw scores (scale
        # qk_scale), softcap's t = tanh(s qk_scale) (scale cap2; one multiply per score less
        # than scaling t first: +2% on an H200, performance.md fourteenth session).  ALiBi's
        # scores are in log2 units (scale 1): folding its bias into the raw scores' unit was
        # 1-2% slower there.
        if SOFTCAP and not ALIBI:
            x = tanh_approx(s * qk_scale)
            shift = cap2
        elif SOFTCAP or ALIBI:
            x, _ = variant_scores(s, qk_scale, cap2, slope2, (rows + causal_offset).to(gl.float32)[:, None],
                                  keys.to(gl.float32)[None, :], SOFTCAP, ALIBI)
            shift = 1.0
        else:
            x = s
            shift = qk_scale
        if MASKED:
            x = gl.where(ok, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, 1) * shift)
        m_sub = m_new
        if MASKED:  # a row with no key yet: subtract 0, not -inf (P = 0, alpha = 0), keep m = -inf
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_sub)
        p = gl.exp2(x * shift - m_sub[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _store_out(o, m_i, l_i, row0, rows, Out, Lse_row, off_b, off_h, H, Sq, o_layout: gl.constexpr):
        """The epilogue: O = acc / l (0 where a row saw no key) into the contiguous (B, Sq, H, D)
        output, lse = (m + log2 l) ln 2 (-inf there) into the row of Sq values at ``Lse_row``;
        rows past Sq are not stored."""
        seen = l_i > 0
        l_safe = gl.where(seen, l_i, 1.0)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o = o / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        store_rows(Out, o, row0, off_b, off_h, Sq, H, o_layout)
        gl.store(Lse_row + rows, lse, mask=rows < Sq)

    @gluon.jit
    def _dropped(p, seed, drop_row, start_n, drop_thresh, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                 s_layout: gl.constexpr, DROPOUT: gl.constexpr):
        """P as the P V matmul takes it: with ``DROPOUT``, zero where the mask of rows ``drop_row``..
        and keys ``start_n``.. drops it (``_gluon.dropout_keep_mma``, the portable kernels' bits)."""
        if DROPOUT:
            p = gl.where(dropout_keep_mma(seed, drop_row, start_n, drop_thresh, ROWS, BLOCK_N, s_layout), p, 0.0)
        return p

    @gluon.jit
    def _load_q(q_desc, q_buf, bar, off_b, row0, off_h, pred):
        """TMA: rows row0 .. of head ``off_h`` of batch entry ``off_b`` into ``q_buf``, landing on ``bar``."""
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(bar, q_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(q_desc, [off_b, row0, off_h * HEAD_DIM], bar, q_buf, pred=pred)

    @gluon.jit
    def _consumer(wg, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out, Lse_row,
                  first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk, causal_offset, win_l, win_r, qk_scale,
                  start_m, cap2, Alibi_bh, Sink, Rng, drop_row0, drop_col, drop_thresh, drop_scale,
                  c0, q_phase, next_k, n_m, n_tiles,
                  HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr,
                  SINK: gl.constexpr, WINDOW: gl.constexpr, DROPOUT: gl.constexpr, PERSISTENT: gl.constexpr):
        """One warpgroup: query rows [start_m + wg * ROWS, + ROWS) against every K/V block of
        the tile, key blocks first .. total - 1 (its own Q load, then the loop of the module
        docstring; blocks outside [full_lo, full_hi) masked), releasing each K stage after its S
        and each V stage after its P V; then its own O and LSE.  ``DROPOUT``: the P V matmuls take
        P with the dropped probabilities zeroed (:func:`_dropped`), the row sums keep them, and O is
        scaled by ``drop_scale`` = 1 / (1 - p) at the end; ``drop_row0`` is the row counter of the
        program's row 0 (``_common.dropout_keep``), ``drop_col`` the keys' offset in the mask.
        ``c0``: the ring position of the tile's first key block (blocks the program's earlier
        tiles took), ``q_phase``: the Q barrier's phase for this tile.  ``PERSISTENT``: this
        tile's Q was loaded before (the first tile's by :func:`_persistent_consumer`, the others'
        by the tile before); once the last S is done, Q's buffer takes the rows of the program's
        next tile (its ``next_k``-th, :func:`_tile_of`, if there is one), so that load runs
        under this tile's last P V and epilogue."""
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row0 = start_m + wg * ROWS
        q_buf = q_smem.index(wg)
        if not PERSISTENT:
            _load_q(q_desc, q_buf, q_bar.index(wg), off_b, row0, off_h, True)
        rows = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        p = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        q_s = q_buf.reshape([ROWS, HEAD_DIM])
        slope2 = 0.0
        if ALIBI:  # this head's slope, log2 domain
            slope2 = gl.load(Alibi_bh) * LOG2E_C
        seed = 0
        if DROPOUT:
            seed = gl.load(Rng).to(gl.int64)
        drop_row = drop_row0 + wg * ROWS
        # This warpgroup's own blocks, from its ROWS rows: at a causal or windowed tile's edges
        # a block may hold no key any of them sees (causal at BLOCK_N = ROWS: the diagonal's last
        # block, for consumer 0) -- it is passed on unread, still waited for and released, since
        # the ring counts both consumers' arrivals -- and blocks all its rows see whole need no
        # mask.  (Causal with BLOCK_N = 2 ROWS, an aligned diagonal gives neither.)
        OWN_BLOCKS: gl.constexpr = WINDOW or (IS_CAUSAL and BLOCK_N <= ROWS)
        tile_end = c0 + total - first
        if OWN_BLOCKS:
            own_first, own_total, full_lo, full_hi = tile_key_blocks(row0, Sk, causal_offset, win_l, win_r, ROWS,
                                                                     BLOCK_N, IS_CAUSAL, WINDOW)
            own_first = gl.minimum(gl.maximum(own_first, first), total)
            own_total = gl.maximum(gl.minimum(own_total, total), own_first)
            pass_blocks(k_ready, v_ready, k_empty, v_empty, c0, c0 + own_first - first, STAGES)
            c0 = c0 + own_first - first
            first = own_first
            total = own_total
        mbarrier.wait(q_bar.index(wg), phase=q_phase)
        if total > first:
            mbarrier.wait(k_ready.index(c0 % STAGES), phase=(c0 // STAGES) & 1)
            k_s = k_smem.index(c0 % STAGES).reshape([BLOCK_N, HEAD_DIM])
            s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                              use_acc=False)
            mbarrier.arrive(k_empty.index(c0 % STAGES), count=1)
            keys = first * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, rows, keys, Sk, causal_offset, qk_scale, cap2, slope2, win_l,
                                                   win_r, True, IS_CAUSAL, SOFTCAP, ALIBI, WINDOW)
            p = _dropped(p, seed, drop_row, first * BLOCK_N + drop_col, drop_thresh, ROWS, BLOCK_N, s_layout, DROPOUT)
        for i in range(1, total - first):  # block j = first + i, the i-th of the ring
            j = first + i
            ks = (c0 + i) % STAGES
            vs = (c0 + i - 1) % STAGES
            mbarrier.wait(k_ready.index(ks), phase=((c0 + i) // STAGES) & 1)
            mbarrier.wait(v_ready.index(vs), phase=((c0 + i - 1) // STAGES) & 1)
            k_s = k_smem.index(ks).reshape([BLOCK_N, HEAD_DIM])
            s_tok = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                                  use_acc=False, is_async=True)
            v_s = v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM])
            o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_s, o, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(ks), count=1)
            keys = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            if (j >= full_lo) & (j < full_hi):
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, rows, keys, Sk, causal_offset, qk_scale, cap2,
                                                   slope2, win_l, win_r, False, IS_CAUSAL, SOFTCAP, ALIBI,
                                                   WINDOW)
            else:
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, rows, keys, Sk, causal_offset, qk_scale, cap2,
                                                   slope2, win_l, win_r, True, IS_CAUSAL, SOFTCAP, ALIBI,
                                                   WINDOW)
            p = _dropped(p, seed, drop_row, j * BLOCK_N + drop_col, drop_thresh, ROWS, BLOCK_N, s_layout, DROPOUT)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
            mbarrier.arrive(v_empty.index(vs), count=1)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        if PERSISTENT:  # no matmul reads Q any more: the next tile's rows can land
            next_m, next_b, next_h, next_bh, has_next = _tile_of(next_k, n_m, n_tiles, H, IS_CAUSAL)
            _load_q(q_desc, q_buf, q_bar.index(wg), next_b, next_m * (2 * ROWS) + wg * ROWS, next_h, has_next)
        if total > first:
            last = c0 + total - first - 1
            mbarrier.wait(v_ready.index(last % STAGES), phase=(last // STAGES) & 1)
            v_last = v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM])
            o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_last, o)
            if PERSISTENT:  # the ring runs on into the next tile: release the last V too
                mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        if OWN_BLOCKS:
            pass_blocks(k_ready, v_ready, k_empty, v_empty, c0 + total - first, tile_end, STAGES)
        if SINK:  # the head's sink logit joins the denominator (``_common.add_sink``)
            sink2 = gl.load(Sink + off_h) * LOG2E_C + gl.zeros_like(m_i)
            m_new = gl.maximum(m_i, sink2)
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_sub)
            l_i = l_i * alpha + gl.exp2(sink2 - m_sub)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            m_i = m_new
        if DROPOUT:  # the kept probabilities, times 1 / (1 - p)
            o = o * drop_scale
        _store_out(o, m_i, l_i, row0, rows, Out, Lse_row, off_b, off_h, H, Sq, o_layout)

    @gluon.jit
    def _attend_tile(q_desc, k_desc, v_desc, Out, Lse_row, off_b, off_h, H, GROUP, Sq, Sk, causal_offset, start_m,
                     win_l, win_r, qk_scale, cap2, alibi_bh, Sink, Rng, drop_row0, drop_col, drop_thresh, drop_scale,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, SINK: gl.constexpr,
                     WINDOW: gl.constexpr, DROPOUT: gl.constexpr):
        """One BLOCK_M-row query tile of head ``off_h`` (rows [start_m, start_m + BLOCK_M) of batch
        entry ``off_b`` of the descriptors) against its key blocks: the default partition (4 warps)
        and one worker (4 warps) each own half of its rows, a one-warp worker runs the TMA loads of
        K and V through a STAGES-deep ring ahead of both (``_gluon.producer``, :func:`_consumer`).
        Key blocks: [0, n_full) seen by every row and inside Sk (no mask), [n_full, total) masked
        (causal: bottom-right by causal_offset; the block holding key Sk - 1)."""
        ROWS: gl.constexpr = BLOCK_M // 2
        kv_col = (off_h // GROUP) * HEAD_DIM
        q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _tile_smem(q_desc, k_desc, v_desc, STAGES)
        first, total, full_lo, full_hi = tile_key_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M,
                                                         BLOCK_N, IS_CAUSAL, WINDOW)
        gl.warp_specialize(
            [(_consumer, (0, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out, Lse_row,
                          first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk, causal_offset, win_l, win_r,
                          qk_scale, start_m, cap2, alibi_bh, Sink, Rng, drop_row0, drop_col, drop_thresh,
                          drop_scale, 0, 0, 0, 0, 0, HEAD_DIM, ROWS, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP,
                          ALIBI, SINK, WINDOW, DROPOUT, False)),
             (_consumer, (1, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out, Lse_row,
                          first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk, causal_offset, win_l, win_r,
                          qk_scale, start_m, cap2, alibi_bh, Sink, Rng, drop_row0, drop_col, drop_thresh,
                          drop_scale, 0, 0, 0, 0, 0, HEAD_DIM, ROWS, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP,
                          ALIBI, SINK, WINDOW, DROPOUT, False)),
             (producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, first, total,
                         off_b, kv_col, 0, BLOCK_N, STAGES))],
            [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _tile_smem(q_desc, k_desc, v_desc, STAGES: gl.constexpr):
        """Shared memory of a program: two Q buffers (one per consumer) with their barriers, and
        the K/V ring (``_gluon.kv_ring``), initialised and fenced."""
        ROWS: gl.constexpr = q_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, 1, ROWS, HEAD_DIM], q_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = kv_ring(k_desc, v_desc, STAGES)
        fence_async_shared()
        return q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _tile_of(k, n_m, n_tiles, H, IS_CAUSAL: gl.constexpr):
        """The persistent program's k-th tile: ``(pid_m, off_b, off_h, pid_bh, valid)``.  In the
        list of tiles, a head's query tiles are consecutive (their K and V stay in L2).
        Non-causal, program p of G takes tiles p, p + G, p + 2G, ...  Causal, it takes pairs,
        tiles 2 (p + i G) and 2 (p + i G) + 1 (i = k // 2), and a head's tiles are listed heavy
        with light (last, first, second to last, second, ...): every pair costs the same, so the
        programs stay in step and keep to the same few heads (one tile at a time let them drift
        apart, out of L2: causal 16k ran at 0.72x, performance.md sixteenth session)."""
        if IS_CAUSAL:
            t = 2 * (gl.program_id(0) + (k // 2) * gl.num_programs(0)) + (k & 1)
        else:
            t = gl.program_id(0) + k * gl.num_programs(0)
        pid_bh = t // n_m
        pid_m = t % n_m
        if IS_CAUSAL:
            pid_m = gl.where((pid_m & 1) == 0, n_m - 1 - pid_m // 2, pid_m // 2)
        return pid_m, pid_bh // H, pid_bh % H, pid_bh, t < n_tiles

    @gluon.jit
    def _tiles_of_program(n_tiles, IS_CAUSAL: gl.constexpr):
        """How many tiles :func:`_tile_of` gives this program (causal: the last pair may hold
        one tile only; ``valid`` says)."""
        if IS_CAUSAL:
            return 2 * gl.cdiv(gl.cdiv(n_tiles, 2) - gl.program_id(0), gl.num_programs(0))
        else:
            return gl.cdiv(n_tiles - gl.program_id(0), gl.num_programs(0))

    @gluon.jit
    def _persistent_consumer(wg, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out, Lse,
                             n_m, n_tiles, H, Sq, Sk, causal_offset, win_l, win_r, qk_scale, cap2, Alibi, stride_ab,
                             stride_ah, Sink, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale,
                             HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr,
                             ALIBI: gl.constexpr, SINK: gl.constexpr, WINDOW: gl.constexpr, DROPOUT: gl.constexpr):
        """Consumer ``wg`` of the persistent kernel: the program's tiles (:func:`_tile_of`), each
        as :func:`_consumer` does one, the ring position and the Q barrier's phase carried over."""
        ROWS: gl.constexpr = BLOCK_M // 2
        pid_m, off_b, off_h, pid_bh, valid = _tile_of(0, n_m, n_tiles, H, IS_CAUSAL)
        _load_q(q_desc, q_smem.index(wg), q_bar.index(wg), off_b, pid_m * BLOCK_M + wg * ROWS, off_h, True)
        c0 = 0
        q_phase = 0
        for k in range(0, _tiles_of_program(n_tiles, IS_CAUSAL)):
            pid_m, off_b, off_h, pid_bh, valid = _tile_of(k, n_m, n_tiles, H, IS_CAUSAL)
            if valid:  # (the last pair of the list may have one tile)
                start_m = pid_m * BLOCK_M
                first, total, full_lo, full_hi = tile_key_blocks(start_m, Sk, causal_offset, win_l, win_r, BLOCK_M,
                                                                 BLOCK_N, IS_CAUSAL, WINDOW)
                _consumer(wg, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out,
                          Lse + pid_bh.to(gl.int64) * Sq, first, total, full_lo, full_hi, off_b, off_h, H, Sq, Sk,
                          causal_offset, win_l, win_r, qk_scale, start_m, cap2,
                          Alibi + off_b * stride_ab + off_h * stride_ah, Sink, Rng,
                          (pid_bh.to(gl.int64) << 32) + drop_row_off + start_m, drop_col_off, drop_thresh,
                          drop_scale, c0, q_phase, k + 1, n_m, n_tiles, HEAD_DIM, ROWS,
                          BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, SINK, WINDOW, DROPOUT, True)
                c0 += total - first
                q_phase ^= 1

    @gluon.jit
    def _persistent_producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_m, n_tiles, H,
                             GROUP, Sk, causal_offset, win_l, win_r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """The producer warp of the persistent kernel: each tile's K/V blocks (``_gluon.producer``)
        in the consumers' tile order, the ring running on across tiles, so that the next tile's
        first blocks load while the consumers finish this one."""
        HEAD_DIM: gl.constexpr = k_desc.block_type.shape[2]
        c0 = 0
        for k in range(0, _tiles_of_program(n_tiles, IS_CAUSAL)):
            pid_m, off_b, off_h, pid_bh, valid = _tile_of(k, n_m, n_tiles, H, IS_CAUSAL)
            if valid:
                first, total, full_lo, full_hi = tile_key_blocks(pid_m * BLOCK_M, Sk, causal_offset, win_l, win_r, BLOCK_M,
                                                     BLOCK_N, IS_CAUSAL, WINDOW)
                producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, first, total, off_b,
                         (off_h // GROUP) * HEAD_DIM, c0, BLOCK_N, STAGES)
                c0 += total - first

    @gluon.jit
    def _persistent_fwd_kernel(
        q_desc, k_desc, v_desc, Out, Lse, H, GROUP, Sq, Sk, causal_offset, win_l, win_r, qk_scale, cap2, Alibi,
        stride_ab, stride_ah, Sink, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale, n_m, n_tiles,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, SINK: gl.constexpr,
        WINDOW: gl.constexpr, DROPOUT: gl.constexpr, num_warps: gl.constexpr,
    ):
        """:func:`_fwd_kernel`'s tiles (n_m query tiles x B H heads = n_tiles) run by G programs
        (<= n_tiles, causal <= n_tiles / 2), each walking its tiles (:func:`_tile_of`) with one set-up
        of shared memory and warps: the producer loads the next tile's K/V and each consumer
        the next tile's Q while this tile's last P V and epilogue run."""
        q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _tile_smem(q_desc, k_desc, v_desc, STAGES)
        gl.warp_specialize(
            [(_persistent_consumer, (0, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out,
                                     Lse, n_m, n_tiles, H, Sq, Sk, causal_offset, win_l, win_r, qk_scale, cap2, Alibi,
                                     stride_ab, stride_ah, Sink, Rng, drop_row_off, drop_col_off, drop_thresh,
                                     drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, SINK,
                                     WINDOW, DROPOUT)),
             (_persistent_consumer, (1, q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Out,
                                     Lse, n_m, n_tiles, H, Sq, Sk, causal_offset, win_l, win_r, qk_scale, cap2, Alibi,
                                     stride_ab, stride_ah, Sink, Rng, drop_row_off, drop_col_off, drop_thresh,
                                     drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, SINK,
                                     WINDOW, DROPOUT)),
             (_persistent_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_m, n_tiles,
                                     H, GROUP, Sk, causal_offset, win_l, win_r, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL,
                                     WINDOW))],
            [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _fwd_kernel(
        q_desc, k_desc, v_desc, Out, Lse, H, GROUP, Sq, Sk, causal_offset, win_l, win_r, qk_scale, cap2, Alibi,
        stride_ab, stride_ah, Sink, Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, SINK: gl.constexpr,
        WINDOW: gl.constexpr, DROPOUT: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Program = one BLOCK_M-row query tile of one head of one batch entry
        (:func:`_attend_tile`); Out (B, Sq, H, D) and Lse (B, H, Sq) contiguous."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        _attend_tile(q_desc, k_desc, v_desc, Out, Lse + pid_bh.to(gl.int64) * Sq, off_b, off_h, H, GROUP, Sq, Sk,
                     causal_offset, pid_m * BLOCK_M, win_l, win_r, qk_scale, cap2,
                     Alibi + off_b * stride_ab + off_h * stride_ah, Sink, Rng,
                     (pid_bh.to(gl.int64) << 32) + drop_row_off + pid_m * BLOCK_M, drop_col_off, drop_thresh,
                     drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, SINK, WINDOW, DROPOUT)

    @gluon.jit
    def _varlen_fwd_kernel(
        Q, K, V, Out, Lse, CuQ, CuK, SeqUsedK, CuBlocks, stride_qs, stride_ks, stride_vs, B, H, GROUP, Tq, Tk,
        win_l, win_r, qk_scale, cap2, Alibi, stride_ab, stride_ah, Sink, Rng, drop_row_off, drop_col_off,
        drop_thresh, drop_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        IS_CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, SINK: gl.constexpr,
        WINDOW: gl.constexpr, DROPOUT: gl.constexpr, LOG_B: gl.constexpr, HAS_SEQUSED: gl.constexpr, q_layout: gl.constexpr,
        kv_layout: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Varlen: program (p, h) = work item p of the query-block list ``CuBlocks`` (as
        ``varlen._varlen_fwd_kernel``'s) for head h.  Each program makes TMA descriptors of its
        own sequence's rows (device-side, 3-D (1, len, heads * D)), so rows past the sequence's
        end are zero-filled exactly as the dense kernel's are, never the next sequence's.
        Programs past the last block get an empty sequence: one Q load, no key block, no store.
        Out (Tq, H, D) and Lse (H, Tq) contiguous."""
        ROWS: gl.constexpr = BLOCK_M // 2
        off_h = gl.program_id(1)
        b, q_start, len_q, k_start, len_k, start_m = varlen_item(CuQ, CuK, SeqUsedK, CuBlocks, B, Tq, Tk, BLOCK_M,
                                                                 LOG_B, HAS_SEQUSED)
        width_kv = (H // GROUP) * HEAD_DIM
        q_desc = sequence_descriptor(Q, q_start, stride_qs, len_q, H * HEAD_DIM, [1, ROWS, HEAD_DIM], q_layout)
        k_desc = sequence_descriptor(K, k_start, stride_ks, len_k, width_kv, [1, BLOCK_N, HEAD_DIM], kv_layout)
        v_desc = sequence_descriptor(V, k_start, stride_vs, len_k, width_kv, [1, BLOCK_N, HEAD_DIM], kv_layout)
        _attend_tile(q_desc, k_desc, v_desc, Out + q_start * (H * HEAD_DIM), Lse + off_h.to(gl.int64) * Tq + q_start,
                     0, off_h, H, GROUP, len_q, len_k, len_k - len_q, start_m, win_l, win_r, qk_scale, cap2,
                     Alibi + b * stride_ab + off_h * stride_ah, Sink, Rng,
                     ((b * H + off_h).to(gl.int64) << 32) + drop_row_off + start_m, drop_col_off, drop_thresh,
                     drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SOFTCAP, ALIBI, SINK, WINDOW, DROPOUT)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
            causal_offset: int, out: torch.Tensor, lse: torch.Tensor, softcap: float = 0.0,
            alibi_slopes: torch.Tensor | None = None, sink: torch.Tensor | None = None,
            window_size: tuple[int, int] = (-1, -1), config: tuple[int, int, int] | None = None,
            dropout_p: float = 0.0, rng: torch.Tensor | None = None, drop_offsets: tuple[int, int] = (0, 0)) -> None:
    """Fill ``out`` (B, Sq, H, D) contiguous and ``lse`` (B, H, Sq) fp32 (callers check
    :func:`supported` first); ``softcap``, ``alibi_slopes`` (fp32 (H,) or (B, H)), ``sink``
    (fp32 (H,)) and ``window_size`` as ``fa2_fwd.fa2_forward`` takes them; ``config``:
    (BLOCK_M, BLOCK_N, stages)."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    qk_scale, _, cap2, _ = _common.qk_scale(softmax_scale, softcap)
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    block_m, block_n, stages = config or config_for(d, causal, sk)
    args = (descriptor_3d(q, block_m // 2), descriptor_3d(k, block_n), descriptor_3d(v, block_n), out, lse,
            h, h // h_kv, sq, sk, causal_offset, win_l, win_r, qk_scale, cap2, *_common.alibi_args(alibi_slopes, q),
            _common.sink_args(sink, q), *_dropout_args(dropout_p, rng, q, drop_offsets))
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, IS_CAUSAL=causal, SOFTCAP=bool(softcap),
                ALIBI=alibi_slopes is not None, SINK=sink is not None, WINDOW=window, DROPOUT=bool(dropout_p),
                num_warps=4)
    n_m = cdiv(sq, block_m)
    if PERSISTENT:
        n_tiles = n_m * b * h
        programs = min(cdiv(n_tiles, 2) if causal else n_tiles, PROGRAMS or torch.cuda.get_device_properties(q.device).multi_processor_count)
        _persistent_fwd_kernel[(programs,)](*args, n_m, n_tiles, **meta)
    else:
        _fwd_kernel[(n_m, b * h)](*args, **meta)


def varlen_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variants: bool, batch: int = 1) -> bool:
    """Whether :func:`varlen_forward` can run this packed call: q (Tq, H, D), k/v (Tk, H_kv, D),
    each with (H, D) dense and 16-byte aligned rows (any row stride: packed QKV is fine), ``batch``
    sequences; ``variants``: the call has something only the portable varlen kernel takes (a
    paged cache, dropout, a softmax scale <= 0; softcap, ALiBi, sinks and windows unless
    :data:`VARIANTS`).  At D=64 the dense rule for short keys (:data:`D64_MIN_KEYS`) applies to
    the mean key length Tk / batch (the lengths themselves are on the device), with or without
    a mask: unlike the dense one, the varlen kernel at D=64 was not measured without one."""
    if not (HAVE_GLUON and ENABLED and VARLEN) or variants or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in FWD_CONFIGS:
        return False
    if q.shape[-1] == 64 and k.shape[0] < D64_MIN_KEYS * max(batch, 1):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    for t in (q, k, v):
        _, h, d = t.shape
        if t.stride()[1:] != (d, 1) or t.stride(0) % 8 or t.data_ptr() % 16 or t.dtype != q.dtype:
            return False
    return q.numel() > 0


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, launch_meta: tuple,
                   cu_blocks: torch.Tensor, softmax_scale: float, causal: bool, out: torch.Tensor, lse: torch.Tensor,
                   softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, sink: torch.Tensor | None = None,
                   window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                   rng: torch.Tensor | None = None) -> None:
    """Fill ``out`` (Tq, H, D) and ``lse`` (H, Tq) (contiguous, pre-filled with 0 / -inf for
    rows in no sequence) for packed sequences, as ``varlen.varlen_forward`` defines them
    (callers check :func:`varlen_supported` first).  ``launch_meta``: ``varlen.varlen_launch_meta``'s
    ``((cu_seqlens_q, cu_seqlens_k, seqused_k or a stand-in), B, flags)``; ``cu_blocks``: the
    query-block work list (``varlen.work_list``) for BLOCK_M = :func:`varlen_block_m`."""
    tq, h, d = q.shape
    h_kv = k.shape[1]
    block_m, block_n, stages = FWD_CONFIGS[d]
    qk_scale, _, cap2, _ = _common.qk_scale(softmax_scale, softcap)
    win_l, win_r, window, causal = _common.window_args(window_size, causal)
    meta, b, flags = launch_meta
    set_scratch_allocator()
    _varlen_fwd_kernel[(cdiv(tq, block_m) + b, h)](
        q, k, v, out, lse, *meta, cu_blocks, q.stride(0), k.stride(0), v.stride(0), b, h, h // h_kv, tq,
        k.shape[0], win_l, win_r, qk_scale, cap2, *_common.alibi_args(alibi_slopes, q), _common.sink_args(sink, q),
        *_dropout_args(dropout_p, rng, q),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, IS_CAUSAL=causal, SOFTCAP=bool(softcap),
        ALIBI=alibi_slopes is not None, SINK=sink is not None, WINDOW=window, DROPOUT=bool(dropout_p),
        q_layout=shared_layout_3d(q, block_m // 2), kv_layout=shared_layout_3d(k, block_n), num_warps=4, **flags,
    )


def varlen_block_m(d: int) -> int:
    """The query rows per program of the Gluon varlen forward at head dim ``d``."""
    return FWD_CONFIGS[d][0]


def _dropout_args(dropout_p: float, rng: torch.Tensor | None, like: torch.Tensor,
                  offsets: tuple[int, int] = (0, 0)) -> tuple:
    """``(Rng, drop_row_off, drop_col_off, drop_thresh, drop_scale)``: ``_common.dropout_args``
    without the low half of the scale (fp16/bf16 only here)."""
    return _common.dropout_args(dropout_p, rng, like, offsets)[:5]
