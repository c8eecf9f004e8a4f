"""Softcapping (issue #13: Gemma 2's ``softcap``, flash-attn's semantics): scores s -> c tanh(s / c)
before the softmax, forward and exact gradient, in every entry point that takes it (dense with
modes fa2 and tiling, packed, varlen, KV cache), on the Triton kernels and the PyTorch path,
against the float64 oracle with flash-attn's 2x rule."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.reference import attention_ref

from .helpers import assert_compiles_like_eager, assert_flash_rule, assert_matches_reference, make_qkv

IMPLS = ["triton", "torch"]

# (B, Sq, Sk, H, H_kv, D, causal, softcap): Sq != Sk both ways, GQA, odd head dims, a cap small
# enough that most scores saturate (2.0) and one that barely bites (30.0, Gemma 2's value for
# attention is 50 at its scale).
CASES = [
    pytest.param(2, 37, 53, 4, 2, 40, True, 2.0, id="37x53-gqa2-d40-causal-cap2"),
    pytest.param(1, 70, 33, 2, 2, 72, False, 2.0, id="70x33-d72-full-cap2", marks=pytest.mark.slow),
    pytest.param(2, 17, 17, 4, 1, 64, True, 30.0, id="17x17-mqa-d64-causal-cap30", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", IMPLS)
# tiling and bf16 run in the slow set (CI runs it; so does the GPU check): the default run stays short.
@pytest.mark.parametrize("mode", ["fa2", pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal,softcap", CASES)
def test_softcap_matches_oracle(b, sq, sk, h, h_kv, d, causal, softcap, dtype, mode, impl, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device)
    q.data.mul_(3.0)  # logits well past the cap, so tanh saturates somewhere
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=causal, softcap=softcap, mode=mode, impl=impl,
                                     return_attn_probs=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference((out, lse, dq, dk, dv), q, k, v, dout, causal, True, dtype, softcap=softcap)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_changes_the_answer_and_probs_follow(impl, device):
    """A cap that bites gives a different result from no cap (the argument is not ignored), and
    return_attn_probs gives the capped probabilities."""
    q, k, v = make_qkv(1, 9, 12, 2, 2, 16, torch.float64, device, requires_grad=False)
    q *= 4.0
    plain = fm.flash_attn_func(q, k, v, impl=impl)
    out, lse, probs = fm.flash_attn_func(q, k, v, softcap=1.0, impl=impl, return_attn_probs=True)
    assert (out - plain).abs().max() > 1e-3
    s = 1.0 * torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) * 16**-0.5 / 1.0)
    torch.testing.assert_close(probs, torch.softmax(s, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_softcap_matches_oracle(impl, device):
    lens_q, lens_k, h, h_kv, d, cap = [3, 0, 20, 1], [40, 7, 20, 0], 4, 2, 32, 2.0
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = (3 * torch.randn(sum(lens_q), h, d, device=device)).requires_grad_()
    k, v = (torch.randn(sum(lens_k), h_kv, d, device=device).requires_grad_() for _ in range(2))
    out = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, softcap=cap, impl=impl)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[i]), int(cu_q[i + 1]))
        rk = slice(int(cu_k[i]), int(cu_k[i + 1]))
        if lq == 0:
            continue
        ours = (out[None, rq], None, grads[0][None, rq], grads[1][None, rk], grads[2][None, rk])
        qs, ks, vs = (t[None, r].detach() for t, r in ((q, rq), (k, rk), (v, rk)))
        oracle = _grads(qs, ks, vs, dout[None, rq], cap, torch.float64)
        lowp = _grads(qs, ks, vs, dout[None, rq], cap, torch.float32)
        for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
            if a is not None and lk > 0:
                assert_flash_rule(f"{name}[{i}]", a, o, p, torch.float32)


def _grads(q, k, v, dout, cap, dtype):
    qr, kr, vr = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qr, kr, vr, None, True, True, cap)
    return (out, lse, *torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype)))


@pytest.mark.parametrize("impl", IMPLS)
def test_kvcache_softcap_matches_oracle(impl, device):
    b, h, h_kv, d, cap = 2, 4, 2, 24, 2.0
    q = 3 * torch.randn(b, 1, h, d, device=device)
    kc, vc = (torch.randn(b, 40, h_kv, d, device=device) for _ in range(2))
    lens = torch.tensor([17, 40], dtype=torch.int32, device=device)
    out = fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, softcap=cap, causal=True, impl=impl)
    for i, n in enumerate([17, 40]):
        keys = kc[i:i + 1, :n], vc[i:i + 1, :n]
        o64, _ = attention_ref(q[i:i + 1].double(), *(t.double() for t in keys), None, True, True, cap)
        o32, _ = attention_ref(q[i:i + 1], *keys, None, True, True, cap)
        assert_flash_rule(f"out[{i}]", out[i:i + 1], o64, o32, torch.float32)


@pytest.mark.slow  # opcheck + compile: CI's slow run and the GPU check
def test_softcap_opcheck_and_compile(device):
    q, k, v = make_qkv(1, 19, 33, 4, 2, 32, torch.float32, device)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, 0.2, True, True, "fa2", 0, "auto", 3.0))
    out, lse = ops.attention_fwd(q.detach(), k.detach(), v.detach(), 0.2, True, True, "fa2", 0, "auto", 3.0)
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out,
                                              lse, None, 0.2, True, True, "fa2", "auto", 3.0))

    def f(q, k, v):
        return fm.flash_attn_func(q, k, v, causal=True, softcap=3.0)

    assert_compiles_like_eager(f, q, k, v)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_modules_pass_softcap(layout, device):
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, torch.float64, device, layout, requires_grad=False)
    q = q * 4.0
    attn = fm.FlashAttention(causal=True, softcap=1.5, layout=layout)
    want = fm.flash_attn_func(q, k, v, causal=True, softcap=1.5)  # Sq == Sk: both alignments agree
    got = attn(*(t if layout == "bshd" else t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(got if layout == "bshd" else got.transpose(1, 2), want)
    assert "softcap=1.5" in repr(attn)
    mha = fm.MultiheadFlashAttention(32, 2, causal=True, softcap=1.5, dtype=torch.float64, device=device)
    assert mha.attn.softcap == 1.5
