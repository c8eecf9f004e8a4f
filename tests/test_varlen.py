"""The varlen FA2 kernels (issue #12, work in progress: no op or public API yet), forward and
backward, against the float64 oracle sequence by sequence (flash-attn's 2x rule on the packed
result)."""

from __future__ import annotations

import pytest
import torch

from flash_module.kernels.varlen import varlen_backward, varlen_forward, work_list
from flash_module.reference import attention_ref

from .helpers import assert_flash_rule

# (lengths_q, lengths_k, H, H_kv, D): zero and one-token sequences, odd lengths, Sq != Sk both
# ways, GQA, head dims that are not powers of two.
CASES = [
    pytest.param([17, 0, 1, 113, 50], [17, 0, 1, 113, 50], 2, 2, 40, id="self-0-1-17-113-d40"),
    pytest.param([5, 70, 1], [33, 20, 203], 4, 2, 64, id="cross-gqa2-d64"),
    pytest.param([64, 3], [64, 3], 4, 1, 72, id="mqa-d72"),
    pytest.param([0, 0], [3, 0], 2, 2, 16, id="all-empty-queries"),
]


def _pack(lengths, h, d, dtype, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return torch.randn(int(sum(lengths)), h, d, dtype=dtype, device=device), cu


def _oracle(q, k, v, dout, cu_q, cu_k, scale, causal, dtype):
    """Packed (out, lse (H, Tq), dq, dk, dv) from attention_ref on each sequence, in ``dtype``."""
    out, dq, dk, dv = (torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (q, q, k, v))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs:
            continue
        seq = [t[None].detach().to(dtype).requires_grad_() for t in (q[qs:qe], k[ks:ke], v[ks:ke])]
        o, s = attention_ref(*seq, scale, causal, True)
        grads = torch.autograd.grad(o, seq, dout[qs:qe][None].to(dtype))
        out[qs:qe], lse[:, qs:qe] = o[0].detach(), s[0].detach().double()
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (g[0] for g in grads)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens_q,lens_k,h,h_kv,d", CASES)
def test_varlen_matches_oracle(lens_q, lens_k, h, h_kv, d, dtype, causal, device):
    q, cu_q = _pack(lens_q, h, d, dtype, device)
    k, cu_k = _pack(lens_k, h_kv, d, dtype, device)
    v, dout = torch.randn_like(k), torch.randn_like(q)
    scale = d**-0.5
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, scale, causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, q.shape[0])
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    oracle = _oracle(q, k, v, dout, cu_q, cu_k, scale, causal, torch.float64)
    lowp = _oracle(q, k, v, dout, cu_q, cu_k, scale, causal, dtype)
    ours = (out, *grads)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, oracle[:1] + oracle[2:], lowp[:1] + lowp[2:]):
        assert a.shape == o.shape and a.dtype == dtype, name
        assert_flash_rule(name, a, o, p, dtype)
    finite = torch.isfinite(oracle[1])
    assert torch.equal(torch.isfinite(lse), finite)  # -inf exactly where a row sees no key
    assert torch.allclose(lse.double()[finite], oracle[1][finite], atol=1e-3, rtol=0)


def test_work_list_skips_empty_sequences(device):
    cu = torch.tensor([0, 17, 17, 18, 131], dtype=torch.int32, device=device)
    assert work_list(cu, 16).tolist() == [0, 2, 2, 3, 11]


def test_varlen_forward_clamps_bad_offsets(device):
    """cu_seqlens past the tensors cannot be checked without a sync: the kernel clamps them and
    stays in bounds (a wrong answer is allowed, an out-of-bounds access is not)."""
    q = torch.randn(10, 2, 16, device=device)
    cu = torch.tensor([0, 6, 40], dtype=torch.int32, device=device)  # claims 40 tokens, has 10
    out, lse = varlen_forward(q, q, q, cu, cu, 0.25, True)
    assert torch.isfinite(out).all() and out.shape == q.shape


def test_varlen_strided_inputs_and_no_sequence(device):
    """Views with a non-contiguous head axis (slices of a packed QKV) give the same gradients as
    contiguous copies; cu_seqlens with no sequence (B = 0) launches nothing."""
    qkv = torch.randn(30, 3, 2, 16, device=device)
    q, k, v = qkv.unbind(1)  # (T, H, D) views, head stride 16, token stride 96
    cu = torch.tensor([0, 7, 30], dtype=torch.int32, device=device)
    dout = torch.randn(30, 2, 16, device=device)
    out, lse = varlen_forward(q, k, v, cu, cu, 0.25, True)
    grads = varlen_backward(dout, q, k, v, out, lse, cu, cu, 0.25, True)
    dense = [t.contiguous() for t in (q, k, v)]
    out_c, lse_c = varlen_forward(*dense, cu, cu, 0.25, True)
    grads_c = varlen_backward(dout, *dense, out_c, lse_c, cu, cu, 0.25, True)
    assert torch.equal(out, out_c)
    for g, gc in zip(grads, grads_c):
        assert g.is_contiguous() and torch.equal(g, gc)
    none = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = varlen_forward(q, k, v, none, none, 0.25, False)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
