"""FA2 Triton kernels, forward and backward, vs the float64 oracle (flash-attn's 2x rule).

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on a GPU
they run compiled; the same small cases run on both.  Large sizes live in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops

from .helpers import assert_flash_rule, make_qkv, max_err, reference_grads

DTYPES = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
]

# (batch, Sq, Sk, H, H_kv, D, layout, bottom_right): odd lengths, Sq != Sk both ways, GQA/MQA,
# head dims that are not powers of two, both memory layouts, both causal alignments.
SHAPES = [
    pytest.param(1, 1, 1, 2, 2, 64, "bshd", True, id="1x1-d64"),
    pytest.param(2, 17, 17, 2, 2, 16, "bhsd", True, id="17x17-d16-bhsd"),
    pytest.param(1, 113, 203, 4, 2, 40, "bshd", True, id="113x203-gqa2-d40"),
    pytest.param(1, 203, 113, 4, 1, 80, "bhsd", True, id="203x113-mqa-d80-bhsd"),
    pytest.param(1, 203, 113, 2, 2, 24, "bshd", False, id="203x113-d24-topleft"),
    pytest.param(1, 128, 128, 2, 2, 128, "bshd", True, id="128x128-d128"),
    pytest.param(2, 1, 203, 4, 2, 64, "bhsd", True, id="decode-1x203-gqa2-bhsd"),
    pytest.param(1, 70, 33, 3, 3, 72, "bshd", False, id="70x33-d72-topleft"),
]


def _run(q, k, v, dout, causal, bottom_right):
    """Our forward + backward through the op (the path both public APIs take)."""
    scale = q.shape[-1] ** -0.5
    out, lse = ops.attention_fwd(q, k, v, scale, causal, bottom_right, "fa2")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,layout,bottom_right", SHAPES)
def test_fa2_matches_oracle(b, sq, sk, h, h_kv, d, layout, bottom_right, dtype, causal, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device, layout)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    ours = _run(q, k, v, dout, causal, bottom_right)
    oracle = reference_grads(q, k, v, dout, causal, bottom_right, dtype=torch.float64)
    lowp = reference_grads(q, k, v, dout, causal, bottom_right)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
        assert a.dtype == (o.dtype if name == "lse" and dtype == torch.float64 else p.dtype), name
        assert_flash_rule(name, a, o, p, dtype)
    out, lse = ours[:2]
    assert out.shape == (b, sq, h, d) and out.is_contiguous()
    assert lse.shape == (b, h, sq) and lse.is_contiguous()


def test_rows_without_keys_are_zero(device):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing -> O = 0, LSE = -inf."""
    q, k, v = make_qkv(1, 40, 9, 2, 2, 32, torch.float32, device)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    empty = 40 - 9
    assert torch.all(out[:, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[:, :empty] == 0)


def test_backward_is_deterministic(device):
    q, k, v = make_qkv(2, 113, 203, 4, 1, 64, torch.float16, device)
    dout = torch.randn(2, 113, 4, 64, dtype=torch.float16, device=device)
    first = _run(q, k, v, dout, True, True)
    second = _run(q, k, v, dout, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_custom_scale(device):
    q, k, v = make_qkv(1, 33, 47, 2, 2, 32, torch.float32, device)
    out = fm.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True)
    ref, _ = fm.reference.attention_ref(q.double(), k.double(), v.double(), 0.3, True, True)
    assert max_err(out, ref) < 1e-5


def test_large_logits_stable(device):
    """Scores in the hundreds must not overflow: the online max keeps exp2's argument <= 0."""
    q, k, v = make_qkv(1, 65, 65, 2, 2, 32, torch.float32, device)
    q, k = (q * 30).detach(), (k * 30).detach()
    out = fm.flash_attn_func(q, k, v)
    ref, _ = fm.reference.attention_ref(q.double(), k.double(), v.double())
    lowp, _ = fm.reference.attention_ref(q, k, v)  # PyTorch's own fp32 error at these logits
    assert torch.isfinite(out).all()
    assert_flash_rule("out", out, ref, lowp, torch.float32)


def test_reference_mode_matches_fa2(device):
    """mode="reference" (the PyTorch CPU path) and the kernels agree."""
    q, k, v = make_qkv(1, 77, 91, 4, 2, 48, torch.float32, device)
    a = fm.flash_attn_func(q, k, v, causal=True)
    b = fm.flash_attn_func(q, k, v, causal=True, mode="reference")
    assert max_err(a, b) < 1e-5
