"""GPU-only: the FA2 kernels at real sizes (N up to 8192, head dims up to 256), and every
launch config in the table on ragged shapes.  Skipped without CUDA (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from flash_module import ops, reference

from .helpers import assert_matches_reference, make_qkv

# Large sizes: under pytest-xdist with --dist loadgroup the tests of one group run one after
# another in one worker (scripts/gpu_check.sh runs that way).  test_large takes a few GB per
# case (its float32 oracle holds (N, N) score tiles per head), so its three modes run as three
# groups side by side (the file took over 10 minutes as one group on an H200), and so do the
# table configs' head dims (small, but each compiles its own kernels: 18 cases in a row took
# over 5 minutes); the rest, the int64 case among them (~26 GB), stay in one group.
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu_memory")]
MODES = [pytest.param(mode, marks=pytest.mark.xdist_group(f"gpu_large_{mode}"))
         for mode in ("fa2", "fa1", "tiling")]

BIG = [
    pytest.param(1, 8192, 8192, 2, 2, 128, torch.bfloat16, "bshd", id="8k-d128-bf16"),
    pytest.param(2, 4096, 4096, 4, 1, 64, torch.float16, "bhsd", id="4k-d64-mqa-fp16-bhsd"),
    pytest.param(1, 2048, 2048, 2, 2, 256, torch.bfloat16, "bshd", id="2k-d256-bf16"),
    pytest.param(1, 1000, 3001, 4, 2, 96, torch.bfloat16, "bhsd", id="1000x3001-d96-gqa-bf16"),
    pytest.param(1, 3001, 1000, 2, 2, 192, torch.float16, "bshd", id="3001x1000-d192-fp16"),
    pytest.param(2, 1023, 1023, 2, 2, 40, torch.float16, "bhsd", id="1023-d40-fp16"),
    pytest.param(1, 1024, 1536, 2, 2, 64, torch.float32, "bshd", id="1k-d64-fp32"),
    pytest.param(1, 257, 300, 2, 1, 64, torch.float64, "bshd", id="257x300-d64-fp64"),
]


def _check(b, sq, sk, h, h_kv, d, dtype, layout, causal, bottom_right=True, mode="fa2"):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, "cuda", layout)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device="cuda")
    scale = d**-0.5
    out, lse = ops.attention_fwd(q, k, v, scale, causal, bottom_right, mode)
    ours = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    # float32 is the oracle at these sizes (float64 only for float32/float64 inputs).
    hi = torch.float64 if dtype in (torch.float64, torch.float32) else torch.float32
    assert_matches_reference(ours, q, k, v, dout, causal, bottom_right, dtype, oracle_dtype=hi)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,dtype,layout", BIG)
@pytest.mark.parametrize("mode", MODES)
def test_large(mode, b, sq, sk, h, h_kv, d, dtype, layout, causal):
    _check(b, sq, sk, h, h_kv, d, dtype, layout, causal, mode=mode)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,sk", [(1, 65536), (32, 8192)], ids=["1x64k", "32x8k"])
def test_tiling_decode(b, sk, causal):
    """One query token against a long KV cache (GQA 32/8), the case split-KV exists for."""
    _check(b, 1, sk, 32, 8, 128, torch.bfloat16, "bshd", causal, mode="tiling")


@pytest.mark.parametrize("d", [pytest.param(d, marks=pytest.mark.xdist_group(f"gpu_table_{d}"), id=str(d))
                               for d in (16, 24, 40, 64, 96, 128, 160, 200, 256)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_table_configs_on_ragged_shapes(d, causal):
    """The config the table picks for each head-dim bucket, on partial tiles in every dim."""
    _check(1, 203, 317, 2, 1, d, torch.bfloat16, "bshd", causal)
    _check(1, 317, 203, 2, 1, d, torch.float16, "bhsd", causal, bottom_right=False)


def test_int64_offsets():
    """K/V with more than 2**31 elements: every offset product must be computed in int64."""
    sk = 2**24 + 77  # (1, sk, 1, 128) bf16 = 2.1e9 elements, 4.3 GB per tensor
    q = torch.randn(1, 16, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, sk, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, sk, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert k.numel() > 2**31
    out, lse = ops.attention_fwd(q, k, v, 128**-0.5, False, True, "fa2")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    with torch.no_grad():
        qf, kf, vf = q.float(), k.float(), v.float()
        ref_out, ref_lse = reference.attention_ref(qf, kf, vf, 128**-0.5, False, True)
    assert (out.float() - ref_out).abs().max().item() < 2e-2
    assert (lse - ref_lse).abs().max().item() < 1e-3
    # The tail of dV (offsets past 2**31 elements) must be the softmax-weighted dout.
    p_last = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf[:, -64:]) * 128**-0.5 - ref_lse[..., None])
    dv_tail = torch.einsum("bhqk,bqhd->bkhd", p_last, dout.float())
    assert (dv[:, -64:].float() - dv_tail).abs().max().item() < 2e-2
    assert torch.isfinite(dk[:, -64:]).all() and torch.isfinite(dq).all()
