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
atomics and the result is deterministic.  ``delta`` and ``lse2`` come from FA2's preprocess.

Block sizes follow the paper: Bc = ceil(M / 4d), Br = min(Bc, d), with M the on-chip memory
in fp32 words (see :func:`flash_module.configs.fa1_blocks`).
"""

import torch
import triton
import triton.language as tl

from ..configs import fa1_blocks
from ._common import LN2, LOG2E, mma, scaled, split_scale, to_dtype
from .fa2_bwd import _bwd_preprocess
from .fa2_fwd import block_d, kernel_flags


@triton.jit
def _fa1_fwd_kernel(
    Q, K, V, Out, Lse, OAcc, L, M,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, blocks_per_group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    m_lo = pid_g * blocks_per_group * BLOCK_M  # this program's query rows: [m_lo, m_hi)
    m_hi = tl.minimum(m_lo + blocks_per_group * BLOCK_M, Sq)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    Q_head = Q + off_b * stride_qb + off_h * stride_qh
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh
    row_base = pid_bh.to(tl.int64) * Sq  # row offset into the (B*H, Sq) statistics
    OAcc_head = OAcc + row_base * BLOCK_D  # fp32 workspace (B*H, Sq, BLOCK_D)

    # Initialise this program's O = 0, l = 0, m = -inf in HBM.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + offs_r
        ok = rows < Sq
        tl.store(OAcc_head + rows[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE), mask=ok[:, None])
        tl.store(L + row_base + rows, tl.zeros([BLOCK_M], ACC_DTYPE), mask=ok)
        tl.store(M + row_base + rows, tl.full([BLOCK_M], float("-inf"), ACC_DTYPE), mask=ok)
    tl.debug_barrier()

    if IS_CAUSAL:
        n_end = tl.minimum(Sk, tl.maximum(m_hi + causal_offset, 0))
    else:
        n_end = Sk
    for start_n in range(0, n_end, BLOCK_N):  # outer loop: K/V blocks
        cols = start_n + offs_c
        kv_ok = (cols[:, None] < Sk) & d_ok
        k = tl.load(K_head + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V_head + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
        # Query rows that can see this block: i >= start_n - causal_offset.
        i_lo = m_lo
        if IS_CAUSAL:
            i_lo = tl.maximum(m_lo, ((start_n - causal_offset) // BLOCK_M) * BLOCK_M)
        for start_m in range(i_lo, m_hi, BLOCK_M):  # inner loop: query blocks
            rows = start_m + offs_r
            row_ok = rows < Sq
            q = tl.load(Q_head + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok, other=0.0)
            o_ptrs = OAcc_head + rows[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :]
            o_i = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_D) from HBM
            l_i = tl.load(L + row_base + rows, mask=row_ok, other=0.0)
            m_i = tl.load(M + row_base + rows, mask=row_ok, other=float("-inf"))
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), DOT_PRECISION, UPCAST)
            s = scaled(s, qk_scale, qk_scale_lo, EXACT)  # log2 domain
            ok = cols[None, :] < Sk
            if IS_CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + causal_offset)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_new = alpha * l_i + tl.sum(p, 1)
            pv = mma(p, v, tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE), DOT_PRECISION, UPCAST)
            l_div = tl.where(l_new > 0, l_new, 1.0)
            o_i = ((alpha * l_i)[:, None] * o_i + pv) / l_div[:, None]
            tl.store(o_ptrs, o_i, mask=row_ok[:, None])  # back to HBM, normalised
            tl.store(L + row_base + rows, l_new, mask=row_ok)
            tl.store(M + row_base + rows, m_new, mask=row_ok)
        tl.debug_barrier()  # the next K/V block re-reads O, l, m written by other threads

    # Epilogue: cast O to the output dtype and write LSE = (m + log2 l) * ln 2.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + offs_r
        row_ok = rows < Sq
        o_i = tl.load(OAcc_head + rows[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :],
                      mask=row_ok[:, None], other=0.0)
        l_i = tl.load(L + row_base + rows, mask=row_ok, other=0.0)
        m_i = tl.load(M + row_base + rows, mask=row_ok, other=0.0)
        seen = l_i > 0
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * tl.full([], LN2, ACC_DTYPE),
                       float("-inf"))
        o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :]
        tl.store(o_ptrs, to_dtype(o_i, Out.dtype.element_ty, ROUND_BF16), mask=row_ok[:, None] & d_ok)
        tl.store(Lse + row_base + rows, lse, mask=row_ok)


@triton.jit
def _fa1_bwd_kernel(
    Q, K, V, DO, Lse2, Delta, DQAcc, DK, DV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    H, H_KV, GROUP, Sq, Sk, causal_offset, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    blocks_per_group, dq_group_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hkv = (pid_bh % H_KV).to(tl.int64)
    n_lo = pid_g * blocks_per_group * BLOCK_N  # this program's keys: [n_lo, n_hi)
    n_hi = tl.minimum(n_lo + blocks_per_group * BLOCK_N, Sk)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    DQ_group = DQAcc + pid_g.to(tl.int64) * dq_group_stride  # this group's own dQ partial

    for start_n in range(n_lo, n_hi, BLOCK_N):  # outer loop: K/V blocks
        cols = start_n + offs_c
        kv_ok = (cols[:, None] < Sk) & d_ok
        k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + cols[:, None].to(tl.int64) * stride_ks
                    + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + cols[:, None].to(tl.int64) * stride_vs
                    + offs_d[None, :], mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)  # on chip for the whole inner loop
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        i_lo = 0
        if IS_CAUSAL:
            i_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):  # GQA: every query head of this K/V head
            off_h = off_hkv * GROUP + g
            row_base = (off_b * H + off_h) * Sq
            for start_m in range(i_lo, Sq, BLOCK_M):  # inner loop: query blocks
                rows = start_m + offs_r
                row_ok = rows < Sq
                qd_ok = row_ok[:, None] & d_ok
                q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None].to(tl.int64) * stride_qs
                            + offs_d[None, :], mask=qd_ok, other=0.0)
                do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                             + rows[:, None].to(tl.int64) * stride_dos + offs_d[None, :], mask=qd_ok, other=0.0)
                lse2 = tl.load(Lse2 + row_base + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
                s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), DOT_PRECISION, UPCAST)
                p = tl.math.exp2(scaled(s, qk_scale, qk_scale_lo, EXACT) - lse2[:, None])  # (BLOCK_M, BLOCK_N)
                ok = cols[None, :] < Sk
                if IS_CAUSAL:
                    ok = ok & (cols[None, :] <= rows[:, None] + causal_offset)
                p = tl.where(ok, p, 0.0)
                dv = mma(tl.trans(p), do, dv, DOT_PRECISION, UPCAST)
                dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), DOT_PRECISION, UPCAST)
                ds = p * (dp - delta[:, None])
                dk = mma(tl.trans(ds), q, dk, DOT_PRECISION, UPCAST)
                # dQ_i += dS K_j, read-modify-write in HBM (fp32 partial of this K/V group).
                dq_ptrs = DQ_group + (row_base + rows[:, None].to(tl.int64)) * BLOCK_D + offs_d[None, :]
                dq = tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
                dq = mma(ds, k, dq, DOT_PRECISION, UPCAST)
                tl.store(dq_ptrs, dq, mask=row_ok[:, None])
        tl.debug_barrier()  # the next K/V block re-reads dQ rows written by other threads
        dk = scaled(dk, sm_scale, sm_scale_lo, EXACT)
        tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + cols[:, None].to(tl.int64) * stride_dks
                 + offs_d[None, :], to_dtype(dk, DK.dtype.element_ty, ROUND_BF16), mask=kv_ok)
        tl.store(DV + off_b * stride_dkb + off_hkv * stride_dkh + cols[:, None].to(tl.int64) * stride_dks
                 + offs_d[None, :], to_dtype(dv, DV.dtype.element_ty, ROUND_BF16), mask=kv_ok)


def _groups(work_blocks: int, programs_per_group_unit: int, device: torch.device, interpret: bool) -> int:
    """How many groups to split ``work_blocks`` blocks into so that ~2 programs run per SM."""
    if interpret or device.type != "cuda":
        return min(work_blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(work_blocks, triton.cdiv(2 * sms, max(programs_per_group_unit, 1))))


def fa1_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
    causal_offset: int, interpret: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA1 forward; same contract as :func:`..fa2_fwd.fa2_forward`."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = block_d(d)
    flags = kernel_flags(q, interpret)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    block_r, block_c = fa1_blocks(q.dtype, d, q.device, interpret)
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=acc, device=q.device)
    o_acc = torch.empty((b * h, sq, bd), dtype=acc, device=q.device)  # O in HBM
    l_ws = torch.empty((b * h, sq), dtype=acc, device=q.device)  # l in HBM
    m_ws = torch.empty_like(l_ws)  # m in HBM
    q_blocks = triton.cdiv(sq, block_r)
    groups = _groups(q_blocks, b * h, q.device, interpret)
    per_group = triton.cdiv(q_blocks, groups)
    _fa1_fwd_kernel[(triton.cdiv(q_blocks, per_group), b * h)](
        q, k, v, out, lse, o_acc, l_ws, m_ws,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, sq, sk, causal_offset, *split_scale(softmax_scale * LOG2E), per_group,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_r, BLOCK_N=block_c, IS_CAUSAL=causal,
        num_warps=4, num_stages=1, **flags,
    )
    return out, lse


def fa1_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dlse: torch.Tensor | None, softmax_scale: float, causal: bool,
    causal_offset: int, interpret: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA1 backward; same contract as :func:`..fa2_bwd.fa2_backward`."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = block_d(d)
    flags = kernel_flags(q, interpret)
    acc = flags["ACC_DTYPE"]
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    block_r, block_c = fa1_blocks(q.dtype, d, q.device, interpret)
    delta = torch.empty((b, h, sq), dtype=acc_t, device=q.device)
    lse2 = torch.empty_like(delta)
    pre_m = 64
    _bwd_preprocess[(triton.cdiv(sq, pre_m), b * h)](
        out, dout, lse, dlse if dlse is not None else lse, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        h, sq, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_m, HAS_DLSE=dlse is not None, ACC_DTYPE=acc,
    )
    kv_blocks = triton.cdiv(sk, block_c)
    groups = _groups(kv_blocks, b * h_kv, q.device, interpret)
    per_group = triton.cdiv(kv_blocks, groups)
    groups = triton.cdiv(kv_blocks, per_group)
    dq_acc = torch.zeros((groups, b * h, sq, bd), dtype=acc_t, device=q.device)  # dQ in HBM
    dk = torch.empty((b, sk, h_kv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, h_kv, d), dtype=v.dtype, device=q.device)
    _fa1_bwd_kernel[(groups, b * h_kv)](
        q, k, v, dout, lse2, delta, dq_acc, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        h, h_kv, h // h_kv, sq, sk, causal_offset,
        *split_scale(softmax_scale * LOG2E), *split_scale(softmax_scale),
        per_group, dq_acc.stride(0),
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_r, BLOCK_N=block_c, IS_CAUSAL=causal,
        num_warps=4, num_stages=1, **flags,
    )
    # Sum the groups' partials in a fixed order (deterministic), scale, drop the padding.
    dq = dq_acc.sum(dim=0) * softmax_scale
    dq = dq.view(b, h, sq, bd)[..., :d].transpose(1, 2).to(q.dtype).contiguous()
    return dq, dk, dv
