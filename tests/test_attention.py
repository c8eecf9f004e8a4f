"""Every attention mode's Triton kernels, forward and backward, vs the float64 oracle
(flash-attn's 2x rule), and the modes against each other.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on a GPU
they run compiled; the same small cases run on both.  Large sizes live in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module._runtime import lse_dtype

from .helpers import assert_flash_rule, make_qkv, max_err, reference_grads

KERNEL_MODES = [pytest.param(m, id=m) for m in ("fa2", "fa1", "tiling")]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# (mode, dtype) pairs of the default run; the rest are marked slow (CI runs them: -m slow).
# (fp64 runs in test_ops.py's gradcheck by default.)
DEFAULT_MODE_DTYPES = {("fa2", "bf16"), ("fa2", "fp32"), ("fa1", "fp32"), ("tiling", "fp32")}
MODE_DTYPES = [
    pytest.param(mode, dtype, id=f"{mode}-{name}",
                 marks=() if (mode, name) in DEFAULT_MODE_DTYPES else pytest.mark.slow)
    for mode in ("fa2", "fa1", "tiling") for name, dtype in DTYPES.items()
]

# (batch, Sq, Sk, H, H_kv, D, layout, bottom_right): odd lengths, Sq != Sk both ways, GQA/MQA,
# head dims that are not powers of two, both memory layouts, both causal alignments.
SHAPES = [
    pytest.param(1, 1, 1, 2, 2, 64, "bshd", True, id="1x1-d64"),
    pytest.param(2, 17, 17, 2, 2, 16, "bhsd", True, id="17x17-d16-bhsd"),
    pytest.param(1, 113, 203, 4, 2, 40, "bshd", True, id="113x203-gqa2-d40"),
    pytest.param(1, 203, 113, 4, 1, 80, "bhsd", True, id="203x113-mqa-d80-bhsd", marks=pytest.mark.slow),
    pytest.param(1, 203, 113, 2, 2, 24, "bshd", False, id="203x113-d24-topleft"),
    pytest.param(1, 128, 128, 2, 2, 128, "bshd", True, id="128x128-d128"),
    # (decode shapes run by default in test_dispatch.py and test_kvcache.py)
    pytest.param(2, 1, 203, 4, 2, 64, "bhsd", True, id="decode-1x203-gqa2-bhsd", marks=pytest.mark.slow),
    pytest.param(1, 70, 33, 3, 3, 72, "bshd", False, id="70x33-d72-topleft"),
]


def _run(q, k, v, dout, causal, bottom_right, mode="fa2", num_splits=0):
    """Our forward + backward through the op (the path both public APIs take)."""
    scale = q.shape[-1] ** -0.5
    out, lse = ops.attention_fwd(q, k, v, scale, causal, bottom_right, mode, num_splits)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,layout,bottom_right", SHAPES)
@pytest.mark.parametrize("mode,dtype", MODE_DTYPES)
def test_mode_matches_oracle(mode, b, sq, sk, h, h_kv, d, layout, bottom_right, dtype, causal, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device, layout)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    ours = _run(q, k, v, dout, causal, bottom_right, mode)
    oracle = reference_grads(q, k, v, dout, causal, bottom_right, dtype=torch.float64)
    lowp = reference_grads(q, k, v, dout, causal, bottom_right)
    for name, a, o, p in zip(["out", "lse", "dq", "dk", "dv"], ours, oracle, lowp):
        assert a.dtype == (lse_dtype(dtype) if name == "lse" else dtype), name
        assert_flash_rule(name, a, o, p, dtype)
    out, lse = ours[:2]
    assert out.shape == (b, sq, h, d) and out.is_contiguous()
    assert lse.shape == (b, h, sq) and lse.is_contiguous()


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_rows_without_keys_are_zero(mode, device):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing -> O = 0, LSE = -inf."""
    q, k, v = make_qkv(1, 40, 9, 2, 2, 32, torch.float32, device)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, mode=mode)
    empty = 40 - 9
    assert torch.all(out[:, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[:, :empty] == 0)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) for m in ("fa2", "fa1", "tiling")])
def test_backward_is_deterministic(mode, device, deterministic_algorithms):
    q, k, v = make_qkv(2, 113, 203, 4, 1, 64, torch.float16, device)
    dout = torch.randn(2, 113, 4, 64, dtype=torch.float16, device=device)
    first = _run(q, k, v, dout, True, True, mode)
    second = _run(q, k, v, dout, True, True, mode)
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


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_large_logits_backward_fp32(mode, impl, device):
    """fp32 with logits ~1e3: every gradient within flash-attn's rule.  The backward recomputes
    P from the saved LSE; an fp32 LSE (half an ulp = 3e-5 at 1e3) made dV 2-4x torch's own fp32
    error, so fp32 inputs save a float64 LSE (issue #10, defect 3)."""
    scale = 150.0  # |scale * q.k| up to ~2e3 at D = 32
    q, k, v = make_qkv(1, 64, 80, 2, 1, 32, torch.float32, device)
    dout = torch.randn(1, 64, 2, 32, device=device)
    out, lse = ops.attention_fwd(q, k, v, scale, True, True, mode, 3 if mode == "tiling" else 0, impl)
    assert lse.dtype == torch.float64
    ours = (out, *torch.autograd.grad(out, (q, k, v), dout))
    oracle = reference_grads(q, k, v, dout, True, True, scale, dtype=torch.float64)
    lowp = reference_grads(q, k, v, dout, True, True, scale)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, oracle[:1] + oracle[2:], lowp[:1] + lowp[2:]):
        assert_flash_rule(name, a, o, p, torch.float32)


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("mode", ["fa1", "tiling"])
def test_modes_agree_with_fa2(mode, impl, device):
    """Every mode, in either implementation, computes the same function as the default one."""
    q, k, v = make_qkv(1, 77, 91, 4, 2, 48, torch.float32, device)
    a = fm.flash_attn_func(q, k, v, causal=True)
    b = fm.flash_attn_func(q, k, v, causal=True, mode=mode, impl=impl)
    assert max_err(a, b) < 1e-5


@pytest.mark.parametrize("num_splits", [1] + [pytest.param(n, marks=pytest.mark.slow) for n in (3, 2, 7, 64)],
                         ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("sq", [1] + [pytest.param(n, marks=pytest.mark.slow) for n in (5, 70)],
                         ids=lambda n: f"sq{n}")
def test_tiling_num_splits(num_splits, sq, device):
    """Any split count (more splits than key blocks included) gives the same answer."""
    q, k, v = make_qkv(2, sq, 203, 4, 2, 32, torch.float32, device)
    dout = torch.randn(2, sq, 4, 32, device=device)
    ours = _run(q, k, v, dout, True, True, "tiling", num_splits)
    oracle = reference_grads(q, k, v, dout, True, True, dtype=torch.float64)
    for a, o in zip(ours, oracle):
        assert max_err(a, o) < 2e-5


def test_bad_num_splits():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="num_splits"):
        fm.flash_attn_func(q, q, q, mode="tiling", num_splits=-1)


def test_fa1_block_sizes_follow_the_paper():
    """Bc = ceil(M / 4d), Br = min(Bc, d), rounded to powers of two (M = SRAM in fp32 words)."""
    from flash_module.configs import KernelConfig, fa1_blocks, override

    cpu = torch.device("cpu")
    # 64 KiB of SRAM: M = 16384 words; d = 64: Bc = 64, Br = min(64, 64) = 64.
    assert fa1_blocks(torch.float16, 64, cpu) == (64, 64)
    # d = 128: Bc = 32, Br = min(32, 128) = 32.
    assert fa1_blocks(torch.float16, 128, cpu) == (32, 32)
    with override(fa1=KernelConfig(16, 32)):
        assert fa1_blocks(torch.float16, 64, cpu) == (16, 32)


# ----------------------------------------------------------------------------------------------
# merge_attention_states
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_two_halves_equals_full_attention(dtype, device):
    q, k, v = make_qkv(2, 33, 90, 4, 2, 32, dtype, device, requires_grad=False)
    out_a, lse_a, _ = fm.flash_attn_func(q, k[:, :40], v[:, :40], return_attn_probs=True)
    out_b, lse_b, _ = fm.flash_attn_func(q, k[:, 40:], v[:, 40:], return_attn_probs=True)
    out, lse = fm.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = fm.reference.attention_ref(q.double(), k.double(), v.double())
    lowp, _ = fm.reference.attention_ref(q, k, v)
    assert_flash_rule("out", out, ref, lowp, dtype, factor=3.0)
    assert max_err(lse, ref_lse) < 1e-5
    assert out.dtype == dtype and lse.dtype == torch.float32


def test_merge_with_empty_part(device):
    """A part that saw no key (lse = -inf) contributes nothing; both empty -> 0 and -inf."""
    out_a = torch.randn(1, 3, 2, 8, device=device)
    lse_a = torch.randn(1, 2, 3, device=device)
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    out, lse = fm.merge_attention_states(out_a, lse_a, empty_out, empty_lse)
    assert torch.allclose(out, out_a) and torch.allclose(lse, lse_a)
    out, lse = fm.merge_attention_states(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_merge_gradcheck_and_opcheck(device):
    args = (torch.randn(1, 5, 2, 4, device=device, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 2, 5, device=device, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 5, 2, 4, device=device, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 2, 5, device=device, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: fm.merge_attention_states(*a), args)
    torch.library.opcheck(ops.merge_attention_states, args)


def test_merge_bad_input():
    out, lse = torch.randn(1, 5, 2, 4), torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match=r"lse_\* \(B, H, S\)"):
        fm.merge_attention_states(out, lse, out, torch.randn(1, 5, 2))
    with pytest.raises(TypeError, match="out_b must be a torch.Tensor"):
        fm.merge_attention_states(out, lse, None, lse)
