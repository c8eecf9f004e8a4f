"""Shared test helpers: random inputs and the flash-attn error rule."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from flash_module.reference import attention_ref

# Extra absolute tolerance on top of "2x PyTorch's own error", per dtype.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def make_qkv(b, sq, sk, h, h_kv, d, dtype, device, layout="bshd", requires_grad=True):
    """Random normal q, k, v (never zeros). ``layout="bhsd"`` returns transposed-storage views.

    Always returns (B, S, H, D)-shaped tensors; with "bhsd" their storage is (B, H, S, D), i.e.
    what an SDPA caller passes after ``.transpose(1, 2)``.
    """
    def one(s, heads):
        if layout == "bshd":
            t = torch.randn(b, s, heads, d, dtype=dtype, device=device)
        else:
            t = torch.randn(b, heads, s, d, dtype=dtype, device=device).transpose(1, 2)
        return t.requires_grad_(requires_grad)

    return one(sq, h), one(sk, h_kv), one(sk, h_kv)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), "non-finite values differ from the reference"
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def assert_flash_rule(name, ours, oracle, pytorch_lowp, dtype, factor=2.0):
    """flash-attn's rule: |ours - oracle| <= factor * |pytorch(dtype) - oracle| + atol."""
    err = max_err(ours, oracle)
    ref_err = max_err(pytorch_lowp, oracle)
    bound = factor * ref_err + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x pytorch's {ref_err:.3g} + {ATOL[dtype]:g}"


def reference_grads(q, k, v, dout, causal, bottom_right, softmax_scale=None, dtype=None, softcap=0.0,
                    alibi_slopes=None, window_size=(-1, -1), dropout_p=0.0, dropout_mask=None):
    """(out, lse, dq, dk, dv) of the naive reference, computed in ``dtype`` (default: the inputs')."""
    dtype = dtype or q.dtype
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qr, kr, vr, softmax_scale, causal, bottom_right, softcap, alibi_slopes,
                             window_size, dropout_p=dropout_p, dropout_mask=dropout_mask)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype))
    return out, lse, dq, dk, dv


def assert_matches_reference(ours, q, k, v, dout, causal, bottom_right, dtype, oracle_dtype=torch.float64,
                             softmax_scale=None, softcap=0.0, alibi_slopes=None,
                             window_size=(-1, -1), dropout_p=0.0, dropout_mask=None):
    """``ours`` = (out, lse, dq, dk, dv), or a prefix of it (None entries skipped): each within
    flash-attn's rule of the oracle computed in ``oracle_dtype``, against PyTorch's own error in
    ``dtype``."""
    variants = dict(softcap=softcap, alibi_slopes=alibi_slopes, window_size=window_size, dropout_p=dropout_p,
                    dropout_mask=dropout_mask)
    oracle = reference_grads(q, k, v, dout, causal, bottom_right, softmax_scale, oracle_dtype, **variants)
    lowp = reference_grads(q, k, v, dout, causal, bottom_right, softmax_scale, **variants)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
        if a is not None:  # None: not checked (e.g. an LSE the caller does not have)
            assert_flash_rule(name, a, o, p, dtype)


@contextlib.contextmanager
def example_module(name: str) -> Iterator[object]:
    """``examples/<name>.py`` imported as a module for the duration of the block."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def assert_compiles_like_eager(f, *inputs, grads: bool = True) -> None:
    """``torch.compile(f, fullgraph=True)`` (aot_eager) gives f's result on ``inputs`` and, with
    ``grads``, the same gradients for a random cotangent."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(*inputs)
    got = compiled(*inputs)
    torch.testing.assert_close(got, want)
    if grads:
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
            torch.testing.assert_close(a, b)
