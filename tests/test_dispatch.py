"""The algorithm table and the implementation switch (flash_module.ops), and where users find things.

``mode`` names the algorithm (fa2, fa1, tiling), ``impl`` the implementation (auto, triton,
torch).  One table in :mod:`flash_module.ops` maps each pair to a forward and a backward; these
tests check the table, the switch in every public entry point, and the errors for bad values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import flash_module as fm
from flash_module import ops

from .helpers import make_qkv, max_err


def test_table_covers_every_mode_and_impl():
    assert fm.MODES == ("fa2", "fa1", "tiling") == tuple(ops.ALGORITHMS)
    assert fm.IMPLS == ("auto", "triton", "torch")
    for mode, impls in ops.ALGORITHMS.items():
        assert set(impls) == {"triton", "torch"}, mode
        for impl in impls.values():
            assert callable(impl.forward) and callable(impl.backward)


@pytest.mark.parametrize("mode", fm.MODES)
def test_torch_impl_matches_kernels(mode, device):
    """impl='torch' (the PyTorch path) and the default (the kernels here) agree, fwd and bwd."""
    q, k, v = make_qkv(1, 37, 53, 4, 2, 24, torch.float32, device, "bhsd")
    dout = torch.randn(1, 37, 4, 24, device=device)
    res = []
    for impl in ("auto", "torch"):
        out = fm.flash_attn_func(q, k, v, causal=True, mode=mode, impl=impl, num_splits=3)
        res.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*res):
        assert max_err(a, b) < 1e-5


def test_impl_reaches_every_entry_point(device, monkeypatch):
    """impl='torch' is honoured by the SDPA API, the packed forms and the module: count the calls."""
    calls = []
    real = ops.ALGORITHMS["fa2"]["torch"]
    spy = ops.Implementation(lambda *a: calls.append("fwd") or real.forward(*a), real.backward)
    monkeypatch.setitem(ops.ALGORITHMS["fa2"], "torch", spy)
    q = torch.randn(1, 2, 9, 16, device=device)
    fm.scaled_dot_product_attention(q, q, q, is_causal=True, impl="torch")
    fm.flash_attn_qkvpacked_func(torch.randn(1, 9, 3, 2, 16, device=device), impl="torch")
    fm.flash_attn_kvpacked_func(q.transpose(1, 2), torch.randn(1, 9, 2, 2, 16, device=device), impl="torch")
    fm.FlashAttention(impl="torch")(q, q, q)
    assert calls == ["fwd"] * 4


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(mode="fa3"), r"mode must be one of \('fa2', 'fa1', 'tiling'\), got 'fa3'",
                 id="mode"),
    pytest.param(dict(impl="cuda"), r"impl must be one of \('auto', 'triton', 'torch'\), got 'cuda'",
                 id="impl"),
])
def test_bad_mode_or_impl(kwargs, match):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=match):
        fm.flash_attn_func(q, q, q, **kwargs)
    with pytest.raises(ValueError, match=match):
        fm.FlashAttention(**kwargs)


def test_reference_mode_is_a_deprecated_alias(device):
    q, k, v = make_qkv(1, 11, 13, 2, 2, 16, torch.float32, device, requires_grad=False)
    with pytest.warns(DeprecationWarning, match='impl="torch"'):
        a = fm.flash_attn_func(q, k, v, causal=True, mode="reference")
    b = fm.flash_attn_func(q, k, v, causal=True, impl="torch")
    assert torch.equal(a, b)


def test_triton_impl_without_kernels_is_a_clear_error():
    """On CPU without TRITON_INTERPRET=1 the kernels cannot run: impl='triton' says so."""
    code = ("import torch, flash_module as fm\n"
            "q = torch.randn(1, 4, 2, 16)\n"
            "try:\n    fm.flash_attn_func(q, q, q, impl='triton')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ValueError: impl='triton' needs CUDA tensors" in out.stdout, out.stdout + out.stderr


def test_findability():
    """The obvious calls work: fm.softmax(x), fm.ring_attention, the 0.1 softmax module path."""
    x = torch.randn(3, 50)
    torch.testing.assert_close(fm.softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(fm.softmax(x, dim=0, algorithm="tiling"), torch.softmax(x, 0))
    import flash_module.softmax as fsm  # 0.1's spelling: the module's names are on the function
    from flash_module.softmax import ALGORITHMS

    assert fsm.ALGORITHMS == ALGORITHMS == ("online", "tiling")
    torch.testing.assert_close(fsm.softmax(x), torch.softmax(x, -1))
    assert fm.ring_attention is fm.distributed.ring_attention


def test_deprecation_warning_points_at_the_caller():
    q = torch.randn(1, 4, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fm.flash_attn_func(q, q, q, mode="reference")
    assert caught and caught[0].filename == __file__


def test_which_implementation_names_the_path(device):
    """The path a call takes, in words: compiled kernels on CUDA, the interpreter on CPU under
    TRITON_INTERPRET=1 (as in this suite), the PyTorch path when asked for."""
    t = torch.zeros(1, device=device)
    expected = "Triton kernels compiled for" if device == "cuda" else "Triton kernels under the interpreter"
    assert fm.which_implementation(t).startswith(expected)
    assert fm.which_implementation(t, impl="torch").startswith("PyTorch path")
    with pytest.raises(ValueError, match="impl"):
        fm.which_implementation(t, impl="cuda")


def test_decode_shapes_route_fa2_to_split_kv(monkeypatch, device):
    """A few query tokens over many keys run the split-KV kernel under mode="fa2" (shapes only),
    with the same result and gradients; longer queries keep the FA2 kernel."""
    from flash_module.kernels import split_kv

    calls, real = [], split_kv.split_kv_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(split_kv, "split_kv_forward", spy)
    q = torch.randn(2, 3, 8, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 300, 2, 32, device=device, requires_grad=True) for _ in range(2))
    assert fm.ops.routes_to_split_kv(q, k)
    out = fm.flash_attn_func(q, k, v, causal=True, impl="triton")
    assert calls == [q.shape]
    ref = fm.flash_attn_func(q, k, v, causal=True, impl="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    longer = torch.randn(2, 40, 8, 32, device=device)
    assert not fm.ops.routes_to_split_kv(longer, k)
    fm.flash_attn_func(longer, k, v, impl="triton")
    assert len(calls) == 1
