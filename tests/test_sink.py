"""Attention sinks (issue #13: gpt-oss, FA4's ``learnable_sink``): one logit per query head joins
every row's softmax denominator and attends to no value; its gradient is returned.  Dense (modes
fa2 and tiling), packed, varlen, KV cache; with a window and GQA; on the Triton kernels and the
PyTorch path, against the float64 oracle (a sink column in the score matrix) with flash-attn's 2x
rule, the sink's gradient included."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.reference import attention_ref

from .helpers import assert_compiles_like_eager, assert_flash_rule, make_qkv

IMPLS = ["triton", "torch"]


def _oracle(q, k, v, dout, causal, sink, dtype, window=(-1, -1)):
    """(out, lse, dq, dk, dv, dsink) of the naive reference in ``dtype``."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    sr = sink.detach().to(dtype).requires_grad_()
    out, lse = attention_ref(qr, kr, vr, None, causal, True, window_size=window, sink=sr)
    return (out, lse, *torch.autograd.grad(out, (qr, kr, vr, sr), dout.to(dtype)))


def _sink(h: int, device) -> torch.Tensor:
    """Logits around the scores' own size: the sink takes a real share of each row."""
    return (torch.randn(h, device=device) + 1.0).requires_grad_()


# (B, Sq, Sk, H, H_kv, D, causal, window)
CASES = [
    pytest.param(2, 37, 53, 4, 2, 40, True, (-1, -1), id="37x53-gqa2-d40-causal"),
    pytest.param(1, 150, 150, 2, 2, 32, True, (40, -1), id="150-causal-window40", marks=pytest.mark.slow),
    pytest.param(1, 70, 33, 2, 1, 72, False, (-1, -1), id="70x33-mqa-d72-full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fa2", pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal,window", CASES)
def test_sink_matches_oracle(b, sq, sk, h, h_kv, d, causal, window, dtype, mode, impl, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device)
    sink = _sink(h, device)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=causal, window_size=window, mode=mode, impl=impl,
                                     return_attn_probs=True, learnable_sink=sink)
    dout = torch.randn_like(out)
    ours = (out, lse, *torch.autograd.grad(out, (q, k, v, sink), dout))
    oracle = _oracle(q, k, v, dout, causal, sink, torch.float64, window)
    lowp = _oracle(q, k, v, dout, causal, sink, dtype, window)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv", "dsink"], ours, oracle, lowp):
        assert_flash_rule(name, a, o, p, dtype)
    assert ours[-1].dtype == sink.dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_sink_takes_mass_and_lse_includes_it(impl, device):
    """Each row's probabilities sum to 1 - exp(sink - lse) (the sink's share), and rows that see
    no key keep O = 0 with LSE = sink (Sq > Sk, causal)."""
    q, k, v = make_qkv(1, 12, 8, 2, 2, 16, torch.float64, device, requires_grad=False)
    sink = torch.tensor([0.5, -1.0], device=device)
    out, lse, probs = fm.flash_attn_func(q, k, v, causal=True, impl=impl, return_attn_probs=True,
                                         learnable_sink=sink)
    share = torch.exp(sink.double()[None, :, None] - lse.double())
    torch.testing.assert_close(probs.sum(-1) + share, torch.ones_like(share), atol=1e-12, rtol=0)
    assert (out[:, :4] == 0).all()  # rows 0-3 see no key
    want = sink.double()[:, None].expand(2, 4)
    torch.testing.assert_close(lse[0, :, :4].double(), want, atol=1e-12, rtol=0)


def test_loss_through_lse_reaches_the_sink(device):
    """A loss on the returned LSE (d lse / d sink = P_sink) flows into the sink's gradient."""
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, torch.float64, device, requires_grad=False)
    sink = torch.tensor([0.3, -0.2], device=device, dtype=torch.float64, requires_grad=True)
    out, lse, _ = fm.flash_attn_func(q, k, v, return_attn_probs=True, learnable_sink=sink)
    (out.sum() + lse.sum()).backward()
    sr = sink.detach().clone().requires_grad_()
    o, l_ = attention_ref(q, k, v, None, False, True, sink=sr)
    (o.sum() + l_.sum()).backward()
    torch.testing.assert_close(sink.grad, sr.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_sink(impl, device):
    lens_q, lens_k, h, h_kv, d = [3, 0, 40, 2], [50, 7, 40, 0], 4, 2, 32
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), h, d, device=device).requires_grad_()
    k, v = (torch.randn(sum(lens_k), h_kv, d, device=device).requires_grad_() for _ in range(2))
    sink = _sink(h, device)
    out, lse, _ = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, impl=impl, learnable_sink=sink,
                                            return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sink), dout)
    dsink64 = torch.zeros(h, dtype=torch.float64, device=device)
    dsink32 = torch.zeros(h, device=device)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[i]), int(cu_q[i + 1]))
        rk = slice(int(cu_k[i]), int(cu_k[i + 1]))
        if lq == 0:
            continue
        if lk == 0:  # the sink alone: O = 0, LSE = sink, no gradient from these rows
            assert (out[rq] == 0).all()
            torch.testing.assert_close(lse[:, rq], sink.detach()[:, None].expand(h, lq))
            continue
        qs, ks, vs = (t[None, r].detach() for t, r in ((q, rq), (k, rk), (v, rk)))
        oracle = _oracle(qs, ks, vs, dout[None, rq], True, sink, torch.float64)
        lowp = _oracle(qs, ks, vs, dout[None, rq], True, sink, torch.float32)
        ours = (out[None, rq], lse[None, :, rq], grads[0][None, rq], grads[1][None, rk], grads[2][None, rk])
        for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
            assert_flash_rule(f"{name}[{i}]", a, o, p, torch.float32)
        dsink64 += oracle[-1]
        dsink32 += lowp[-1]
    assert_flash_rule("dsink", grads[3], dsink64, dsink32, torch.float32)


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("impl", IMPLS)
def test_kvcache_sink_decode_gqa(impl, splits, device):
    """Decode with GQA-packed rows: the sink joins in the kernel (one split) or in the combine."""
    b, h, h_kv, d = 2, 8, 2, 32
    q = torch.randn(b, 1, h, d, device=device)
    kc, vc = (torch.randn(b, 200, h_kv, d, device=device) for _ in range(2))
    lens = [150, 0]
    sink = torch.randn(h, device=device)
    out, lse = fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                                                                 device=device),
                                          num_splits=splits, impl=impl, learnable_sink=sink,
                                          return_softmax_lse=True)
    o64, l64 = attention_ref(q[:1].double(), kc[:1, :150].double(), vc[:1, :150].double(), sink=sink)
    o32, l32 = attention_ref(q[:1], kc[:1, :150], vc[:1, :150], sink=sink)
    assert_flash_rule("out", out[:1], o64, o32, torch.float32)
    assert_flash_rule("lse", lse[:1], l64, l32, torch.float32)
    assert (out[1] == 0).all()  # an empty cache: the sink alone
    torch.testing.assert_close(lse[1], sink[:, None])


@pytest.mark.slow  # opcheck + compile: CI's slow run and the GPU check
def test_sink_opcheck_and_compile(device):
    q, k, v = make_qkv(1, 19, 33, 4, 2, 32, torch.float32, device)
    sink = _sink(4, device)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, 0.2, True, True, "fa2", 0, "auto", 0.0, None, -1, -1,
                                              sink))
    out, lse = ops.attention_fwd(q.detach(), k.detach(), v.detach(), 0.2, True, True, "fa2", 0, "auto", 0.0,
                                 None, -1, -1, sink.detach())
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(ops.sink_grad_op, (sink.detach(), out, torch.randn_like(out), lse, dlse))

    def f(q, k, v, sink):
        return fm.flash_attn_func(q, k, v, causal=True, learnable_sink=sink)

    assert_compiles_like_eager(f, q, k, v, sink)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_modules_and_sdpa_pass_the_sink(layout, device):
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, torch.float64, device, layout, requires_grad=False)
    sink = torch.tensor([0.4, -0.3], device=device, dtype=torch.float64)
    attn = fm.FlashAttention(causal=True, layout=layout)
    want = fm.flash_attn_func(q, k, v, causal=True, learnable_sink=sink)  # Sq == Sk: alignments agree
    got = attn(*(t if layout == "bshd" else t.transpose(1, 2) for t in (q, k, v)), learnable_sink=sink)
    torch.testing.assert_close(got if layout == "bshd" else got.transpose(1, 2), want)


def test_multihead_module_learns_its_sinks(device):
    """``MultiheadFlashAttention(sinks=True)``: a (H,) parameter in the state dict, in the
    attention (the output differs from no sink once it moves), with a gradient; KV-cache decoding
    uses it too."""
    torch.manual_seed(0)
    mha = fm.MultiheadFlashAttention(32, 4, num_kv_heads=2, causal=True, sinks=True, dtype=torch.float64,
                                     device=device)
    assert "sinks" in mha.state_dict() and mha.sinks.shape == (4,)
    x = torch.randn(2, 7, 32, device=device, dtype=torch.float64)
    mha(x).sum().backward()
    assert mha.sinks.grad is not None and mha.sinks.grad.abs().sum() > 0
    with torch.no_grad():
        mha.sinks.fill_(2.0)
        full = mha(x)
        mha.allocate_kv_cache(2, 16)
        seqlens = torch.zeros(2, dtype=torch.int32, device=device)
        prompt = mha(x[:, :6], cache_seqlens=seqlens)
        step = mha(x[:, 6:], cache_seqlens=seqlens + 6)
    torch.testing.assert_close(torch.cat([prompt, step], 1), full)
