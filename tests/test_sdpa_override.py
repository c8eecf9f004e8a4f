"""The SDPA drop-in (issue #14): ``torch.nn.functional.scaled_dot_product_attention`` routed to
flash_module inside ``sdpa_override()`` / after ``enable_sdpa_override()``, torch's own SDPA for
what we do not run, the original restored afterwards; compile-safe.  On CPU the routed calls run
the real Triton kernels under the interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flash_module as fm
from flash_module.integrations import sdpa as override

from .helpers import assert_compiles_like_eager, assert_flash_rule


def _qkv(b, h, h_kv, sq, sk, d, device, dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(11)
    shapes = ((b, h, sq, d), (b, h_kv, sk, d), (b, h_kv, sk, d))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


@pytest.fixture(autouse=True)
def _restore():
    yield
    fm.disable_sdpa_override()


@pytest.mark.parametrize("kwargs, gqa", [
    pytest.param(dict(is_causal=True), False, id="causal"),
    pytest.param(dict(enable_gqa=True), True, id="gqa"),
    pytest.param(dict(scale=0.3), False, id="scale", marks=pytest.mark.slow),
    pytest.param(dict(attn_mask="bool"), False, id="bool-mask"),
])
def test_routed_calls_run_our_kernels_and_match_torch(kwargs, gqa, device):
    q, k, v = _qkv(2, 4, 2 if gqa else 4, 37, 53, 16, device)
    if kwargs.get("attn_mask") == "bool":
        keep = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(2)) > 0.3
        kwargs = dict(attn_mask=keep.to(device))
    dout = torch.randn(2, 4, 37, 16, device=device)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)  # torch's own: the override is off
    before = override.routed_calls
    with fm.sdpa_override():
        assert fm.sdpa_override_enabled()
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert not fm.sdpa_override_enabled()
    assert override.routed_calls == before + 1
    # bit for bit what flash_module's own SDPA gives, and within the 2x rule of torch's
    ours = fm.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(got, ours)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle = F.scaled_dot_product_attention(*ref, **kwargs)
    oracle_grads = torch.autograd.grad(oracle, ref, dout.double())
    torch_grads = torch.autograd.grad(want, (q, k, v), dout)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], (got, *grads), (oracle, *oracle_grads),
                             (want, *torch_grads)):
        assert_flash_rule(name, a, o, p, torch.float32)


@pytest.mark.parametrize("case", ["3d", "value-head-dim", "mask-and-causal", "gqa-not-enabled", "5d-mask"])
def test_unsupported_calls_go_to_torch(case, device):
    """What we do not run goes to torch's SDPA unchanged: the same result, or the same error."""
    q, k, v = _qkv(1, 2, 2, 9, 11, 8, device)
    kwargs = {}
    if case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "value-head-dim":
        v = torch.randn(1, 2, 11, 4, device=device)
    elif case == "mask-and-causal":
        kwargs = dict(attn_mask=torch.ones(9, 11, dtype=torch.bool, device=device), is_causal=True)
    elif case == "gqa-not-enabled":
        k, v = k[:, :1], v[:, :1]
    else:  # a mask with more than 4 dims
        kwargs = dict(attn_mask=torch.zeros(1, 1, 2, 9, 11, device=device))
    assert not override.routes(q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False))
    before = override.routed_calls
    try:
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except Exception as exc:  # noqa: BLE001 - torch's own error must come out of the override too
        with fm.sdpa_override(), pytest.raises(type(exc)):
            F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        with fm.sdpa_override():
            got = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert torch.equal(got, want)
    assert override.routed_calls == before


def test_enable_disable_and_nesting(device):
    original = F.scaled_dot_product_attention
    fm.enable_sdpa_override()
    assert fm.sdpa_override_enabled() and F.scaled_dot_product_attention is override.routed_sdpa
    with fm.sdpa_override(enabled=False):
        assert F.scaled_dot_product_attention is original
        with fm.sdpa_override():
            assert fm.sdpa_override_enabled()
        assert not fm.sdpa_override_enabled()
    assert fm.sdpa_override_enabled()  # the block restored what was there before it
    fm.disable_sdpa_override()
    assert F.scaled_dot_product_attention is original


def test_torch_multihead_attention_is_routed(device):
    """torch's own nn.MultiheadAttention reaches SDPA through the functional module: routed."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).to(device)
    x = torch.randn(2, 13, 32, device=device)
    mask = torch.ones(13, 13, dtype=torch.bool, device=device).triu(1)  # True = not allowed (torch MHA)
    want, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    before = override.routed_calls
    with fm.sdpa_override():
        got, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    assert override.routed_calls > before
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # compile: CI's slow run and the GPU check
def test_compile_fullgraph_through_the_override(device):
    q, k, v = _qkv(1, 2, 2, 19, 19, 16, device)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    with fm.sdpa_override():
        assert_compiles_like_eager(f, q, k, v)
        torch.testing.assert_close(f(q, k, v), fm.scaled_dot_product_attention(q, k, v, is_causal=True) * 2)


def test_torch_flash_registry_hook_registers_where_torch_has_it():
    """register_torch_flash_impl: True and listed where torch has the registry, else False."""
    has = hasattr(torch.nn.attention, "register_flash_attention_impl")
    assert override.register_torch_flash_impl() is has
    if has:
        assert override.TORCH_IMPL_NAME in torch.nn.attention.list_flash_attention_impls()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_flash_backend_runs_our_kernels(causal, deterministic_algorithms):
    """Activated through torch's registry, SDPA's own flash backend runs our kernels: forward and
    backward by flash-attn's rule, dropout reproducible under the same seed (bit for bit under
    ``torch.use_deterministic_algorithms``, which the one-pass D=64 backward's dQ needs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not override.register_torch_flash_impl():
        pytest.skip("this torch has no flash-attention registry")
    q, k, v = _qkv(2, 4, 4, 301, 301, 64, "cuda", torch.bfloat16)
    dout = torch.randn_like(q)
    torch.nn.attention.activate_flash_attention_impl(override.TORCH_IMPL_NAME)
    try:
        before = override.torch_impl_calls
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            runs = []
            for _ in range(2):
                torch.manual_seed(7)
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=causal)
                runs.append((o, *torch.autograd.grad(o, (q, k, v), dout)))
        assert override.torch_impl_calls >= before + 3
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ours = (out, *grads)

    def ref(dtype):
        qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        return (o, *torch.autograd.grad(o, (qr, kr, vr), dout.to(dtype)))

    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, ref(torch.float64), ref(torch.bfloat16)):
        assert_flash_rule(name, a, o, p, torch.bfloat16)
