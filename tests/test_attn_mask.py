"""SDPA's ``attn_mask`` (issue #13): boolean (True = attend) or additive float masks,
broadcastable to (B, H, Sq, Sk), read in place by the kernels' tiles, forward and backward, the
float mask's own gradient, fully masked rows giving 0 and zero gradients.  Both implementations
against the float64 oracle with flash-attn's 2x rule."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.reference import attention_ref

from .helpers import assert_compiles_like_eager, assert_flash_rule, make_qkv

IMPLS = ["triton", "torch"]


def _mask(kind: str, shape: tuple[int, ...], device, requires_grad: bool = False) -> torch.Tensor:
    """A random mask that leaves every row at least one visible key (column 0)."""
    if kind == "bool":
        m = torch.rand(shape, device=device) > 0.4
        m[..., 0] = True
        return m
    m = torch.randn(shape, device=device, dtype=torch.float32)
    m = m.masked_fill(torch.rand(shape, device=device) > 0.8, float("-inf"))
    m[..., 0] = 0.5
    return m.requires_grad_(requires_grad)


def _sdpa(q, k, v, mask, impl, **kw):
    """Our SDPA on (B, S, H, D) tensors (the helpers' layout), returned in it."""
    out = fm.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, enable_gqa=True, impl=impl, **kw)
    return out.transpose(1, 2)


def _oracle(q, k, v, dout, mask, dtype, grads_of_mask: bool):
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    m = mask.detach()
    if grads_of_mask:
        m = m.to(dtype).requires_grad_()
    out, _ = attention_ref(qr, kr, vr, None, False, False, attn_mask=m)
    inputs = (qr, kr, vr, m) if grads_of_mask else (qr, kr, vr)
    return (out, *torch.autograd.grad(out, inputs, dout.to(dtype)))


# (B, Sq, Sk, H, H_kv, D, kind, mask shape)
CASES = [
    pytest.param(2, 37, 53, 4, 2, 40, "bool", (2, 4, 37, 53), id="bool-full-gqa"),
    pytest.param(2, 37, 53, 4, 4, 32, "bool", (2, 1, 1, 53), id="bool-key-padding"),
    pytest.param(1, 70, 33, 2, 1, 72, "float", (1, 2, 70, 33), id="float-per-head-mqa"),
    pytest.param(2, 17, 203, 2, 2, 16, "float", (17, 203), id="float-2d", marks=pytest.mark.slow),
    pytest.param(1, 113, 113, 2, 2, 24, "bool", (113, 1), id="bool-per-query", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,kind,shape", CASES)
def test_mask_matches_oracle(b, sq, sk, h, h_kv, d, kind, shape, dtype, impl, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device)
    mask = _mask(kind, shape, device)
    if kind == "float":
        mask = mask.to(dtype)
    out = _sdpa(q, k, v, mask, impl)
    dout = torch.randn_like(out)
    ours = (out, *torch.autograd.grad(out, (q, k, v), dout))
    oracle = _oracle(q, k, v, dout, mask, torch.float64, False)
    lowp = _oracle(q, k, v, dout, mask, dtype, False)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, oracle, lowp):
        assert_flash_rule(name, a, o, p, dtype)


# Decode shapes (few queries, >= ops.DECODE_MIN_KEYS keys): the split-KV kernel reads the mask,
# with the GQA group's query heads packed into one tile (each row its own head's mask).
DECODE_CASES = [
    pytest.param(2, 1, 300, 4, 2, 32, "bool", (2, 1, 1, 300), False, id="key-padding-gqa",
                 marks=pytest.mark.slow),
    pytest.param(2, 3, 290, 4, 2, 32, "bool", (2, 1, 1, 290), True, id="key-padding-causal-gqa"),
    pytest.param(1, 2, 260, 4, 1, 24, "float", (1, 4, 2, 260), False, id="float-per-head-mqa"),
    pytest.param(2, 1, 270, 2, 2, 16, "bool", (2, 2, 1, 270), True, id="bool-per-head-mha",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,kind,shape,causal", DECODE_CASES)
def test_decode_with_a_mask_runs_split_kv(b, sq, sk, h, h_kv, d, kind, shape, causal, device, monkeypatch):
    """A mask at decode shapes: the split-KV kernel (not the one-query-block FA2 grid), with
    causal aligned bottom-right as transformers' decode path asks; forward and backward against
    the float64 oracle."""
    from flash_module.api import _attention
    from flash_module.kernels import split_kv

    assert ops.routes_to_split_kv(torch.empty(b, sq, h, d), torch.empty(b, sk, h_kv, d))
    launched = []
    real = split_kv._split_kv
    monkeypatch.setattr(split_kv, "_split_kv", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, torch.float32, device)
    mask = _mask(kind, shape, device)
    out = _attention(q, k, v, None, causal, True, "fa2", impl="triton", attn_mask=mask)[0]
    assert launched
    dout = torch.randn_like(out)
    ours = (out, *torch.autograd.grad(out, (q, k, v), dout))

    def ref(dtype):
        qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        o, _ = attention_ref(qr, kr, vr, None, causal, True, attn_mask=mask)
        return (o, *torch.autograd.grad(o, (qr, kr, vr), dout.to(dtype)))

    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, ref(torch.float64), ref(torch.float32)):
        assert_flash_rule(name, a, o, p, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [pytest.param((1, 2, 29, 41), id="per-head"),
                                   pytest.param((29, 41), id="2d-broadcast"),
                                   pytest.param((2, 1, 1, 41), id="key-padding"),
                                   pytest.param((2, 2, 29, 41), id="full"),
                                   pytest.param((2, 1, 29, 1), id="per-query"),
                                   pytest.param((1, 1, 1, 1), id="scalar")])
def test_float_mask_gradient(shape, impl, device):
    """A float mask that requires grad gets dS, summed over the dims it broadcasts (the kernels
    add it up in the dQ pass: every broadcast kind of ``_common.mask_grad_add``)."""
    q, k, v = make_qkv(2, 29, 41, 2, 2, 16, torch.float32, device)
    mask = _mask("float", shape, device, requires_grad=True)
    out = _sdpa(q, k, v, mask, impl)
    dout = torch.randn_like(out)
    ours = (out, *torch.autograd.grad(out, (q, k, v, mask), dout))
    oracle = _oracle(q, k, v, dout, mask, torch.float64, True)
    lowp = _oracle(q, k, v, dout, mask, torch.float32, True)
    for name, a, o, p in zip(["out", "dq", "dk", "dv", "dmask"], ours, oracle, lowp):
        assert_flash_rule(name, a, o, p, torch.float32)
    assert ours[-1].shape == mask.shape and ours[-1].dtype == mask.dtype


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_not_nan(kind, impl, device):
    q, k, v = make_qkv(1, 9, 12, 2, 2, 16, torch.float32, device)
    mask = _mask(kind, (1, 2, 9, 12), device)
    hidden = False if kind == "bool" else float("-inf")
    mask[0, 1, 4] = hidden  # row 4 of head 1 sees nothing
    mask[0, 0, :, 3] = hidden
    if kind == "float":
        mask.requires_grad_()
    out = _sdpa(q, k, v, mask, impl)
    inputs = (q, k, v, mask) if kind == "float" else (q, k, v)
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    for t in (out, *grads):
        assert not t.isnan().any()
    assert torch.equal(out[0, 4, 1], torch.zeros_like(out[0, 4, 1]))
    assert torch.equal(grads[0][0, 4, 1], torch.zeros_like(grads[0][0, 4, 1]))  # dq of the hidden row
    # the other rows still match the oracle
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    ref, _ = attention_ref(qd, kd, vd, None, False, False,
                           attn_mask=mask.detach().double() if kind == "float" else mask)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 4, 1] = False
    assert (out.double() - ref)[keep].abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_with_dropout_and_extensions(impl, device):
    """The mask composes with dropout (the same Philox mask as without it), softcap and a window."""
    from flash_module import reference
    from flash_module.api import dropout_seed

    q, k, v = make_qkv(1, 21, 30, 2, 2, 16, torch.float32, device)
    mask = _mask("bool", (1, 1, 21, 30), device)
    torch.manual_seed(3)
    drop = reference.dropout_mask(dropout_seed(torch.device(device)), 0.25, 1, 2, 21, 30)
    torch.manual_seed(3)
    out = _sdpa(q, k, v, mask, impl, dropout_p=0.25, softcap=5.0, window_size=(8, 4))
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    ref, _ = attention_ref(qd, kd, vd, None, False, False, softcap=5.0, window_size=(8, 4),
                           dropout_p=0.25, dropout_mask=drop, attn_mask=mask)
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kwargs, exc, match", [
    pytest.param(dict(is_causal=True), ValueError, r"attn_mask and is_causal=True cannot be combined",
                 id="causal"),
    pytest.param(dict(attn_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError,
                 r"broadcastable to .*\(1, 2, 4, 6\)", id="shape"),
    pytest.param(dict(attn_mask=torch.ones(4, 6, dtype=torch.int32)), TypeError, r"bool or floating",
                 id="dtype"),
    pytest.param(dict(attn_mask=[[True]]), TypeError, r"attn_mask must be a torch.Tensor", id="type"),
    pytest.param(dict(mode="tiling"), NotImplementedError, r"mode='tiling' does not support attn_mask",
                 id="tiling"),
    pytest.param(dict(mode="fa1"), NotImplementedError, r"mode='fa1' does not support attn_mask", id="fa1"),
])
def test_bad_masks(kwargs, exc, match, device):
    q = torch.randn(1, 2, 4, 8, device=device)
    k = v = torch.randn(1, 2, 6, 8, device=device)
    kwargs.setdefault("attn_mask", torch.ones(4, 6, dtype=torch.bool, device=device))
    with pytest.raises(exc, match=match):
        fm.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.slow  # opcheck + compile: CI's slow run and the GPU check
def test_mask_opcheck_and_compile(device):
    q, k, v = make_qkv(1, 19, 33, 2, 2, 16, torch.float32, device)
    for mask in (_mask("bool", (1, 1, 19, 33), device), _mask("float", (1, 2, 19, 33), device, True)):
        args = (q, k, v, 0.25, False, False, "fa2", 0, "auto", 0.0, None, -1, -1, None, 0.0, None, mask)
        torch.library.opcheck(ops.attention_fwd, args)
    qd, kd, vd, md = (t.detach() for t in (q, k, v, mask))  # (the backward op has no derivative)
    out, lse = ops.attention_fwd(qd, kd, vd, 0.25, False, False, "fa2", 0, "auto", 0.0, None, -1, -1, None,
                                 0.0, None, md)
    bwd_args = (torch.randn_like(out), qd, kd, vd, out, lse, None, md, 0.25, False, False, "fa2")
    torch.library.opcheck(ops.attention_bwd_mask, bwd_args)
    mask = _mask("float", (19, 33), device)

    def f(q, k, v):
        return _sdpa(q, k, v, mask, "auto")

    assert_compiles_like_eager(f, q, k, v)
