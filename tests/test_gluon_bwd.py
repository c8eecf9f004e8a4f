"""GPU-only (Hopper): the Gluon dK/dV and dQ passes (``kernels/gluon_bwd.py``) on ragged shapes, against
the float64 oracle (the 2x rule) and against the portable Triton pass it replaces.  Skipped
without an sm_90 GPU or without Gluon in the installed Triton; on CPU, :func:`supported` must
say no (the interpreter runs the portable kernel)."""

from __future__ import annotations

import pytest
import torch

from flash_module import ops
from flash_module.kernels import gluon_bwd

from .helpers import assert_flash_rule, make_qkv, reference_grads

CASES = [  # b, sq, sk, h, h_kv, d, dtype
    pytest.param(2, 113, 203, 4, 4, 128, torch.bfloat16, id="113x203-d128-bf16"),
    pytest.param(2, 203, 113, 4, 2, 128, torch.float16, id="203x113-d128-gqa-fp16"),
    pytest.param(1, 1, 17, 2, 2, 64, torch.bfloat16, id="1x17-d64-bf16"),
    pytest.param(3, 17, 1, 2, 1, 64, torch.float16, id="17x1-d64-mqa-fp16"),
    pytest.param(1, 1024, 1024, 4, 1, 128, torch.bfloat16, id="1k-d128-mqa-bf16"),
    pytest.param(2, 2048, 1000, 2, 2, 64, torch.bfloat16, id="2048x1000-d64-bf16"),
    pytest.param(1, 4095, 4097, 2, 2, 128, torch.float16, id="4095x4097-d128-fp16"),
    pytest.param(2, 113, 203, 2, 2, 256, torch.bfloat16, id="113x203-d256-bf16"),
    pytest.param(1, 1000, 1100, 4, 2, 256, torch.float16, id="1000x1100-d256-gqa-fp16"),
]
#: launch configs (dK/dV, dQ; None: the head dim's default); 64 x 128 tiles do not fit D=256
CONFIGS = [
    pytest.param(None, None, id="default"),
    pytest.param((64, 64, 8), (64, 64, 8), id="w8-64x64"),
    pytest.param((64, 128, 8), None, id="dkdv64x128w8"),
]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and gluon_bwd.HAVE_GLUON


def test_not_used_off_hopper_or_with_variants():
    """Off a GPU (and with any variant) the portable pass runs."""
    q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)
    assert not gluon_bwd.supported(q, q, q, q, variants=False)
    if _hopper():
        qc = q.cuda()
        assert gluon_bwd.supported(qc, qc, qc, qc, variants=False)
        assert not gluon_bwd.supported(qc, qc, qc, qc, variants=True)
        assert not gluon_bwd.supported(qc.transpose(1, 2).contiguous().transpose(1, 2), qc, qc, qc, False)
        assert not gluon_bwd.supported(qc.float(), qc.float(), qc.float(), qc.float(), False)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("dkdv_config,dq_config", CONFIGS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,dtype", CASES)
def test_gluon_backward_matches_oracle_and_portable(b, sq, sk, h, h_kv, d, dtype, causal, dkdv_config,
                                                    dq_config, monkeypatch):
    if d == 256 and dkdv_config and dkdv_config[:2] == (64, 128):
        pytest.skip("64 x 128 tiles at D=256 exceed shared memory or registers")
    monkeypatch.setattr(gluon_bwd, "DQ_HEAD_DIMS", gluon_bwd.HEAD_DIMS)  # both passes in Gluon
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", False)  # (two passes: the one-pass test is below)
    for name, config in (("DKDV_CONFIGS", dkdv_config), ("DQ_CONFIGS", dq_config)):
        configs = getattr(gluon_bwd, name)
        monkeypatch.setattr(gluon_bwd, name, {**configs, d: config or configs[d]})
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, dtype=dtype, device="cuda")
    scale = d**-0.5
    out, lse = ops.attention_fwd(q, k, v, scale, causal, True, "fa2")
    assert gluon_bwd.supported(q, k, v, dout, variants=False)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), dout)  # deterministic: no atomics
    assert all(torch.equal(a, b) for a, b in zip(again, (dq, dk, dv)))
    monkeypatch.setattr(gluon_bwd, "ENABLED", False)
    out2, _ = ops.attention_fwd(q, k, v, scale, causal, True, "fa2")
    dq_portable, dk_portable, dv_portable = torch.autograd.grad(out2, (q, k, v), dout)
    _, _, dq_hi, dk_hi, dv_hi = reference_grads(q, k, v, dout, causal, True, dtype=torch.float64)
    _, _, dq_lo, dk_lo, dv_lo = reference_grads(q, k, v, dout, causal, True)
    assert_flash_rule("dq", dq, dq_hi, dq_lo, dtype)
    assert_flash_rule("dk", dk, dk_hi, dk_lo, dtype)
    assert_flash_rule("dv", dv, dv_hi, dv_lo, dtype)
    # the same algorithm: as close to the portable pass as two roundings of one fp32 sum
    pairs = (("dq", dq, dq_portable, dq_hi), ("dk", dk, dk_portable, dk_hi), ("dv", dv, dv_portable, dv_hi))
    for name, ours, portable, hi in pairs:
        gap = (ours.double() - portable.double()).abs().max().item()
        assert gap <= 2 * (portable.double() - hi).abs().max().item() + 1e-2, (name, gap)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_backward_keeps_a_nan_in_its_sequence(d, monkeypatch):
    """The Gluon passes read 3-D TMA boxes (zeros past a sequence's end, never the next
    sequence's rows): NaN queries, keys, values and output gradients in batch entry 1 leave the
    gradients of entries 0 and 2 exact (70 queries and 100 keys: every pass's last tile runs
    past its sequence).  At D=64 the one-pass backward (dQ added by TMA reductions, whose box
    clips at the sequence's end too) sums dQ in no fixed order: there dQ is compared up to
    rounding, and must be finite."""
    monkeypatch.setattr(gluon_bwd, "DQ_HEAD_DIMS", gluon_bwd.HEAD_DIMS)
    q, k, v = make_qkv(3, 70, 100, 2, 2, d, torch.bfloat16, "cuda")
    dout = torch.randn(3, 70, 2, d, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for t in (q, k, v):
            t[1] = float("nan")
    dout[1] = float("nan")
    assert gluon_bwd.supported(q, k, v, dout, variants=False)
    out, _ = ops.attention_fwd(q, k, v, d**-0.5, True, True, "fa2")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for i in (0, 2):
        qi, ki, vi = (t[i:i + 1].detach().requires_grad_() for t in (q, k, v))
        out_i, _ = ops.attention_fwd(qi, ki, vi, d**-0.5, True, True, "fa2")
        alone = torch.autograd.grad(out_i, (qi, ki, vi), dout[i:i + 1])
        one_pass = gluon_bwd.fused_dq_takes(d)
        assert torch.isfinite(grads[0][i]).all()
        if one_pass:
            torch.testing.assert_close(grads[0][i:i + 1], alone[0], rtol=2**-7, atol=1e-3)
        assert all(torch.equal(g[i:i + 1], a) for g, a in list(zip(grads, alone))[one_pass:])


def test_fused_dq_routing(monkeypatch):
    """The one-pass backward (dQ by atomics in the dK/dV pass) runs only with its flag, at its
    head dims, and never under ``torch.use_deterministic_algorithms(True)`` (atomic sums are not
    bitwise reproducible): then the two passes run."""
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", True)
    assert gluon_bwd.fused_dq_takes(64) and not gluon_bwd.fused_dq_takes(128)
    assert not gluon_bwd.fused_dq_takes(64, deterministic=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not gluon_bwd.fused_dq_takes(64)
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", False)
    assert not gluon_bwd.fused_dq_takes(64)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("add", ["tma", "atomics"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])  # D=128: two warpgroups, 64 x 128 tiles
@pytest.mark.parametrize("variant", ["plain", "softcap", "alibi", "window", "dropout"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,dtype", [
    pytest.param(2, 113, 203, 4, 2, torch.bfloat16, id="113x203-gqa-bf16"),
    pytest.param(1, 1, 17, 2, 2, torch.float16, id="1x17-fp16"),
    pytest.param(2, 1000, 2048, 2, 1, torch.bfloat16, id="1000x2048-mqa-bf16"),
    pytest.param(1, 2100, 700, 4, 4, torch.float16, id="2100x700-fp16"),
])
def test_fused_dq_matches_the_two_passes(b, sq, sk, h, h_kv, dtype, causal, variant, d, add, monkeypatch):
    """``gluon_bwd.FUSED_DQ`` (D=64 on one warpgroup; D=128, opt-in below, on two), each dQ tile
    added by a TMA reduction or by atomics (``FUSED_DQ_TMA``): dK and dV are the two-pass
    backward's bit for bit where the launch config is the same (D=64; at D=128 the sums run in
    another order, so they keep the 2x rule), dQ equals its dQ up to the order of one fp32 sum
    (atomics), and plain dQ keeps the 2x rule against the float64 oracle."""
    import flash_module as fm

    monkeypatch.setattr(gluon_bwd, "FUSED_DQ_HEAD_DIMS", (64, 128))
    if add == "tma" and not gluon_bwd.HAVE_TMA_ADD:
        pytest.skip("this Gluon has no TMA reduction")
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ_TMA", add == "tma")
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, dtype=dtype, device="cuda")
    kw = dict(causal=causal)
    if variant == "softcap":
        kw["softcap"] = 20.0
    elif variant == "alibi":
        kw["alibi_slopes"] = torch.rand(b, h, device="cuda")
    elif variant == "window":
        kw["window_size"] = (100, 30)
    p = 0.15 if variant == "dropout" else 0.0

    def grads():
        torch.manual_seed(3)
        out = fm.flash_attn_func(q, k, v, p, **kw)
        return torch.autograd.grad(out, (q, k, v), dout)

    assert gluon_bwd.supported(q, k, v, dout, variants=False)
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", False)
    assert not gluon_bwd.fused_dq_takes(d)
    dq2, dk2, dv2 = grads()
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", True)
    assert gluon_bwd.fused_dq_takes(d)
    dq1, dk1, dv1 = grads()
    def one_rounding_apart(one, two):
        scale = two.float().abs().max().item()
        torch.testing.assert_close(one.float(), two.float(), rtol=2**-7, atol=1e-4 * scale)

    if d == 64:  # the two passes' dK/dV config: the same sums
        assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2)
    else:
        one_rounding_apart(dk1, dk2)
        one_rounding_apart(dv1, dv2)
    one_rounding_apart(dq1, dq2)
    if variant == "plain":
        _, _, dq_hi, dk_hi, dv_hi = reference_grads(q, k, v, dout, causal, True, dtype=torch.float64)
        _, _, dq_lo, dk_lo, dv_lo = reference_grads(q, k, v, dout, causal, True)
        assert_flash_rule("dq", dq1, dq_hi, dq_lo, dtype)
        assert_flash_rule("dk", dk1, dk_hi, dk_lo, dtype)
        assert_flash_rule("dv", dv1, dv_hi, dv_lo, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("how", ["argument", "torch"])
def test_deterministic_backward_is_the_two_passes(how, restore_deterministic_algorithms, monkeypatch):
    """flash-attn's ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) at
    D=64, where the default backward is one pass with dQ added by TMA reductions: the two-pass
    backward runs, bit for bit what it gives with the one-pass backward turned off, every time."""
    import flash_module as fm

    q, k, v = make_qkv(2, 300, 500, 4, 2, 64, torch.bfloat16, "cuda")
    dout = torch.randn(2, 300, 4, 64, dtype=torch.bfloat16, device="cuda")

    def grads(deterministic):
        out = fm.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        return torch.autograd.grad(out, (q, k, v), dout)

    if how == "torch":
        torch.use_deterministic_algorithms(True, warn_only=True)
    runs = [grads(how == "argument") for _ in range(2)]
    torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(gluon_bwd, "FUSED_DQ", False)
    two_pass = grads(False)
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run, two_pass))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
def test_one_pass_backward_under_cuda_graphs():
    """The one-pass D=64 backward (a zeroed fp32 dQ buffer, host-built TMA descriptors, TMA
    reductions) captured in a CUDA graph: each replay on new inputs gives the eager gradients
    (dK, dV bit for bit; dQ up to the order of its fp32 sums)."""
    import flash_module as fm

    assert gluon_bwd.fused_dq_takes(64)
    q, k, v = make_qkv(2, 200, 333, 4, 2, 64, torch.bfloat16, "cuda")
    dout = torch.randn(2, 200, 4, 64, dtype=torch.bfloat16, device="cuda")
    inputs = [t.detach().clone() for t in (q, k, v, dout)]

    def step():
        a, b, c = (t.requires_grad_() for t in inputs[:3])
        out = fm.flash_attn_func(a, b, c, causal=True)
        return torch.autograd.grad(out, (a, b, c), inputs[3])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        fresh = make_qkv(2, 200, 333, 4, 2, 64, torch.bfloat16, "cuda") + (torch.randn_like(dout),)
        with torch.no_grad():
            for dst, src in zip(inputs, fresh):
                dst.copy_(src)
        graph.replay()
        eager = step()
        torch.testing.assert_close(static[0], eager[0], rtol=2**-7, atol=1e-3)
        assert torch.equal(static[1], eager[1]) and torch.equal(static[2], eager[2])
