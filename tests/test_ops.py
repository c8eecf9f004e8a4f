"""The op contract: opcheck, gradcheck on the real kernels, the LSE gradient, torch.compile."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops

from .helpers import make_qkv, max_err, reference_grads

OPCHECK_CASES = [
    pytest.param(torch.float32, "bshd", False, id="fp32-bshd-full"),
    pytest.param(torch.bfloat16, "bhsd", True, id="bf16-bhsd-causal"),
    pytest.param(torch.float16, "bshd", True, id="fp16-bshd-causal"),
    pytest.param(torch.float64, "bhsd", False, id="fp64-bhsd-full"),
]


@pytest.mark.parametrize("mode", ["fa2", pytest.param("fa1", marks=pytest.mark.slow),
                                  pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype,layout,causal", OPCHECK_CASES)
def test_opcheck_attention_fwd(dtype, layout, causal, mode, device):
    q, k, v = make_qkv(1, 19, 33, 4, 2, 32, dtype, device, layout)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, 0.2, causal, True, mode, 2))


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no-dlse", "dlse"])
@pytest.mark.parametrize("dtype,layout,causal", OPCHECK_CASES)
def test_opcheck_attention_bwd(dtype, layout, causal, with_dlse, device):
    q, k, v = make_qkv(1, 19, 33, 4, 2, 32, dtype, device, layout, requires_grad=False)
    out, lse = ops.attention_fwd(q, k, v, 0.2, causal, False, "fa2")
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(ops.attention_bwd, (dout, q, k, v, out, lse, dlse, 0.2, causal, False, "fa2"))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["fa2", "fa1", "tiling"])
def test_acc_out_is_the_output_before_its_rounding(mode, impl, device):
    """``acc_out=True`` (ring attention's partials) returns O in the accumulator dtype: rounded
    to the inputs' dtype it is the plain call's O bit for bit, with the same LSE; opcheck'd, and
    its gradient is the plain call's (the backward rounds O and dO to q's dtype first)."""
    q, k, v = make_qkv(1, 19, 33, 4, 2, 32, torch.bfloat16, device, requires_grad=False)
    out, lse = ops.attention_fwd(q, k, v, 0.2, True, True, mode, 2, impl)
    acc, acc_lse = ops.attention_fwd(q, k, v, 0.2, True, True, mode, 2, impl, acc_out=True)
    assert acc.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(acc.to(torch.bfloat16), out) and torch.equal(acc_lse, lse)
    assert (acc.double() - out.double()).abs().max().item() > 0  # not merely a copy of the rounded O
    if mode == "fa2" and impl == "triton":
        torch.library.opcheck(ops.attention_fwd, (q, k, v, 0.2, True, True, mode, 2), {"acc_out": True},
                              test_utils=("test_schema", "test_faketensor"))
        grads = []
        for acc_out in (False, True):
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            o, _ = ops.attention_fwd(qg, kg, vg, 0.2, True, True, mode, 2, impl, acc_out=acc_out)
            grads.append(torch.autograd.grad(o.float().sum(), (qg, kg, vg)))
        for plain, wide in zip(*grads):
            assert torch.equal(plain, wide)


GRADCHECK_CASES = [
    pytest.param(9, 13, 2, 2, 8, False, id="9x13-full"),
    pytest.param(13, 9, 4, 2, 16, True, id="13x9-causal-gqa"),
    pytest.param(11, 11, 2, 1, 12, True, id="11x11-causal-mqa"),
]


@pytest.mark.parametrize("mode", ["fa2", pytest.param("fa1", marks=pytest.mark.slow),
                                  pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("sq,sk,h,h_kv,d,causal", GRADCHECK_CASES)
def test_gradcheck_fp64(sq, sk, h, h_kv, d, causal, mode, device):
    """Finite differences vs the Triton backward, in float64 (fp64 accumulators in the kernels)."""
    q, k, v = make_qkv(1, sq, sk, h, h_kv, d, torch.float64, device)
    fn = lambda q, k, v: fm.flash_attn_func(q, k, v, causal=causal, mode=mode, num_splits=2)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_gradcheck_through_lse(device):
    """Gradients flowing into both outputs: the LSE term enters the backward through delta."""
    q, k, v = make_qkv(1, 10, 14, 2, 2, 8, torch.float64, device)

    def fn(q, k, v):
        out, lse = ops.attention_fwd(q, k, v, 0.4, True, True, "fa2")
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_lse_gradient_matches_oracle(device):
    q, k, v = make_qkv(2, 37, 29, 4, 2, 32, torch.float32, device)
    w = torch.randn(2, 37, 4, 32, device=device)
    u = torch.randn(2, 4, 37, device=device)
    out, lse = ops.attention_fwd(q, k, v, 32**-0.5, True, True, "fa2")
    grads = torch.autograd.grad((out * w).sum() + (lse * u).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = fm.reference.attention_ref(qd, kd, vd, causal=True, bottom_right=True)
    ref = torch.autograd.grad((ro * w.double()).sum() + (rl * u.double()).sum(), (qd, kd, vd))
    for g, r in zip(grads, ref):
        assert max_err(g, r) < 1e-4


def test_double_backward_raises(device):
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, torch.float64, device)
    out = fm.flash_attn_func(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def _block(q, k, v, w):
    """A small attention block around the op: projections, both layouts, a residual."""
    x = fm.flash_attn_func(q * 1.5, k, v, causal=True)
    y = fm.scaled_dot_product_attention(x.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        is_causal=True)
    return (y.transpose(1, 2) @ w).relu() + q


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 45, 45, 4, 4, 32, torch.float32, device)
    w = torch.randn(32, 32, device=device, requires_grad=True)
    explain = torch._dynamo.explain(_block)(q, k, v, w)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    compiled = torch.compile(_block, fullgraph=True)
    out_c = compiled(q, k, v, w)
    out_e = _block(q, k, v, w)
    assert max_err(out_c, out_e) < 1e-5
    g = torch.randn_like(out_e)
    grads_c = torch.autograd.grad(out_c, (q, k, v, w), g)
    grads_e = torch.autograd.grad(out_e, (q, k, v, w), g)
    for a, b in zip(grads_c, grads_e):
        assert max_err(a, b) < 1e-5


def test_compile_dynamic_seqlen(device):
    """A second sequence length recompiles at most once (dynamic), results stay right."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: fm.flash_attn_func(q, k, v, causal=True), fullgraph=True)
    for s in (33, 47, 61):
        q, k, v = make_qkv(1, s, s, 2, 2, 16, torch.float32, device, requires_grad=False)
        ref = reference_grads(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                              torch.randn(1, s, 2, 16, device=device), True, True, dtype=torch.float64)[0]
        assert max_err(fn(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("mode", ["fa1", "tiling"])
def test_compile_modes_and_merge(mode, device):
    """Each mode's op and merge_attention_states trace into one graph and match eager, fwd + bwd."""
    torch._dynamo.reset()

    def fn(q, k, v):  # attention over keys [0, 20) and [20, 45), merged
        a, lse_a = ops.attention_fwd(q, k[:, :20], v[:, :20], 16**-0.5, False, True, mode, 0)
        b, lse_b = ops.attention_fwd(q, k[:, 20:], v[:, 20:], 16**-0.5, False, True, mode, 0)
        return fm.merge_attention_states(a, lse_a, b, lse_b)[0]

    q, k, v = make_qkv(1, 17, 45, 2, 1, 16, torch.float32, device)
    explain = torch._dynamo.explain(fn)(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(q, k, v), fn(q, k, v)
    assert max_err(out_c, out_e) < 1e-5
    assert max_err(out_e, fm.flash_attn_func(q, k, v)) < 1e-5  # the merge is the full attention
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, (q, k, v), g), torch.autograd.grad(out_e, (q, k, v), g)):
        assert max_err(a, b) < 1e-5


def test_compile_with_a_traced_scale(device):
    """A scale that torch.compile traces as a symbolic float (dynamic=True) passes validation."""
    q = torch.randn(1, 16, 2, 16, device=device)
    f = torch.compile(lambda q, s: fm.flash_attn_func(q, q, q, softmax_scale=s, causal=True),
                      fullgraph=True, dynamic=True)
    for s in (0.3, 0.45):
        torch.testing.assert_close(f(q, s), fm.flash_attn_func(q, q, q, softmax_scale=s, causal=True))


# ops.call: the public functions' way in.  Plain eager calls run the op's body directly (no
# dispatcher); everything else goes through the registered op.


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Counts the calls ops.call makes to each op's body directly (not via the dispatcher)."""
    calls: list[str] = []
    for op, body in list(ops._BODIES.items()):
        def counted(*args, _body=body, _name=op._name):
            calls.append(_name)
            return _body(*args)
        monkeypatch.setitem(ops._BODIES, op, counted)
    return calls


def test_call_runs_the_body_in_plain_eager(fast_path_calls, device):
    q, k, v = make_qkv(2, 5, 70, 4, 2, 32, torch.float32, device, "bshd", requires_grad=False)
    lens = torch.tensor([70, 33], dtype=torch.int32, device=device)
    args = (q, k, v, lens, None, None, 0.3, True, 0, "auto")
    fast = ops.call(ops.kvcache_fwd, *args)
    assert fast_path_calls == ["kvcache_fwd"]
    for got, want in zip(fast, ops.kvcache_fwd(*args)):
        assert torch.equal(got, want)
    out, _ = ops.call(ops.attention_fwd, q, k, v, 0.3, True, True, "fa2", 0, "auto")
    assert fast_path_calls[-1] == "attention_fwd"
    assert torch.equal(out, fm.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True))


def test_call_uses_the_dispatcher_when_it_matters(fast_path_calls, device):
    q, k, v = make_qkv(1, 5, 9, 2, 2, 16, torch.float32, device, "bshd", requires_grad=True)
    out, _ = ops.call(ops.attention_fwd, q, k, v, 0.3, False, True, "fa2", 0, "auto")
    out.sum().backward()  # autograd needs the registered op
    assert q.grad is not None and fast_path_calls == []
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(t.detach()) for t in (q, k, v))
    with mode:
        fout, _ = ops.call(ops.attention_fwd, fq, fk, fv, 0.3, False, True, "fa2", 0, "auto")
    assert fout.shape == q.shape and fast_path_calls == []
    compiled = torch.compile(lambda a, b, c: ops.call(ops.attention_fwd, a, b, c, 0.3, False, True, "fa2", 0,
                                                       "auto")[0], fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v), out.detach())
    assert fast_path_calls == []


def test_call_bumps_versions_of_mutated_tensors(device):
    k_cache, v_cache = (torch.randn(2, 8, 2, 16, device=device) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 16, device=device) for _ in range(2))
    lens = torch.tensor([3, 7], dtype=torch.int32, device=device)
    before = (k_cache._version, v_cache._version)
    ops.call(ops.kvcache_append, k_cache, v_cache, k_new, v_new, lens, None, None, "auto")
    assert k_cache._version > before[0] and v_cache._version > before[1]
    assert torch.equal(k_cache[0, 3], k_new[0, 0]) and torch.equal(v_cache[1, 7], v_new[1, 0])


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_the_backward(deterministic, monkeypatch, device):
    """flash-attn's ``deterministic`` travels with the forward op to the backward kernels
    (``fa2_backward(deterministic=...)``, which then never takes the one-pass backward's atomic
    dQ), eagerly and through ``torch.compile``; the gradients are the same either way here."""
    from flash_module.kernels import fa2_bwd

    seen = []
    real = fa2_bwd.fa2_backward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fa2_bwd, "fa2_backward", spy)
    q, k, v = make_qkv(1, 17, 33, 2, 1, 32, torch.float32, device)
    out = fm.flash_attn_func(q, k, v, causal=True, deterministic=deterministic, impl="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    def attend(a, b, c):
        return fm.flash_attn_func(a, b, c, causal=True, deterministic=deterministic, impl="triton")

    compiled = torch.compile(attend, fullgraph=True)
    again = torch.autograd.grad(compiled(q, k, v).sum(), (q, k, v))
    assert seen == [deterministic, deterministic]
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
