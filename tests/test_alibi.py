"""ALiBi (issue #13: BLOOM / MPT, flash-attn's ``alibi_slopes``): the score of query i and key j
gets ``-slope * |i + Sk - Sq - j|`` (per head; slopes (H,) or (B, H) fp32), in every entry point
that takes it, forward and backward, on the Triton kernels and the PyTorch path, against the
float64 oracle with flash-attn's 2x rule."""

from __future__ import annotations

import math

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.reference import attention_ref

from .helpers import assert_compiles_like_eager, assert_flash_rule, max_err

IMPLS = ["triton", "torch"]


def _slopes(h: int) -> torch.Tensor:
    """BLOOM's geometric slopes 2^(-8 i / H)."""
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float32)


def _grads(q, k, v, dout, causal, slopes, dtype, softcap=0.0):
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qr, kr, vr, None, causal, True, softcap, slopes)
    return (out, lse, *torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype)))


# (B, Sq, Sk, H, H_kv, D, causal, per_batch): Sq != Sk both ways, GQA, odd head dims.
CASES = [
    pytest.param(2, 37, 53, 4, 2, 40, True, False, id="37x53-gqa2-d40-causal"),
    pytest.param(2, 70, 33, 2, 2, 72, False, True, id="70x33-d72-full-per-batch", marks=pytest.mark.slow),
    pytest.param(1, 17, 17, 4, 1, 64, True, True, id="17x17-mqa-d64-causal-per-b", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fa2", pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal,per_batch", CASES)
def test_alibi_matches_oracle(b, sq, sk, h, h_kv, d, causal, per_batch, mode, impl, device):
    q = torch.randn(b, sq, h, d, device=device, requires_grad=True)
    k, v = (torch.randn(b, sk, h_kv, d, device=device, requires_grad=True) for _ in range(2))
    slopes = _slopes(h).to(device)
    if per_batch:
        slopes = torch.stack([slopes * (i + 1) for i in range(b)])  # (B, H)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, mode=mode, impl=impl,
                                     return_attn_probs=True)
    dout = torch.randn_like(out)
    ours = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    oracle = _grads(q, k, v, dout, causal, slopes, torch.float64)
    lowp = _grads(q, k, v, dout, causal, slopes, torch.float32)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
        assert_flash_rule(name, a, o, p, torch.float32)


def test_alibi_is_the_documented_bias_and_composes_with_softcap(device):
    """The probabilities are softmax(c tanh(s / c) - slope |i + Sk - Sq - j|), and the slopes
    change the answer (they are not ignored)."""
    q = torch.randn(1, 5, 2, 16, device=device, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 16, device=device, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.125], device=device)
    _, lse, probs = fm.flash_attn_func(q, k, k, softcap=2.0, alibi_slopes=slopes, return_attn_probs=True)
    s = 2.0 * torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16) / 2.0)
    dist = (torch.arange(5, device=device)[:, None] + 4 - torch.arange(9, device=device)[None, :]).abs()
    s = s - slopes.double()[None, :, None, None] * dist
    torch.testing.assert_close(probs, torch.softmax(s, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-12, rtol=0)
    assert max_err(fm.flash_attn_func(q, k, k, softcap=2.0), fm.flash_attn_func(q, k, k, softcap=2.0,
                                                                                alibi_slopes=slopes)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_alibi_per_sequence(impl, device):
    """(B, H) slopes in varlen: sequence b uses row b, distances from its own bottom-right."""
    h, d = 4, 32  # sequences of (3, 40), (0, 7) and (20, 20) queries and keys
    cu_q = torch.tensor([0, 3, 3, 23], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 47, 67], dtype=torch.int32, device=device)
    q = torch.randn(23, h, d, device=device, requires_grad=True)
    k, v = (torch.randn(67, 2, d, device=device, requires_grad=True) for _ in range(2))
    slopes = torch.rand(3, h, device=device)
    out = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes, impl=impl)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for i in (0, 2):
        rq, rk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        ours = (out[None, rq], grads[0][None, rq], grads[1][None, rk], grads[2][None, rk])
        args = [t[None, r].detach() for t, r in ((q, rq), (k, rk), (v, rk))]
        args += [dout[None, rq], True, slopes[i]]
        oracle, lowp = (_grads(*args, dt) for dt in (torch.float64, torch.float32))
        oracle, lowp = (t[:1] + t[2:] for t in (oracle, lowp))  # no LSE: varlen returns (H, Tq)
        for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, oracle, lowp):
            assert_flash_rule(f"{name}[{i}]", a, o, p, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_kvcache_alibi_decode_gqa(impl, device):
    """Decode with GQA (query heads packed per K/V head): each row uses its own head's slope."""
    b, h, h_kv, d = 2, 8, 2, 24
    q = torch.randn(b, 1, h, d, device=device)
    kc, vc = (torch.randn(b, 40, h_kv, d, device=device) for _ in range(2))
    lens = torch.tensor([17, 40], dtype=torch.int32, device=device)
    slopes = torch.rand(b, h, device=device)
    out = fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, alibi_slopes=slopes, causal=True,
                                     impl=impl)
    for i, n in enumerate([17, 40]):
        keys = kc[i:i + 1, :n], vc[i:i + 1, :n]
        o64, _ = attention_ref(q[i:i + 1].double(), *(t.double() for t in keys), None, True, True, 0.0,
                               slopes[i])
        o32, _ = attention_ref(q[i:i + 1], *keys, None, True, True, 0.0, slopes[i])
        assert_flash_rule(f"out[{i}]", out[i:i + 1], o64, o32, torch.float32)


@pytest.mark.slow  # opcheck + compile: CI's slow run and the GPU check
def test_alibi_opcheck_and_compile(device):
    q = torch.randn(1, 19, 4, 32, device=device, requires_grad=True)
    k, v = (torch.randn(1, 33, 2, 32, device=device, requires_grad=True) for _ in range(2))
    slopes = _slopes(4).to(device)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, 0.2, True, True, "fa2", 0, "auto", 0.0, slopes))

    def f(q, k, v):
        return fm.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)

    assert_compiles_like_eager(f, q, k, v)
