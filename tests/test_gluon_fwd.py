"""GPU-only (Hopper): the warp-specialized Gluon forward (``kernels/gluon_fwd.py``) on ragged shapes,
against the float64 oracle (the 2x rule, output and LSE, and the gradients the backward computes from them)
and against the portable Triton forward it replaces.  Skipped without an sm_90 GPU or without
Gluon in the installed Triton; on CPU, :func:`supported` must say no (the interpreter runs the
portable kernel)."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.kernels import gluon_fwd
from flash_module.reference import attention_ref

from .helpers import assert_flash_rule, assert_matches_reference, make_qkv, reference_grads

CASES = [  # b, sq, sk, h, h_kv, d, dtype
    pytest.param(2, 113, 203, 4, 4, 128, torch.bfloat16, id="113x203-d128-bf16"),
    pytest.param(2, 203, 113, 4, 2, 128, torch.float16, id="203x113-d128-gqa-fp16"),
    pytest.param(1, 1, 17, 2, 2, 64, torch.bfloat16, id="1x17-d64-bf16"),
    pytest.param(3, 17, 1, 2, 1, 64, torch.float16, id="17x1-d64-mqa-fp16"),
    pytest.param(2, 2048, 1000, 2, 2, 64, torch.bfloat16, id="2048x1000-d64-bf16"),
    pytest.param(1, 4095, 4097, 2, 2, 128, torch.float16, id="4095x4097-d128-fp16"),
    pytest.param(2, 113, 203, 2, 2, 256, torch.bfloat16, id="113x203-d256-bf16"),
    pytest.param(1, 1000, 1100, 4, 2, 256, torch.float16, id="1000x1100-d256-gqa-fp16"),
]
MASKS = [  # causal, bottom_right
    pytest.param(False, True, id="full"),
    pytest.param(True, True, id="causal-bottom-right"),
    pytest.param(True, False, id="causal-top-left"),
]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and gluon_fwd.HAVE_GLUON


def test_not_used_off_hopper_or_with_variants():
    """Off a GPU (and with any variant, or storage not dense in (S, H, D)) the portable forward runs."""
    q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)
    assert not gluon_fwd.supported(q, q, q, variants=False)
    if _hopper():
        qc = q.cuda()
        assert gluon_fwd.supported(qc, qc, qc, variants=False)
        assert not gluon_fwd.supported(qc, qc, qc, variants=True)
        assert not gluon_fwd.supported(qc.transpose(1, 2).contiguous().transpose(1, 2), qc, qc, False)
        assert not gluon_fwd.supported(qc.float(), qc.float(), qc.float(), False)
        assert not gluon_fwd.supported(qc[..., :96].contiguous(), qc[..., :96].contiguous(),
                                       qc[..., :96].contiguous(), False)  # head dim without a config
        q64 = torch.randn(1, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
        assert not gluon_fwd.supported(q64, q64, q64, False)  # D=64, short keys, causal: portable
        assert gluon_fwd.supported(q64, q64, q64, False, masked=False)  # ... without a mask: Gluon
        out, lse = ops.attention_fwd(qc, qc, qc, -0.1, False, True, "fa2")  # a negative scale: portable
        ref = reference_grads(qc, qc, qc, out, False, True, softmax_scale=-0.1, dtype=torch.float64)
        assert (out.double() - ref[0]).abs().max() < 1e-2


def test_short_causal_calls_take_their_config():
    """Causal calls with few keys take the short config at D=128 (its cases above: 113x203 and
    203x113 causal); longer, non-causal or other head dims keep the default."""
    short = gluon_fwd.SHORT_CAUSAL_CONFIGS[128]
    assert short[1] == short[0] // 2  # BLOCK_N = one consumer's rows: the diagonal skip applies
    assert gluon_fwd.config_for(128, True, gluon_fwd.SHORT_CAUSAL_KEYS) == short
    assert gluon_fwd.config_for(128, True, 113) == short
    assert gluon_fwd.config_for(128, True, gluon_fwd.SHORT_CAUSAL_KEYS + 1) == gluon_fwd.FWD_CONFIGS[128]
    assert gluon_fwd.config_for(128, False, 113) == gluon_fwd.FWD_CONFIGS[128]
    assert gluon_fwd.config_for(256, True, 113) == gluon_fwd.FWD_CONFIGS[256]


def _forward(q, k, v, causal, bottom_right):
    return ops.attention_fwd(q, k, v, q.shape[-1] ** -0.5, causal, bottom_right, "fa2")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("causal,bottom_right", MASKS)
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,dtype", CASES)
def test_gluon_forward_matches_oracle_and_portable(b, sq, sk, h, h_kv, d, dtype, causal, bottom_right,
                                                   monkeypatch):
    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)  # the kernel at every length
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, dtype=dtype, device="cuda")
    assert gluon_fwd.supported(q, k, v, variants=False)
    out, lse = _forward(q, k, v, causal, bottom_right)
    again = _forward(q, k, v, causal, bottom_right)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])  # deterministic
    grads = torch.autograd.grad(out, (q, k, v), dout)  # the backward from this forward's LSE
    assert_matches_reference((out, lse, *grads), q, k, v, dout, causal, bottom_right, dtype)
    monkeypatch.setattr(gluon_fwd, "ENABLED", False)
    out_p, lse_p = _forward(q, k, v, causal, bottom_right)
    ref = reference_grads(q, k, v, dout, causal, bottom_right, dtype=torch.float64)
    for name, ours, portable, hi in (("out", out, out_p, ref[0]), ("lse", lse, lse_p, ref[1])):
        finite = torch.isfinite(hi)
        assert torch.equal(torch.isfinite(ours), finite), name  # rows that see no key: same -inf / 0
        gap = (ours.double() - portable.double())[finite].abs().max().item() if finite.any() else 0.0
        assert gap <= 2 * (portable.double() - hi)[finite].abs().max().item() + 1e-3, (name, gap)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_a_nan_in_one_sequence_stays_there(d, monkeypatch):
    """Key blocks that run past a sequence's end read zeros (3-D TMA boxes), not the next
    sequence's rows: NaN keys and values in batch entry 1 leave entries 0 and 2 exact."""
    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)
    q, k, v = make_qkv(3, 70, 100, 2, 2, d, torch.bfloat16, "cuda", requires_grad=False)
    k[1], v[1] = float("nan"), float("nan")
    out, lse = _forward(q, k, v, False, True)
    for i in (0, 2):
        alone = _forward(q[i:i + 1], k[i:i + 1], v[i:i + 1], False, True)
        assert torch.equal(out[i:i + 1], alone[0]) and torch.equal(lse[i:i + 1], alone[1])
    assert out[1].isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
def test_fp32_output_for_ring_partials():
    """Ring attention asks for fp32 partial outputs (``out_dtype``): the Gluon forward stores them
    unrounded, the same values as its bf16 output before rounding."""
    from flash_module.kernels.fa2_fwd import fa2_forward

    q, k, v = make_qkv(2, 300, 500, 4, 2, 128, torch.bfloat16, "cuda", requires_grad=False)
    out32, lse32 = fa2_forward(q, k, v, 128**-0.5, True, 200, out_dtype=torch.float32)
    out16, lse16 = fa2_forward(q, k, v, 128**-0.5, True, 200)
    assert out32.dtype == torch.float32 and torch.equal(lse32, lse16)
    assert torch.equal(out32.to(torch.bfloat16), out16)


VARIANTS = [  # softcap, alibi slopes shape, sink, window_size
    pytest.param(30.0, None, False, (-1, -1), id="softcap"),
    pytest.param(0.0, "h", False, (-1, -1), id="alibi-h"),
    pytest.param(0.0, "bh", False, (-1, -1), id="alibi-bh"),
    pytest.param(0.0, "h", False, (300, 70), id="alibi-window"),
    pytest.param(0.0, None, True, (-1, -1), id="sink"),
    pytest.param(0.0, None, False, (100, 0), id="window-100-0"),
    pytest.param(0.0, None, False, (37, 150), id="window-37-150"),
    pytest.param(0.0, None, False, (-1, 20), id="window-left-unbounded"),
    pytest.param(20.0, "h", True, (200, 3), id="softcap-alibi-sink-window"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("softcap,alibi,sink,window", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d", [(2, 203, 113, 4, 2, 128), (1, 113, 300, 2, 1, 256),
                                              (2, 1000, 1100, 2, 2, 64)], ids=["203x113-d128", "113x300-d256",
                                                                                "1000x1100-d64"])
def test_gluon_forward_variants(b, sq, sk, h, h_kv, d, causal, softcap, alibi, sink, window, monkeypatch):
    """Softcap, ALiBi, attention sinks and sliding windows in the Gluon forward
    (``gluon_fwd.VARIANTS``): output and LSE against the float64 oracle with the 2x rule,
    gradients too (the Gluon backward's variants, ``gluon_bwd.VARIANTS``: its dK/dV pass at
    every head dim, its warp-specialized dQ at D=64/128, the portable dQ at D=256)."""
    monkeypatch.setattr(gluon_fwd, "VARIANTS", True)
    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)
    dtype = torch.bfloat16
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, "cuda")
    slopes = None if alibi is None else (torch.rand(h if alibi == "h" else (b, h), device="cuda") * 0.3)
    sink_t = (torch.randn(h, device="cuda") + 1.0).requires_grad_() if sink else None
    assert gluon_fwd.supported(q, k, v, False)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                     alibi_slopes=slopes, return_attn_probs=True, learnable_sink=sink_t)
    dout = torch.randn_like(out)
    inputs = (q, k, v) + ((sink_t,) if sink else ())
    grads = torch.autograd.grad(out, inputs, dout)

    def oracle(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in inputs]
        o, l_ = attention_ref(*xs[:3], None, causal, True, softcap, slopes, window,
                              sink=xs[3] if sink else None)
        return (o, l_, *torch.autograd.grad(o, xs, dout.to(dt)))

    hi, lo = oracle(torch.float64), oracle(dtype)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv", "dsink"], (out, lse, *grads), hi, lo):
        assert_flash_rule(name, a, o, p, dtype)


# -- packed sequences (varlen): per-sequence TMA descriptors built on the device ---------------

VARLEN_CASES = [  # lengths_q, lengths_k, h, h_kv, d, dtype, seqused_k
    pytest.param([17, 0, 1, 113, 250], [17, 0, 1, 113, 250], 4, 4, 128, torch.bfloat16, None,
                 id="self-d128-bf16"),
    pytest.param([5, 300, 1], [33, 20, 203], 4, 2, 128, torch.float16, None, id="cross-gqa-d128-fp16"),
    pytest.param([129, 64, 3], [129, 64, 3], 2, 1, 64, torch.bfloat16, None, id="mqa-d64-bf16"),
    pytest.param([70, 200], [100, 90], 2, 2, 256, torch.bfloat16, None, id="cross-d256-bf16"),
    pytest.param([9, 130, 4], [40, 300, 11], 2, 1, 128, torch.bfloat16, [17, 0, 11], id="seqused-d128"),
]


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k,h,h_kv,d,dtype,used", VARLEN_CASES)
def test_gluon_varlen_matches_oracle_and_portable(lens_q, lens_k, h, h_kv, d, dtype, used, causal,
                                                  monkeypatch):
    """The Gluon varlen forward and backward passes (zero and one-token sequences, odd lengths,
    Sq != Sk both ways, GQA/MQA, seqused_k): out, lse and the gradients of out and lse against
    the float64 oracle sequence by sequence (2x rule), and against the portable varlen kernels."""
    from flash_module.kernels import gluon_bwd
    from flash_module.kernels.varlen import varlen_backward, varlen_forward

    from .test_varlen import _oracle, _pack

    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)  # the kernel at every length
    q, cu_q = _pack(lens_q, h, d, dtype, "cuda")
    k, cu_k = _pack(lens_k, h_kv, d, dtype, "cuda")
    v, dout = torch.randn_like(k), torch.randn_like(q)
    seqused = None if used is None else torch.tensor(used, dtype=torch.int32, device="cuda")
    dlse = torch.randn(h, q.shape[0], device="cuda")
    args = (q, k, v, dout, dlse.double(), cu_q, cu_k, used, d**-0.5, causal)
    hi, lo = _oracle(*args, torch.float64), _oracle(*args, dtype)
    assert gluon_fwd.varlen_supported(q, k, v, False) and gluon_bwd.varlen_supported(q, k, v, dout, False)

    def run():
        out, lse = varlen_forward(q, k, v, cu_q, cu_k, d**-0.5, causal, seqused)
        grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, d**-0.5, causal, seqused,
                                dlse.masked_fill(lse.isinf(), 0))
        return out, lse, *grads

    calls = []
    for module, name in ((gluon_fwd, "varlen_forward"), (gluon_bwd, "varlen_dkdv"), (gluon_bwd, "varlen_dq")):
        _spy(monkeypatch, module, name, calls)
    ours = run()
    assert set(calls) == {"varlen_forward", "varlen_dkdv"} | ({"varlen_dq"} if d != 256 else set()), calls
    assert all(torch.equal(a, b) for a, b in zip(ours, run()))  # deterministic
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert_flash_rule(name, ours[i], hi[i], lo[i], dtype)
    finite = torch.isfinite(hi[1])
    assert torch.equal(torch.isfinite(ours[1]), finite)  # -inf exactly where a row sees no key
    assert torch.allclose(ours[1].double()[finite], hi[1][finite], atol=1e-3, rtol=0)
    monkeypatch.setattr(gluon_fwd, "VARLEN", False)
    monkeypatch.setattr(gluon_bwd, "VARLEN", False)
    portable = run()
    for name, a, pt, o in zip(["out", "lse", "dq", "dk", "dv"], ours, portable, hi):
        ok = torch.isfinite(o)
        assert torch.equal(torch.isfinite(pt), ok), name
        gap = (a.double() - pt.double())[ok].abs().max().item() if ok.any() else 0.0
        assert gap <= 2 * (pt.double() - o)[ok].abs().max().item() + 1e-3, (name, gap)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gluon_varlen_keeps_a_nan_in_its_sequence(d, monkeypatch):
    """Each program's descriptors end at its own sequence's end: NaN rows of sequence 1, and NaN
    rows past the last sequence (an unfilled buffer), leave sequences 0 and 2 exactly as they
    are alone, forward and backward."""
    from flash_module.kernels.varlen import varlen_backward, varlen_forward

    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)
    lens = [70, 45, 100]
    q, k, v, dout = (torch.randn(sum(lens) + 30, 2, d, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    for t in (q, k, v, dout):
        t[70:115] = float("nan")
        t[215:] = float("nan")
    cu = torch.tensor([0, 70, 115, 215], dtype=torch.int32, device="cuda")

    def run(q, k, v, dout, cu):
        out, lse = varlen_forward(q, k, v, cu, cu, d**-0.5, True)
        return out, lse, *varlen_backward(dout, q, k, v, out, lse, cu, cu, d**-0.5, True)

    packed = run(q, k, v, dout, cu)
    for lo, hi in ((0, 70), (115, 215)):
        one = torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda")
        alone = run(q[lo:hi], k[lo:hi], v[lo:hi], dout[lo:hi], one)
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], packed, alone):
            part = a[:, lo:hi] if name == "lse" else a[lo:hi]
            assert torch.equal(part, b), name
    assert packed[0][70:115].isnan().all() and (packed[0][215:] == 0).all()
    assert all((g[215:] == 0).all() for g in packed[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("softcap,alibi,sink,window", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_varlen_variants(causal, softcap, alibi, sink, window, monkeypatch):
    """Softcap, ALiBi ((H,) and (B, H)), sinks and windows in the Gluon varlen forward and
    backward, against the float64 oracle run sequence by sequence (2x rule): out, lse and the
    gradients (the sink's too)."""
    from flash_module.kernels import gluon_bwd

    from .test_varlen import _pack

    monkeypatch.setattr(gluon_fwd, "VARIANTS", True)
    monkeypatch.setattr(gluon_bwd, "VARIANTS", True)
    lens_q, lens_k, h, h_kv, d, dtype = [203, 1, 60], [113, 40, 300], 4, 2, 128, torch.bfloat16
    q, cu_q = _pack(lens_q, h, d, dtype, "cuda")
    k, cu_k = _pack(lens_k, h_kv, d, dtype, "cuda")
    v = torch.randn_like(k)
    b = len(lens_q)
    slopes = None if alibi is None else (torch.rand(h if alibi == "h" else (b, h), device="cuda") * 0.3)
    sink_t = torch.randn(h, device="cuda") + 1.0 if sink else None
    inputs = (q, k, v) + ((sink_t,) if sink else ())
    assert gluon_fwd.varlen_supported(q, k, v, False) and gluon_bwd.varlen_supported(q, k, v, q, False)
    calls = []
    for module, name in ((gluon_fwd, "varlen_forward"), (gluon_bwd, "varlen_dkdv"), (gluon_bwd, "varlen_dq")):
        _spy(monkeypatch, module, name, calls)
    xs = [t.detach().requires_grad_() for t in inputs]
    out, lse, _ = fm.flash_attn_varlen_func(*xs[:3], cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                            window_size=window, softcap=softcap, alibi_slopes=slopes,
                                            return_attn_probs=True, learnable_sink=xs[3] if sink else None)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, dout)
    assert set(calls) == {"varlen_forward", "varlen_dkdv", "varlen_dq"}, calls

    def oracle(dt):
        ys = [t.detach().to(dt).requires_grad_() for t in inputs]
        outs, lses = [], []
        for i in range(b):
            qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[i:i + 1])
            seq = (ys[0][None, qs:qe], ys[1][None, ks:ke], ys[2][None, ks:ke])
            o, l_ = attention_ref(*seq, None, causal, True, softcap, sl, window, sink=ys[3] if sink else None)
            outs.append(o[0])
            lses.append(l_[0])
        o = torch.cat(outs)
        return (o, torch.cat(lses, 1), *torch.autograd.grad(o, ys, dout.to(dt)))

    hi, lo = oracle(torch.float64), oracle(dtype)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv", "dsink"], (out, lse, *grads), hi, lo):
        assert_flash_rule(name, a, o, p, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
def test_gluon_varlen_cuda_graph_replays_for_new_lengths():
    """The Gluon varlen passes under CUDA-graph capture (their descriptor scratch comes from the
    graph's memory pool): captured once, replayed with other cu_seqlens of the same total, each
    replay equal to an eager call, forward and backward."""
    from .test_varlen import _cu

    shape = (700, 4, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    cu = _cu([300, 250, 150], "cuda")

    def step():
        out = fm.flash_attn_varlen_func(q, k, v, cu, cu, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()  # warm up (compile, autograd's first use) on a side stream, as torch advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for lengths in ([300, 250, 150], [1, 0, 699], [699, 1, 0], [129, 128, 443]):
        cu.copy_(_cu(lengths, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, step()):
            assert torch.equal(a, b), lengths


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d", [
    pytest.param(2, 203, 113, 4, 2, 128, id="203x113-d128"),
    pytest.param(1, 300, 1100, 2, 1, 256, id="300x1100-d256"),
    pytest.param(2, 1000, 2100, 2, 2, 64, id="1000x2100-d64"),
])
def test_gluon_dropout_uses_the_portable_mask(b, sq, sk, h, h_kv, d, causal, monkeypatch):
    """Dropout in the Gluon passes (``gluon_fwd.DROPOUT``, ``gluon_bwd.DROPOUT``): the mask is
    built in the wgmma layouts (``_gluon.dropout_keep_mma``, ``dropout_keep_mma_t`` for the dK/dV
    pass's transposed tile) and must be the portable kernels' bit for bit.  Out, lse and the
    gradients against the float64 oracle run with the host-regenerated mask (2x rule); at D=256
    the backward stays portable (``gluon_bwd.dropout_takes``); at D=64 the one-pass backward
    (``gluon_bwd.fused_dq_takes``) applies the mask in its dQ too."""
    from flash_module import reference
    from flash_module.api import dropout_seed
    from flash_module.kernels import gluon_bwd

    monkeypatch.setattr(gluon_fwd, "DROPOUT", True)
    monkeypatch.setattr(gluon_bwd, "DROPOUT", True)
    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)
    p = 0.17
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, torch.bfloat16, "cuda")
    calls = []
    for module, name in ((gluon_fwd, "forward"), (gluon_bwd, "dkdv"), (gluon_bwd, "dq")):
        _spy(monkeypatch, module, name, calls)
    torch.manual_seed(5)
    mask = reference.dropout_mask(dropout_seed(torch.device("cuda")), p, b, h, sq, sk)
    torch.manual_seed(5)
    out, lse, _ = fm.flash_attn_func(q, k, v, p, causal=causal, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # D=256's backward stays portable; where the one-pass backward takes dropout (D=64), the dK/dV
    # pass also gives dQ
    backward = [] if d == 256 else ["dkdv"] if gluon_bwd.fused_dq_takes(d) else ["dkdv", "dq"]
    assert calls == ["forward"] + backward, calls
    assert_matches_reference((out, lse, *grads), q, k, v, dout, causal, True, torch.bfloat16, dropout_p=p,
                             dropout_mask=mask)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
def test_gluon_varlen_dropout_uses_the_portable_mask(monkeypatch):
    """The Gluon varlen passes with dropout give the portable varlen kernels' output and
    gradients (the same mask: row counters per sequence and head), within bf16 rounding."""
    from flash_module.kernels import gluon_bwd

    from .test_varlen import _pack

    monkeypatch.setattr(gluon_fwd, "DROPOUT", True)
    monkeypatch.setattr(gluon_bwd, "DROPOUT", True)
    lens = [203, 0, 1, 130]
    q, cu = _pack(lens, 4, 128, torch.bfloat16, "cuda")
    k, v, dout = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
    xs = [t.requires_grad_() for t in (q, k, v)]

    def run(p=0.3):
        torch.manual_seed(9)
        out = fm.flash_attn_varlen_func(*xs, cu, cu, 203, 203, dropout_p=p, causal=True)
        return (out, *torch.autograd.grad(out, xs, dout))

    calls = []
    for module, name in ((gluon_fwd, "varlen_forward"), (gluon_bwd, "varlen_dkdv"), (gluon_bwd, "varlen_dq")):
        _spy(monkeypatch, module, name, calls)
    ours = run()
    assert calls == ["varlen_forward", "varlen_dkdv", "varlen_dq"], calls
    monkeypatch.setattr(gluon_fwd, "VARLEN", False)
    monkeypatch.setattr(gluon_bwd, "VARLEN", False)
    portable = run()
    no_drop = run(0.0)
    for a, b, c in zip(ours, portable, no_drop):  # the same mask, and a real one
        gap = (a.float() - b.float()).abs().max().item()
        assert gap < 0.05 * b.float().abs().max().item() < (b.float() - c.float()).abs().max().item(), gap


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("programs", [3, 7, None], ids=lambda p: f"programs{p}")
@pytest.mark.parametrize("variant,causal,d,sq,sk", [
    pytest.param("", False, 128, 1000, 2100, id="d128"),
    pytest.param("", True, 128, 2100, 2100, id="d128-causal"),
    pytest.param("", True, 128, 700, 300, id="d128-causal-rows-without-keys"),
    pytest.param("softcap", True, 64, 300, 2500, id="d64-softcap-causal"),
    pytest.param("alibi", False, 256, 700, 1100, id="d256-alibi"),
    pytest.param("", True, 256, 1100, 1000, id="d256-causal"),
    pytest.param("window", True, 256, 900, 1000, id="d256-window"),
    pytest.param("window", True, 128, 1500, 1500, id="d128-window"),
    pytest.param("dropout", False, 128, 513, 777, id="d128-dropout"),
    pytest.param("sink", True, 128, 1, 1000, id="d128-sink-one-row"),
])
def test_gluon_persistent_gives_the_same_bits(variant, causal, d, sq, sk, programs, monkeypatch):
    """``gluon_fwd.PERSISTENT`` (one program per SM walking the query tiles, the K/V ring and the
    Q buffers carried from tile to tile) changes which program runs a tile, never what it
    computes: out and LSE equal the one-tile-per-program kernel's bit for bit, with few
    programs (each walks many tiles: the ring wraps at every phase, Q is prefetched across
    heads and batch entries), tiles without a key, and every variant."""
    monkeypatch.setattr(gluon_fwd, "D64_MIN_KEYS", 0)
    q, k, v = make_qkv(2, sq, sk, 4, 2, d, torch.bfloat16, "cuda")
    kw = dict(causal=causal, return_attn_probs=True)
    if variant == "softcap":
        kw["softcap"] = 30.0
    elif variant == "alibi":
        kw["alibi_slopes"] = torch.rand(2, 4, device="cuda")
    elif variant == "window":
        kw["window_size"] = (300, 0)
    elif variant == "dropout":
        kw["dropout_p"] = 0.2
    elif variant == "sink":
        kw["learnable_sink"] = torch.randn(4, device="cuda")

    def run():
        if variant == "dropout":
            torch.manual_seed(5)
        return fm.flash_attn_func(q, k, v, **kw)[:2]

    monkeypatch.setattr(gluon_fwd, "PERSISTENT", False)
    single = run()
    monkeypatch.setattr(gluon_fwd, "PERSISTENT", True)
    monkeypatch.setattr(gluon_fwd, "PROGRAMS", programs)
    for a, b in zip(single, run()):
        assert torch.equal(a, b)
    assert single[0].abs().sum() > 0
