"""FlashAttention v1 (Algorithms 1 and 4 of the FA1 paper) in Triton.

Forward: the *outer* loop runs over K/V blocks (Bc keys), the *inner* loop over query blocks
(Br rows).  The running output O, sum l and max m live in HBM (fp32 workspaces): every time a
K/V block streams past, each query block reads O_i, l_i, m_i, merges the block and writes them
back, already normalised:

    m_new = max(m_i, rowmax(S_ij)),  P = exp(S_ij - m_new)
    l_new = exp(m_i - m_new) l_i + rowsum(P)
    O_i   = (exp(m_i - m_new) l_i O_i + P V_j) / l_new

That read-modify-write of O per (i, j) pair is exactly the HBM traffic FA2 removed by swapping
the loops.  The paper runs one program per (batch, head); here each program owns a contiguous
group of query blocks (``Q_GROUPS`` programs per head) so long sequences still fill the GPU --
the loop order and the HBM round trips are unchanged.

Backward: outer loop over K/V blocks with dK_j, dV_j accumulated on chip; inner loop over query
blocks with dQ_i read-modify-written in HBM.  Programs own groups of K/V blocks; each group has
its own fp32 dQ buffer, and the groups are summed in a fixed order afterwards, so there are no
atomics and the result is deterministic.  ``delta`` and ``lse2`` come from the shared backward
preprocess (:func:`._common.bwd_preprocess`).

Block sizes follow the paper: Bc = ceil(M / 4d), Br = min(Bc, d), with M the on-chip memory
in fp32 words (see :func:`flash_module.configs.fa1_blocks`).
"""

import torch
import triton
import triton.language as tl

from .._runtime import acc_dtype, cdiv, lse_dtype, sm_count
from ..configs import fa1_blocks
from . import _common
from ._common import (
    load_tile,
    lse_epilogue,
    mma,
    probs,
    program_bh,
    row_stats,
    scaled,
    score,
    softmax_update,
    stats_head,
    store_tile,
    tile_ptrs,
    visible,
)


@triton.jit
def _fa1_fwd_kernel(
    Q, K, V, Out, Lse, OAcc, L, M,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    H, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, blocks_per_group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    off_b, off_h = program_bh(H)
    off_hkv = off_h // GROUP
    m_lo = tl.program_id(0) * blocks_per_group * BLOCK_M  # this program's query rows: [m_lo, m_hi)
    m_hi = tl.minimum(m_lo + blocks_per_group * BLOCK_M, Sq)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    Q_head = Q + off_b * stride_qb + off_h * stride_qh
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh
    row_base = (off_b * H + off_h) * Sq  # row offset into the (B*H, Sq) statistics
    OAcc_head = OAcc + row_base * BLOCK_D  # fp32 workspace (B*H, Sq, BLOCK_D)

    # Initialise this program's O = 0, l = 0, m = -inf in HBM.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + offs_r
        ok = rows < Sq
        tl.store(tile_ptrs(OAcc_head, start_m, BLOCK_D, BLOCK_M, BLOCK_D), tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE),
                 mask=ok[:, None])
        tl.store(L + row_base + rows, tl.zeros([BLOCK_M], ACC_DTYPE), mask=ok)
        tl.store(M + row_base + rows, tl.full([BLOCK_M], float("-inf"), ACC_DTYPE), mask=ok)
    tl.debug_barrier()

    if IS_CAUSAL:
        n_end = tl.minimum(Sk, tl.maximum(m_hi + causal_offset, 0))
    else:
        n_end = Sk
    for start_n in range(0, n_end, BLOCK_N):  # outer loop: K/V blocks
        cols = start_n + offs_c
        k = load_tile(tile_ptrs(K_head, start_n, stride_ks, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
        v = load_tile(tile_ptrs(V_head, start_n, stride_vs, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
        # Query rows that can see this block: i >= start_n - causal_offset.
        i_lo = m_lo
        if IS_CAUSAL:
            i_lo = tl.maximum(m_lo, ((start_n - causal_offset) // BLOCK_M) * BLOCK_M)
        for start_m in range(i_lo, m_hi, BLOCK_M):  # inner loop: query blocks
            rows = start_m + offs_r
            row_ok = rows < Sq
            q = load_tile(tile_ptrs(Q_head, start_m, stride_qs, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, True)
            o_ptrs = tile_ptrs(OAcc_head, start_m, BLOCK_D, BLOCK_M, BLOCK_D)
            o_i = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_D) from HBM
            l_i = tl.load(L + row_base + rows, mask=row_ok, other=0.0)
            m_i = tl.load(M + row_base + rows, mask=row_ok, other=float("-inf"))
            s = score(q, tl.trans(k), qk_scale, qk_scale_lo)  # log2 domain
            s = tl.where(visible(rows[:, None], cols[None, :], Sk, causal_offset, IS_CAUSAL), s, float("-inf"))
            p, alpha, l_new, m_new = softmax_update(m_i, l_i, s, True)
            pv = mma(p, v, tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE))
            l_div = tl.where(l_new > 0, l_new, 1.0)
            o_i = ((alpha * l_i)[:, None] * o_i + pv) / l_div[:, None]
            tl.store(o_ptrs, o_i, mask=row_ok[:, None])  # back to HBM, normalised
            tl.store(L + row_base + rows, l_new, mask=row_ok)
            tl.store(M + row_base + rows, m_new, mask=row_ok)
        tl.debug_barrier()  # the next K/V block re-reads O, l, m written by other threads

    # Epilogue: cast O to the output dtype and write the LSE.  Out is a new contiguous tensor.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + offs_r
        row_ok = rows < Sq
        o_i = tl.load(tile_ptrs(OAcc_head, start_m, BLOCK_D, BLOCK_M, BLOCK_D), mask=row_ok[:, None], other=0.0)
        l_i = tl.load(L + row_base + rows, mask=row_ok, other=0.0)
        m_i = tl.load(M + row_base + rows, mask=row_ok, other=0.0)
        _, lse = lse_epilogue(l_i, m_i, Q.dtype.element_ty == tl.float32)
        o_ptrs = tile_ptrs(Out + (off_b * Sq * H + off_h) * HEAD_DIM, start_m, H * HEAD_DIM, BLOCK_M, BLOCK_D)
        store_tile(o_ptrs, o_i, rows, Sq, HEAD_DIM)
        tl.store(Lse + row_base + rows, lse, mask=row_ok)


@triton.jit
def _fa1_bwd_kernel(
    Q, K, V, DO, Stats, DQAcc, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    H, H_KV, GROUP, Sq, Sk, causal_offset, stats_len, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    blocks_per_group, dq_group_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    off_b, off_hkv = program_bh(H_KV)
    pid_g = tl.program_id(0)
    n_lo = pid_g * blocks_per_group * BLOCK_N  # this program's keys: [n_lo, n_hi)
    n_hi = tl.minimum(n_lo + blocks_per_group * BLOCK_N, Sk)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    DQ_group = DQAcc + pid_g.to(tl.int64) * dq_group_stride  # this group's own dQ partial
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh
    kv_base = (off_b * Sk * H_KV + off_hkv) * HEAD_DIM  # DK, DV: new contiguous (B, Sk, H_kv, D)

    for start_n in range(n_lo, n_hi, BLOCK_N):  # outer loop: K/V blocks
        cols = start_n + offs_c
        k = load_tile(tile_ptrs(K_head, start_n, stride_ks, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
        v = load_tile(tile_ptrs(V_head, start_n, stride_vs, BLOCK_N, BLOCK_D), cols, Sk, HEAD_DIM, True)
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)  # on chip for the whole inner loop
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        i_lo = 0
        if IS_CAUSAL:
            i_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):  # GQA: every query head of this K/V head
            off_h = off_hkv * GROUP + g
            Q_head = Q + off_b * stride_qb + off_h * stride_qh
            DO_head = DO + off_b * stride_dob + off_h * stride_doh
            Stats_head = stats_head(Stats, off_b, off_h, H, stats_len)
            for start_m in range(i_lo, Sq, BLOCK_M):  # inner loop: query blocks
                rows = start_m + offs_r
                row_ok = rows < Sq
                q = load_tile(tile_ptrs(Q_head, start_m, stride_qs, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, True)
                do = load_tile(tile_ptrs(DO_head, start_m, stride_dos, BLOCK_M, BLOCK_D), rows, Sq, HEAD_DIM, True)
                lse2, lse2_lo, delta = row_stats(Stats_head, stats_len, rows, Sq, q, True)
                p = probs(score(q, tl.trans(k), qk_scale, qk_scale_lo), lse2[:, None], lse2_lo[:, None], q)
                p = tl.where(visible(rows[:, None], cols[None, :], Sk, causal_offset, IS_CAUSAL), p, 0.0)
                dv = mma(tl.trans(p), do, dv)
                dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE))
                ds = p * (dp - delta[:, None])
                dk = mma(tl.trans(ds), q, dk)
                # dQ_i += dS K_j, read-modify-write in HBM (fp32 partial of this K/V group).
                dq_ptrs = tile_ptrs(DQ_group + (off_b * H + off_h) * Sq * BLOCK_D, start_m, BLOCK_D, BLOCK_M, BLOCK_D)
                dq = tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
                dq = mma(ds, k, dq)
                tl.store(dq_ptrs, dq, mask=row_ok[:, None])
        tl.debug_barrier()  # the next K/V block re-reads dQ rows written by other threads
        dk = scaled(dk, sm_scale, sm_scale_lo)
        store_tile(tile_ptrs(DK + kv_base, start_n, H_KV * HEAD_DIM, BLOCK_N, BLOCK_D), dk, cols, Sk, HEAD_DIM)
        store_tile(tile_ptrs(DV + kv_base, start_n, H_KV * HEAD_DIM, BLOCK_N, BLOCK_D), dv, cols, Sk, HEAD_DIM)


def _groups(work_blocks: int, programs_per_group_unit: int, device: torch.device) -> int:
    """How many groups to split ``work_blocks`` blocks into so that ~2 programs run per SM."""
    return max(1, min(work_blocks, cdiv(2 * sm_count(device), max(programs_per_group_unit, 1))))


def fa1_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, causal_offset: int,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA1 forward; same contract as :func:`.fa2_fwd.fa2_forward`."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = _common.block_d(d)
    acc = acc_dtype(q.dtype)
    block_r, block_c = fa1_blocks(q.dtype, d, q.device)
    out = torch.empty((b, sq, h, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=lse_dtype(q.dtype), device=q.device)
    o_acc = torch.empty((b * h, sq, bd), dtype=acc, device=q.device)  # O in HBM
    l_ws = torch.empty((b * h, sq), dtype=acc, device=q.device)  # l in HBM
    m_ws = torch.empty_like(l_ws)  # m in HBM
    q_blocks = cdiv(sq, block_r)
    per_group = cdiv(q_blocks, _groups(q_blocks, b * h, q.device))
    _fa1_fwd_kernel[(cdiv(q_blocks, per_group), b * h)](
        q, k, v, out, lse, o_acc, l_ws, m_ws, *_common.bsh_strides(q, k, v),
        h, h // h_kv, sq, sk, causal_offset, *_common.qk_scale(softmax_scale)[:2], per_group,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_r, BLOCK_N=block_c, IS_CAUSAL=causal,
        num_warps=4, num_stages=1, **_common.kernel_flags(q),
    )
    return out, lse


def fa1_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dlse: torch.Tensor | None, softmax_scale: float, causal: bool, causal_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA1 backward; same contract as :func:`.fa2_bwd.fa2_backward`."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = _common.block_d(d)
    block_r, block_c = fa1_blocks(q.dtype, d, q.device)
    stats = _common.bwd_preprocess(out, dout, lse, dlse)
    kv_blocks = cdiv(sk, block_c)
    per_group = cdiv(kv_blocks, _groups(kv_blocks, b * h_kv, q.device))
    groups = cdiv(kv_blocks, per_group)
    dq_acc = torch.zeros((groups, b * h, sq, bd), dtype=acc_dtype(q.dtype), device=q.device)  # dQ in HBM
    dk = torch.empty((b, sk, h_kv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, h_kv, d), dtype=v.dtype, device=q.device)
    _fa1_bwd_kernel[(groups, b * h_kv)](
        q, k, v, dout, stats, dq_acc, dk, dv,
        *_common.bsh_strides(q, k, v, dout),
        h, h_kv, h // h_kv, sq, sk, causal_offset, stats.shape[-1], *_common.qk_scale(softmax_scale)[:2],
        *_common.split_scale(softmax_scale),
        per_group, dq_acc.stride(0),
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_r, BLOCK_N=block_c, IS_CAUSAL=causal,
        num_warps=4, num_stages=1, **_common.kernel_flags(q),
    )
    # Sum the groups' partials in a fixed order (deterministic), scale, drop the padding.
    dq = dq_acc.sum(dim=0) * softmax_scale
    dq = dq.view(b, h, sq, bd)[..., :d].transpose(1, 2).to(q.dtype).contiguous()
    return dq, dk, dv
