"""The public API contract of flash_module.

* Input validation: every bad call fails fast (before any kernel runs) with an exception that
  names the offending argument and shows the shapes the caller passed.
* Features that are not implemented yet refuse loudly instead of being silently ignored.
* Semantics, checked against the float64 oracle :func:`flash_module.reference.attention_ref` (and
  torch's own SDPA where it defines the contract): causal alignment of each API, GQA, scaling,
  ``return_attn_probs``, the packed variants, strided inputs, empty batches and gradients that
  flow into the LSE.

Without a GPU the conftest runs the real Triton kernels through the interpreter, so every
numeric case below is kept tiny.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import flash_module
from flash_module import MODES, flash_attn_func, scaled_dot_product_attention
from flash_module.reference import attention_ref
from tests.helpers import assert_flash_rule, max_err, reference_grads

HAS_CUDA = torch.cuda.is_available()
LOW_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


# ---------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    """A placeholder tensor: validation looks only at metadata, the values never matter."""
    return torch.zeros(shape, dtype=dtype)


def _rand(*shape, dtype=torch.float32, device="cpu", grad=True):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)


@pytest.fixture
def no_launch(monkeypatch):
    """Make any attempt to reach the attention op fail, so a validation error must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the attention op was reached: validation should have failed first")

    monkeypatch.setattr(flash_module.api.ops, "attention_fwd", boom)


def _shape_text(shape) -> str:
    return str(tuple(shape))


def _oracle_probs(q, k, scale, causal, bottom_right):
    """softmax(q k^T * scale) in float64 on (B, S, H, D) inputs; rows that see no key are 0."""
    h, h_kv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // h_kv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        offset = sk - sq if bottom_right else 0
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + offset
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def _check_fwd_bwd(q, k, v, out, dout, causal, bottom_right, scale=None, lse=None):
    """Compare ``out`` (and ``lse``) and the grads already in q/k/v.grad with the oracle, flash rule."""
    dtype = q.dtype
    o64, lse64, dq64, dk64, dv64 = reference_grads(q, k, v, dout, causal, bottom_right, scale,
                                                   dtype=torch.float64)
    o_lp, lse_lp, dq_lp, dk_lp, dv_lp = reference_grads(q, k, v, dout, causal, bottom_right, scale)
    assert_flash_rule("out", out, o64, o_lp, dtype)
    if lse is not None:
        assert_flash_rule("lse", lse, lse64, lse_lp, dtype)
    assert_flash_rule("dq", q.grad, dq64, dq_lp, dtype)
    assert_flash_rule("dk", k.grad, dk64, dk_lp, dtype)
    assert_flash_rule("dv", v.grad, dv64, dv_lp, dtype)


# ---------------------------------------------------------------------------------------------
# Validation: flash_attn_func, (B, S, H, D)
# ---------------------------------------------------------------------------------------------

# Each case: q, k, v, extra kwargs, exception, regex that names the argument, shapes that the
# message must show (the caller's own shapes, as passed).
_Q, _KV = (1, 4, 2, 8), (1, 6, 2, 8)

FLASH_BAD_INPUTS = [
    pytest.param(_t(1, 4, 2), _t(*_KV), _t(*_KV), {}, ValueError, r"\bq must be 4-D",
                 [(1, 4, 2)], id="q-3d"),
    pytest.param(_t(*_Q), _t(1, 6, 2, 8, 1), _t(*_KV), {}, ValueError, r"\bk must be 4-D",
                 [(1, 6, 2, 8, 1)], id="k-5d"),
    pytest.param(_t(*_Q), _t(2, 6, 2, 8), _t(2, 6, 2, 8), {}, ValueError, r"batch sizes differ.*\bq\b.*\bk\b",
                 [_Q, (2, 6, 2, 8)], id="batch-mismatch"),
    pytest.param(_t(*_Q), _t(*_KV), _t(1, 7, 2, 8), {}, ValueError, r"\bk and v\b.*sequence length",
                 [(1, 6, 2, 8), (1, 7, 2, 8)], id="kv-seqlen-mismatch"),
    pytest.param(_t(*_Q), _t(*_KV), _t(1, 6, 1, 8), {}, ValueError, r"\bk and v\b.*number of heads",
                 [(1, 6, 2, 8), (1, 6, 1, 8)], id="kv-heads-mismatch"),
    pytest.param(_t(*_Q), _t(1, 6, 2, 16), _t(1, 6, 2, 16), {}, ValueError, r"head dim",
                 [_Q, (1, 6, 2, 16)], id="headdim-mismatch"),
    pytest.param(_t(1, 4, 2, 264), _t(1, 6, 2, 264), _t(1, 6, 2, 264), {}, ValueError, r"264.*256",
                 [(1, 4, 2, 264)], id="headdim-264"),
    pytest.param(_t(1, 4, 3, 8), _t(*_KV), _t(*_KV), {}, ValueError, r"multiple",
                 [(1, 4, 3, 8), _KV], id="heads-not-multiple"),
    pytest.param(_t(*_Q, dtype=torch.int32), _t(*_KV), _t(*_KV), {}, TypeError, r"\bq must be.*int32",
                 [_Q], id="q-int32"),
    pytest.param(_t(*_Q), _t(*_KV), _t(*_KV, dtype=torch.bool), {}, TypeError, r"\bv must be.*bool",
                 [_KV], id="v-bool"),
    pytest.param(_t(*_Q), _t(*_KV, dtype=torch.float64), _t(*_KV), {}, TypeError,
                 r"q, k, v must have the same dtype.*float32.*float64", [], id="mixed-dtypes"),
    pytest.param([[0.0]], _t(*_KV), _t(*_KV), {}, TypeError, r"\bq must be a torch\.Tensor.*list",
                 [], id="q-not-a-tensor"),
    pytest.param(_t(*_Q), _t(*_KV), 1.5, {}, TypeError, r"\bv must be a torch\.Tensor.*float",
                 [], id="v-not-a-tensor"),
    pytest.param(_t(*_Q), _t(*_KV), _t(*_KV), {"mode": "bogus"}, ValueError,
                 r"mode must be one of.*" + re.escape(str(MODES)) + r".*'bogus'", [], id="mode-bogus"),
]


def test_no_launch_guard_is_armed(no_launch):
    """Sanity check of the fixture itself: a valid call does reach the (patched) op."""
    q = k = v = _t(1, 4, 2, 8)
    with pytest.raises(AssertionError, match="validation should have failed first"):
        flash_attn_func(q, k, v)
    with pytest.raises(AssertionError, match="validation should have failed first"):
        scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("q, k, v, kwargs, exc, match, shapes", FLASH_BAD_INPUTS)
def test_flash_attn_func_rejects_bad_input(no_launch, q, k, v, kwargs, exc, match, shapes):
    with pytest.raises(exc, match=match) as info:
        flash_attn_func(q, k, v, **kwargs)
    for shape in shapes:
        assert _shape_text(shape) in str(info.value), f"shape {shape} missing from: {info.value}"


# ---------------------------------------------------------------------------------------------
# Validation: scaled_dot_product_attention, (B, H, S, D)
# ---------------------------------------------------------------------------------------------

_QS, _KVS = (1, 2, 4, 8), (1, 2, 6, 8)

SDPA_BAD_INPUTS = [
    pytest.param(_t(1, 2, 4), _t(*_KVS), _t(*_KVS), {}, ValueError, r"\bquery must be 4-D",
                 [(1, 2, 4)], id="query-3d"),
    pytest.param(_t(*_QS), _t(*_KVS), _t(1, 2, 6, 8, 1), {}, ValueError, r"\bvalue must be 4-D",
                 [(1, 2, 6, 8, 1)], id="value-5d"),
    pytest.param(_t(*_QS), _t(2, 2, 6, 8), _t(2, 2, 6, 8), {}, ValueError,
                 r"batch sizes differ.*\bquery\b.*\bkey\b", [_QS, (2, 2, 6, 8)],
                 id="batch-mismatch"),
    pytest.param(_t(*_QS), _t(*_KVS), _t(1, 2, 7, 8), {}, ValueError, r"\bkey and value\b.*sequence length",
                 [_KVS, (1, 2, 7, 8)], id="kv-seqlen-mismatch"),
    pytest.param(_t(*_QS), _t(*_KVS), _t(1, 1, 6, 8), {"enable_gqa": True}, ValueError,
                 r"\bkey and value\b.*number of heads", [_KVS, (1, 1, 6, 8)],
                 id="kv-heads-mismatch"),
    pytest.param(_t(*_QS), _t(1, 2, 6, 16), _t(1, 2, 6, 16), {}, ValueError, r"head dim",
                 [_QS, (1, 2, 6, 16)], id="headdim-mismatch"),
    pytest.param(_t(1, 2, 4, 264), _t(1, 2, 6, 264), _t(1, 2, 6, 264), {}, ValueError, r"264.*256",
                 [(1, 2, 4, 264)], id="headdim-264"),
    pytest.param(_t(1, 3, 4, 8), _t(*_KVS), _t(*_KVS), {"enable_gqa": True}, ValueError, r"multiple",
                 [(1, 3, 4, 8), _KVS], id="heads-not-multiple"),
    pytest.param(_t(1, 4, 4, 8), _t(*_KVS), _t(*_KVS), {}, ValueError, r"enable_gqa",
                 [], id="gqa-without-enable_gqa"),
    pytest.param(_t(*_QS, dtype=torch.int64), _t(*_KVS), _t(*_KVS), {}, TypeError,
                 r"\bquery must be.*int64", [_QS], id="query-int64"),
    pytest.param(_t(*_QS), _t(*_KVS, dtype=torch.bool), _t(*_KVS), {}, TypeError, r"\bkey must be.*bool",
                 [_KVS], id="key-bool"),
    pytest.param(_t(*_QS), _t(*_KVS), _t(*_KVS, dtype=torch.float16), {}, TypeError,
                 r"query, key, value must have the same dtype.*float32.*float16", [], id="mixed-dtypes"),
    pytest.param(_t(*_QS), (1, 2), _t(*_KVS), {}, TypeError, r"\bkey must be a torch\.Tensor.*tuple",
                 [], id="key-not-a-tensor"),
    pytest.param(_t(*_QS), _t(*_KVS), _t(*_KVS), {"mode": "bogus"}, ValueError,
                 r"mode must be one of.*" + re.escape(str(MODES)) + r".*'bogus'", [], id="mode-bogus"),
]


@pytest.mark.parametrize("query, key, value, kwargs, exc, match, shapes", SDPA_BAD_INPUTS)
def test_sdpa_rejects_bad_input(no_launch, query, key, value, kwargs, exc, match, shapes):
    with pytest.raises(exc, match=match):
        scaled_dot_product_attention(query, key, value, **kwargs)


@pytest.mark.parametrize("query, key, value, kwargs, exc, match, shapes",
                         [p for p in SDPA_BAD_INPUTS if p.values[-1]])
def test_sdpa_error_shows_callers_shapes(no_launch, query, key, value, kwargs, exc, match, shapes):
    with pytest.raises(exc) as info:
        scaled_dot_product_attention(query, key, value, **kwargs)
    for shape in shapes:
        assert _shape_text(shape) in str(info.value), f"shape {shape} missing from: {info.value}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device to put the inputs on two devices")
@pytest.mark.parametrize("api", ["flash_attn_func", "sdpa"])
def test_inputs_on_different_devices(no_launch, api):
    q = torch.zeros(1, 4, 2, 8, device="cuda")
    k = v = torch.zeros(1, 4, 2, 8)
    if api == "flash_attn_func":
        with pytest.raises(ValueError, match=r"q, k, v must be on the same device.*cuda.*cpu"):
            flash_attn_func(q, k, v)
    else:
        with pytest.raises(ValueError, match=r"query, key, value must be on the same device.*cuda.*cpu"):
            scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# Causal alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [pytest.param(m, id=m) for m in MODES])
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("sq, sk", [pytest.param(5, 9, id="sq5-sk9"), pytest.param(9, 5, id="sq9-sk5")])
def test_flash_causal_is_bottom_right(sq, sk, dtype, mode):
    b, h, d = 1, 2, 16
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, h, d, dtype=dtype), _rand(b, sk, h, d, dtype=dtype)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, mode=mode)
    dout = torch.randn_like(out)
    out.backward(dout)
    _check_fwd_bwd(q, k, v, out, dout, causal=True, bottom_right=True, lse=lse)

    # The other alignment really is different here, so the check above means something.
    top_left, _ = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(),
                                causal=True, bottom_right=False)
    assert max_err(out, top_left) > 0.1

    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not t.isnan().any(), f"NaN in {name}"
    assert not lse.isnan().any()
    empty = max(sq - sk, 0)  # query rows i < Sq - Sk see no key at all
    if empty:
        assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
        assert torch.equal(lse[..., :empty], torch.full_like(lse[..., :empty], float("-inf")))
        assert torch.equal(q.grad[:, :empty], torch.zeros_like(q.grad[:, :empty]))
    assert torch.isfinite(lse[..., empty:]).all()


@pytest.mark.parametrize("mode", [pytest.param(m, id=m) for m in MODES])
@pytest.mark.parametrize("sq, sk", [pytest.param(5, 9, id="sq5-sk9"), pytest.param(9, 5, id="sq9-sk5")])
def test_sdpa_causal_is_top_left_like_torch(sq, sk, mode):
    b, h, d = 2, 2, 16
    q, k, v = (_rand(b, h, s, d, dtype=torch.float64) for s in (sq, sk, sk))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, mode=mode)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    expected_grads = torch.autograd.grad(expected, (qt, kt, vt), dout)
    assert max_err(out, expected) < 1e-10
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert max_err(g, e) < 1e-10, name


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float32, id="fp32"),
])
@pytest.mark.parametrize("h, h_kv, causal", [
    pytest.param(4, 2, False, id="gqa-h4-hkv2"),
    pytest.param(4, 1, True, id="mqa-h4-hkv1-causal"),
])
def test_sdpa_gqa_like_torch(h, h_kv, causal, dtype):
    b, sq, sk, d = 1, 6, 10, 16
    q = _rand(b, h, sq, d, dtype=dtype)
    k, v = _rand(b, h_kv, sk, d, dtype=dtype), _rand(b, h_kv, sk, d, dtype=dtype)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def torch_sdpa(dt):
        qt, kt, vt = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
        return (o, *torch.autograd.grad(o, (qt, kt, vt), dout.to(dt)))

    oracle, torch_lowp = torch_sdpa(torch.float64), torch_sdpa(dtype)
    for name, ours, o64, olp in zip(("out", "dq", "dk", "dv"), (out, *grads), oracle, torch_lowp):
        assert ours.shape == o64.shape, name
        assert_flash_rule(name, ours, o64, olp, dtype)


# ---------------------------------------------------------------------------------------------
# Output layout and scaling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b, h, sq, sk, d", [
    pytest.param(2, 2, 5, 7, 16, id="b2-h2-sq5-sk7-d16"),
    pytest.param(1, 3, 8, 3, 24, id="b1-h3-sq8-sk3-d24"),
])
def test_sdpa_output_shape_and_bshd_storage(b, h, sq, sk, d):
    q, k, v = (_rand(b, h, s, d, grad=False) for s in (sq, sk, sk))
    out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (b, h, sq, d)
    assert out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()
    expected, _ = attention_ref(*(t.transpose(1, 2).double() for t in (q, k, v)))
    assert max_err(out.transpose(1, 2), expected) < 1e-5


@pytest.mark.parametrize("api", ["flash_attn_func", "sdpa"])
def test_default_scale_is_inverse_sqrt_headdim(api):
    d = 24
    q, k, v = (_rand(1, 6, 2, d, grad=False) for _ in range(3))
    if api == "flash_attn_func":
        default = flash_attn_func(q, k, v)
        explicit = flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(d))
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        default = scaled_dot_product_attention(q, k, v)
        explicit = scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("api", ["flash_attn_func", "sdpa"])
@pytest.mark.parametrize("scale", [pytest.param(0.05, id="scale0.05"), pytest.param(1.3, id="scale1.3")])
def test_custom_scale(scale, api, dtype):
    q = _rand(1, 5, 2, 16, dtype=dtype)
    k, v = _rand(1, 7, 2, 16, dtype=dtype), _rand(1, 7, 2, 16, dtype=dtype)
    if api == "flash_attn_func":
        out = flash_attn_func(q, k, v, softmax_scale=scale)
    else:
        out = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale)
        out = out.transpose(1, 2)
    dout = torch.randn_like(out)
    out.backward(dout)
    _check_fwd_bwd(q, k, v, out, dout, causal=False, bottom_right=True, scale=scale)
    default, _ = attention_ref(q.detach().double(), k.detach().double(), v.detach().double())
    assert max_err(out, default) > 0.05  # the scale was really used


# ---------------------------------------------------------------------------------------------
# return_attn_probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("sq, sk, h_kv, causal", [
    pytest.param(6, 10, 2, False, id="sq6-sk10"),
    pytest.param(6, 10, 1, True, id="sq6-sk10-mqa-causal"),
    pytest.param(10, 6, 2, True, id="sq10-sk6-causal-empty-rows"),
])
def test_return_attn_probs(sq, sk, h_kv, causal, dtype):
    b, h, d, scale = 2, 2, 16, 0.3
    q = _rand(b, sq, h, d, dtype=dtype, grad=False)
    k, v = _rand(b, sk, h_kv, d, dtype=dtype, grad=False), _rand(b, sk, h_kv, d, dtype=dtype, grad=False)
    result = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    out, lse, probs = result
    assert torch.equal(out, flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert probs.shape == (b, h, sq, sk)

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    expected = _oracle_probs(q, k, scale, causal, bottom_right=True)
    assert max_err(probs, expected) < tol
    sees_keys = torch.isfinite(lse)
    empty_rows = max(sq - sk, 0) if causal else 0  # bottom-right: rows i < Sq - Sk see no key
    assert sees_keys.sum() == b * h * (sq - empty_rows)
    row_sums = probs.double().sum(-1)
    assert (row_sums[sees_keys] - 1).abs().max() < tol
    assert torch.equal(row_sums[~sees_keys], torch.zeros_like(row_sums[~sees_keys]))
    _, lse64 = attention_ref(q.double(), k.double(), v.double(), scale, causal, True)
    assert max_err(lse, lse64) < 1e-4


# ---------------------------------------------------------------------------------------------
# Packed variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [pytest.param(False, id="full"), pytest.param(True, id="causal")])
def test_qkvpacked_matches_unpacked(causal):
    b, s, h, d = 2, 7, 2, 16
    qkv = _rand(b, s, 3, h, d)
    out = flash_module.flash_attn_qkvpacked_func(qkv, causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)

    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(dim=2))
    expected = flash_attn_func(q, k, v, causal=causal)
    expected.backward(dout)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert qkv.grad.shape == qkv.shape
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h, h_kv, causal", [
    pytest.param(2, 2, False, id="mha"),
    pytest.param(4, 2, True, id="gqa-causal"),
])
def test_kvpacked_matches_unpacked(h, h_kv, causal):
    b, sq, sk, d = 2, 5, 8, 16
    q, kv = _rand(b, sq, h, d), _rand(b, sk, 2, h_kv, d)
    out = flash_module.flash_attn_kvpacked_func(q, kv, causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)

    q2 = q.detach().clone().requires_grad_()
    k, v = (t.detach().clone().requires_grad_() for t in kv.unbind(dim=2))
    expected = flash_attn_func(q2, k, v, causal=causal)
    expected.backward(dout)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=1e-6)
    assert kv.grad.shape == kv.shape
    torch.testing.assert_close(kv.grad, torch.stack([k.grad, v.grad], dim=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn, args, exc, match", [
    pytest.param("qkv", (_t(1, 4, 2, 2, 8),), ValueError, r"qkv must be .*\(1, 4, 2, 2, 8\)",
                 id="qkv-2-not-3"),
    pytest.param("qkv", (_t(1, 4, 6, 8),), ValueError, r"qkv must be .*\(1, 4, 6, 8\)", id="qkv-4d"),
    pytest.param("qkv", ([1, 2, 3],), TypeError, r"qkv must be a torch\.Tensor.*list", id="qkv-not-a-tensor"),
    pytest.param("kv", (_t(1, 4, 2, 8), _t(1, 4, 3, 2, 8)), ValueError, r"kv must be .*\(1, 4, 3, 2, 8\)",
                 id="kv-3-not-2"),
    pytest.param("kv", (_t(1, 4, 2, 8), _t(1, 4, 4, 8)), ValueError, r"kv must be .*\(1, 4, 4, 8\)",
                 id="kv-4d"),
    pytest.param("kv", (_t(1, 4, 2, 8), "kv"), TypeError, r"kv must be a torch\.Tensor.*str",
                 id="kv-not-a-tensor"),
])
def test_packed_bad_input(no_launch, fn, args, exc, match):
    func = flash_module.flash_attn_qkvpacked_func if fn == "qkv" else flash_module.flash_attn_kvpacked_func
    with pytest.raises(exc, match=match):
        func(*args)


# ---------------------------------------------------------------------------------------------
# Strided inputs, empty inputs
# ---------------------------------------------------------------------------------------------


def _strided_last_dim(b, s, h, d, how):
    """A (b, s, h, d) leaf-derived view whose last dim is *not* contiguous, and its leaf."""
    if how == "step2":
        base = _rand(b, s, h, 2 * d)
        return base[..., ::2], base
    base = _rand(b, s, d, h)  # "transposed": (B, S, D, H) storage viewed as (B, S, H, D)
    return base.transpose(-1, -2), base


@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
@pytest.mark.parametrize("how", ["step2", "transposed"])
def test_non_contiguous_last_dim(how, which):
    b, sq, sk, h, d = 1, 6, 9, 2, 16
    views, leaves = {}, {}
    for name, s in (("q", sq), ("k", sk), ("v", sk)):
        if which in (name, "all"):
            views[name], leaves[name] = _strided_last_dim(b, s, h, d, how)
            assert views[name].stride(-1) != 1
        else:
            views[name] = leaves[name] = _rand(b, s, h, d)
    q, k, v = views["q"], views["k"], views["v"]
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    o64, _, dq64, dk64, dv64 = reference_grads(q, k, v, dout, True, True, dtype=torch.float64)
    o32, _, dq32, dk32, dv32 = reference_grads(q, k, v, dout, True, True)
    assert_flash_rule("out", out, o64, o32, torch.float32)
    for name, g, g64, g32, t in zip("qkv", grads, (dq64, dk64, dv64), (dq32, dk32, dv32), (q, k, v)):
        assert g.shape == t.shape
        assert_flash_rule(f"d{name}", g, g64, g32, torch.float32)


def test_sdpa_non_contiguous_last_dim():
    b, h, s, d = 1, 2, 6, 16
    query = _rand(b, h, s, 2 * d, grad=False)[..., ::2]
    key = _rand(b, h, d, s, grad=False).transpose(-1, -2)
    value = _rand(b, h, s, d, grad=False)
    out = scaled_dot_product_attention(query, key, value)
    expected = F.scaled_dot_product_attention(query.double(), key.double(), value.double())
    assert max_err(out, expected) < 1e-5


@pytest.mark.parametrize("shape_q, shape_kv", [
    pytest.param((0, 4, 2, 8), (0, 6, 2, 8), id="batch0"),
    pytest.param((0, 4, 4, 8), (0, 6, 2, 8), id="batch0-gqa"),
    pytest.param((2, 0, 2, 8), (2, 6, 2, 8), id="seqlen_q0"),
    pytest.param((1, 4, 2, 8), (1, 0, 2, 8), id="seqlen_k0"),
])
@pytest.mark.parametrize("causal", [pytest.param(False, id="full"), pytest.param(True, id="causal")])
def test_zero_size_flash(shape_q, shape_kv, causal):
    q, k, v = _rand(*shape_q), _rand(*shape_kv), _rand(*shape_kv)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == shape_q and out.dtype == q.dtype
    b, sq, h, _ = shape_q
    assert lse.shape == (b, h, sq)
    assert probs.shape == (b, h, sq, shape_kv[1])
    if shape_kv[1] == 0:  # no key at all: the library's convention is out = 0, lse = -inf
        assert torch.equal(out, torch.zeros_like(out))
        assert (lse == float("-inf")).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape


@pytest.mark.parametrize("causal", [pytest.param(False, id="full"), pytest.param(True, id="causal")])
def test_zero_size_sdpa(causal):
    q, k, v = _rand(0, 2, 4, 8), _rand(0, 2, 6, 8), _rand(0, 2, 6, 8)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == (0, 2, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_zero_size_qkvpacked():
    qkv = _rand(0, 5, 3, 2, 8)
    out = flash_module.flash_attn_qkvpacked_func(qkv)
    assert out.shape == (0, 5, 2, 8)


# ---------------------------------------------------------------------------------------------
# Gradient flowing into the LSE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("sq, sk, h, h_kv, causal", [
    pytest.param(7, 11, 2, 2, False, id="sq7-sk11"),
    pytest.param(7, 11, 4, 2, True, id="sq7-sk11-gqa-causal"),
    pytest.param(11, 7, 2, 1, True, id="sq11-sk7-mqa-causal-empty-rows"),
])
def test_gradient_through_lse(sq, sk, h, h_kv, causal, dtype):
    b, d = 2, 24
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, h_kv, d, dtype=dtype), _rand(b, sk, h_kv, d, dtype=dtype)
    w = torch.randn(b, sq, h, d, dtype=dtype)
    u = torch.randn(b, h, sq)

    def loss(out, lse):
        # Rows that see no key have lse = -inf; keep them out of the loss (their gradient is 0).
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.float() * w.float()).sum() + (lse.float() * u).sum()

    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))

    def oracle(dt):
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, l = attention_ref(qr, kr, vr, causal=causal, bottom_right=True)
        return torch.autograd.grad(loss(o, l), (qr, kr, vr))

    g64, g_lp = oracle(torch.float64), oracle(dtype)
    for name, ours, e64, elp in zip(("dq", "dk", "dv"), grads, g64, g_lp):
        assert not ours.isnan().any(), name
        assert_flash_rule(name, ours, e64, elp, dtype)

    # The lse term really contributes: without it the oracle's dq is clearly different.
    _, _, dq_no_lse, _, _ = reference_grads(q, k, v, w, causal, True, dtype=torch.float64)
    assert max_err(g64[0], dq_no_lse) > 0.1


# ---------------------------------------------------------------------------------------------
# Malformed argument values: ValueError / TypeError naming the argument (never a crash or a
# NotImplementedError for a value that is wrong rather than unsupported)
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    pytest.param(dict(window_size=None), TypeError, r"window_size must be a pair", id="window-None"),
    pytest.param(dict(window_size=(-1,)), TypeError, r"window_size must be a pair", id="window-one"),
    pytest.param(dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1",
                 id="window-neg"),
    pytest.param(dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]", id="dropout-1.5"),
    pytest.param(dict(dropout_p="0.1"), TypeError, r"dropout_p must be a real number", id="dropout-str"),
    pytest.param(dict(softcap=None), TypeError, r"softcap must be a real number", id="softcap-None"),
    pytest.param(dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0", id="softcap-neg"),
    pytest.param(dict(softmax_scale="abc"), TypeError, r"softmax_scale must be a real number",
                 id="scale-str"),
    pytest.param(dict(softmax_scale="0.5"), TypeError, r"softmax_scale must be a real number",
                 id="scale-numstr"),
    pytest.param(dict(softmax_scale=float("nan")), ValueError, r"softmax_scale must be finite",
                 id="scale-nan"),
    pytest.param(dict(softmax_scale=float("inf")), ValueError, r"softmax_scale must be finite",
                 id="scale-inf"),
    pytest.param(dict(alibi_slopes=[0.5]), TypeError, r"alibi_slopes must be a torch.Tensor",
                 id="alibi-list"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_VALUES)
def test_flash_attn_func_rejects_malformed_values(no_launch, kwargs, exc, match):
    q = _t(1, 4, 2, 8)
    with pytest.raises(exc, match=match):
        flash_attn_func(q, q, q, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    pytest.param(dict(scale="abc"), TypeError, r"scale must be a real number", id="scale-str"),
    pytest.param(dict(scale=float("nan")), ValueError, r"scale must be finite", id="scale-nan"),
    pytest.param(dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\]", id="dropout-neg"),
    pytest.param(dict(attn_mask="causal"), TypeError, r"attn_mask must be a torch.Tensor", id="mask-str"),
])
def test_sdpa_rejects_malformed_values(no_launch, kwargs, exc, match):
    q = _t(1, 2, 4, 8)
    with pytest.raises(exc, match=match):
        scaled_dot_product_attention(q, q, q, **kwargs)


@pytest.mark.parametrize("shape", [pytest.param((1, 5, 2, 0), id="headdim-0"),
                                   pytest.param((2, 3, 0, 8), id="heads-0")])
def test_empty_head_dim_or_heads_like_torch(shape):
    """D = 0 or H = H_kv = 0 give empty outputs, as torch's SDPA does (no ZeroDivisionError).

    (torch's own CPU SDPA is not called here: torch 2.11 dies with SIGFPE on head dim 0.)"""
    q = torch.randn(*shape)
    k = torch.randn(shape[0], 7, shape[2], shape[3])
    out = flash_attn_func(q, k, k, causal=True)
    assert out.shape == shape
    sdpa_out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))
    assert sdpa_out.shape == q.transpose(1, 2).shape
    if shape[3] == 0 and shape[2] > 0:  # every score is 0: the LSE is log(#visible keys)
        _, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
        expect = torch.log(torch.arange(shape[1]) + 7.0 - shape[1] + 1).clamp(min=float("-inf"))
        assert torch.allclose(lse[0, 0], expect)


def test_functorch_grad_is_a_clear_error():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="torch.func.grad"):
        torch.func.grad(lambda q: flash_attn_func(q, q, q).sum())(q)
    assert torch.vmap(lambda x: flash_attn_func(x, x, x))(q[None]).shape == (1, *q.shape)  # vmap works
