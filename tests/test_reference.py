"""The seed's algorithms in :mod:`flash_module.reference` against the naive oracle, in float64.

* ``online_softmax`` / ``tiling_softmax`` against ``torch.softmax`` on awkward rows (odd lengths,
  huge magnitudes, ``-inf`` entries, leading ``-inf`` runs, a row that is entirely ``-inf``).
* ``fa1_forward`` / ``fa2_forward`` against :func:`attention_ref` (out and LSE) over block sizes,
  both causal alignments, Sq != Sk, GQA/MQA and odd head dims.
* ``fa2_backward`` against autograd through :func:`attention_ref`, with and without a gradient
  flowing into the LSE.
* The CPU path is fast enough to be used: a forward + backward at N=1024 takes seconds.

Everything here is plain PyTorch (no Triton), so float64 agreement is expected to ~1e-12.
"""

from __future__ import annotations

import time

import pytest
import torch

import flash_module as fm
from flash_module.reference import (
    attention_ref,
    fa1_forward,
    fa2_backward,
    fa2_forward,
    online_softmax,
    tiling_softmax,
)
from tests.helpers import max_err

TOL = 1e-10
NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------
# Softmax: online (streaming) and tiling (split + merge)
# ---------------------------------------------------------------------------------------------


def _softmax_rows(n: int) -> torch.Tensor:
    """(6, n) float64 rows; row 5 is entirely -inf (its softmax is undefined)."""
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(6, n, dtype=torch.float64, generator=g)
    rows[1] *= 1000.0  # huge magnitudes: exp overflows without max subtraction
    if n > 1:  # (a single-element row with a -inf would be the undefined all -inf case)
        rows[2, ::3] = NEG_INF  # scattered masked entries, index 0 included
        rows[3, : n - 1] = NEG_INF  # a long leading -inf run: the running max stays -inf for a while
    rows[4] = rows[4] - 50.0  # all very negative: exp underflows without max subtraction
    rows[5] = NEG_INF
    return rows


def _check_softmax(ours: torch.Tensor, x: torch.Tensor) -> None:
    expected = torch.softmax(x, dim=-1)
    defined = ~expected.isnan().any(dim=-1)  # torch gives NaN for an all -inf row: skip it
    assert defined.sum() == x.shape[0] - 1
    assert ours.dtype == x.dtype and ours.shape == x.shape
    assert not ours[defined].isnan().any()
    assert (ours[defined] - expected[defined]).abs().max() < TOL
    masked = (x == NEG_INF) & defined[:, None]
    assert torch.equal(ours[masked], torch.zeros_like(ours[masked])), "-inf entries must get exactly 0"
    # The all -inf row has no defined softmax.  Both functions currently return NaN there, like
    # torch.softmax; the attention code paths treat such rows as "output 0" instead.  Accept
    # either convention, but never a mix of garbage.
    undefined_row = ours[~defined]
    assert undefined_row.isnan().all() or torch.equal(undefined_row, torch.zeros_like(undefined_row))


LENGTHS = [pytest.param(n, id=f"n{n}") for n in (1, 17, 113)]


@pytest.mark.parametrize("block", [pytest.param(b, id=f"block{b}") for b in (1, 7, 128)])
@pytest.mark.parametrize("n", LENGTHS)
def test_online_softmax(n, block):
    x = _softmax_rows(n)
    _check_softmax(online_softmax(x, block=block), x)


@pytest.mark.parametrize("num_splits", [
    pytest.param(1, id="splits1"),
    pytest.param(3, id="splits3"),
    pytest.param(8, id="splits8"),
    pytest.param(500, id="splits500-more-than-elements"),
])
@pytest.mark.parametrize("n", LENGTHS)
def test_tiling_softmax(n, num_splits):
    x = _softmax_rows(n)
    _check_softmax(tiling_softmax(x, num_splits=num_splits), x)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda x: online_softmax(x, block=5), id="online"),
    pytest.param(lambda x: tiling_softmax(x, num_splits=4), id="tiling"),
])
def test_softmax_leading_dims_and_float32(fn):
    x = torch.randn(2, 3, 4, 29) * 10
    ours = fn(x)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert (ours.double() - torch.softmax(x.double(), dim=-1)).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# FA1 / FA2 forward
# ---------------------------------------------------------------------------------------------

# b, sq, sk, h, h_kv, d, causal, bottom_right, block_m, block_n
ATTENTION_CASES = [
    pytest.param(1, 64, 64, 2, 2, 32, False, True, 16, 16, id="square-b16x16"),
    pytest.param(2, 64, 64, 2, 2, 32, True, True, 32, 32, id="square-causal-b32x32"),
    pytest.param(1, 50, 50, 2, 2, 16, True, False, 64, 64, id="square-causal-topleft-b64x64"),
    pytest.param(1, 33, 70, 2, 2, 16, False, True, 32, 16, id="sq33-sk70-b32x16"),
    pytest.param(1, 23, 50, 2, 2, 16, True, True, 16, 32, id="sq23-sk50-causal-bottomright-b16x32"),
    pytest.param(1, 23, 50, 2, 2, 16, True, False, 16, 64, id="sq23-sk50-causal-topleft-b16x64"),
    pytest.param(2, 50, 23, 2, 2, 16, True, True, 64, 16, id="sq50-sk23-causal-bottomright-b64x16"),
    pytest.param(1, 50, 23, 2, 2, 16, True, False, 32, 16, id="sq50-sk23-causal-topleft-b32x16"),
    pytest.param(2, 37, 45, 4, 2, 16, True, True, 16, 16, id="gqa-h4-hkv2-causal-b16x16"),
    pytest.param(1, 37, 45, 4, 1, 16, False, True, 32, 64, id="mqa-h4-hkv1-b32x64"),
    pytest.param(1, 37, 45, 2, 2, 40, True, True, 16, 64, id="d40-causal-b16x64"),
    pytest.param(1, 1, 65, 2, 1, 24, True, True, 64, 32, id="single-query-d24-mqa"),
]

ALGOS = [pytest.param(fa1_forward, id="fa1"), pytest.param(fa2_forward, id="fa2")]


def _qkv(b, sq, sk, h, h_kv, d, requires_grad=False):
    g = torch.Generator().manual_seed(1000 * sq + sk + d + h_kv)
    return tuple(
        torch.randn(b, s, heads, d, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
        for s, heads in ((sq, h), (sk, h_kv), (sk, h_kv))
    )


def _empty_rows(sq, sk, causal, bottom_right):
    return max(sq - sk, 0) if causal and bottom_right else 0


@pytest.mark.parametrize("b, sq, sk, h, h_kv, d, causal, bottom_right, block_m, block_n", ATTENTION_CASES)
@pytest.mark.parametrize("algo", ALGOS)
def test_forward_matches_oracle(algo, b, sq, sk, h, h_kv, d, causal, bottom_right, block_m, block_n):
    q, k, v = _qkv(b, sq, sk, h, h_kv, d)
    out, lse = algo(q, k, v, None, causal, bottom_right, block_m=block_m, block_n=block_n)
    out_ref, lse_ref = attention_ref(q, k, v, None, causal, bottom_right)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float64
    assert max_err(out, out_ref) < TOL  # max_err also requires the same non-finite positions
    assert max_err(lse, lse_ref) < TOL
    assert not out.isnan().any() and not lse.isnan().any()
    empty = _empty_rows(sq, sk, causal, bottom_right)
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert (lse[..., :empty] == NEG_INF).all()
    assert torch.isfinite(lse[..., empty:]).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_forward_custom_scale(algo):
    q, k, v = _qkv(1, 20, 30, 2, 2, 16)
    out, lse = algo(q, k, v, 0.7, True, True, block_m=16, block_n=16)
    out_ref, lse_ref = attention_ref(q, k, v, 0.7, True, True)
    assert max_err(out, out_ref) < TOL
    assert max_err(lse, lse_ref) < TOL


# ---------------------------------------------------------------------------------------------
# FA2 backward
# ---------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    pytest.param(1, 40, 40, 2, 2, 32, False, True, 16, id="square-bn16"),
    pytest.param(2, 40, 40, 2, 2, 32, True, True, 128, id="square-causal-bn128"),
    pytest.param(1, 23, 50, 2, 2, 16, True, True, 16, id="sq23-sk50-causal-bottomright-bn16"),
    pytest.param(1, 23, 50, 2, 2, 16, True, False, 32, id="sq23-sk50-causal-topleft-bn32"),
    pytest.param(1, 50, 23, 2, 2, 16, True, True, 16, id="sq50-sk23-causal-bottomright-bn16"),
    pytest.param(1, 50, 23, 2, 2, 16, True, False, 128, id="sq50-sk23-causal-topleft-bn128"),
    pytest.param(2, 37, 45, 4, 2, 40, True, True, 16, id="gqa-h4-hkv2-d40-causal-bn16"),
    pytest.param(1, 37, 45, 4, 1, 24, False, True, 32, id="mqa-h4-hkv1-bn32"),
]


@pytest.mark.parametrize("with_dlse", [pytest.param(False, id="no-dlse"), pytest.param(True, id="dlse")])
@pytest.mark.parametrize("b, sq, sk, h, h_kv, d, causal, bottom_right, block_n", BACKWARD_CASES)
def test_fa2_backward_matches_autograd(b, sq, sk, h, h_kv, d, causal, bottom_right, block_n, with_dlse):
    q, k, v = _qkv(b, sq, sk, h, h_kv, d, requires_grad=True)
    out, lse = attention_ref(q, k, v, None, causal, bottom_right)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    dlse = torch.randn(lse.shape, dtype=torch.float64, generator=g) if with_dlse else None
    if with_dlse:
        expected = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    else:
        expected = torch.autograd.grad(out, (q, k, v), dout)

    ours = fa2_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None,
                        causal, bottom_right, dlse=dlse, block_n=block_n)
    for name, g_ours, g_ref, t in zip(("dq", "dk", "dv"), ours, expected, (q, k, v)):
        assert g_ours.shape == t.shape, name
        assert not g_ours.isnan().any(), name
        assert max_err(g_ours, g_ref) < TOL, name
    empty = _empty_rows(sq, sk, causal, bottom_right)
    assert torch.equal(ours[0][:, :empty], torch.zeros_like(ours[0][:, :empty]))


def test_fa2_backward_dlse_matters():
    """Guard for the test above: a nonzero dlse changes the gradients."""
    q, k, v = _qkv(1, 16, 16, 2, 2, 16)
    out, lse = attention_ref(q, k, v)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    without = fa2_backward(dout, q, k, v, out, lse)
    with_lse = fa2_backward(dout, q, k, v, out, lse, dlse=dlse)
    assert max_err(with_lse[0], without[0]) > 1e-3
    assert max_err(with_lse[1], without[1]) > 1e-3
    assert max_err(with_lse[2], without[2]) < TOL  # dV does not depend on the LSE


def test_fa2_forward_then_backward_roundtrip():
    """The CPU path end to end: fa2_forward's (out, lse) feed fa2_backward."""
    q, k, v = _qkv(2, 45, 37, 4, 2, 40, requires_grad=True)
    out_ref, lse_ref = attention_ref(q, k, v, None, True, True)
    dout = torch.randn_like(out_ref)
    expected = torch.autograd.grad(out_ref, (q, k, v), dout)
    out, lse = fa2_forward(q.detach(), k.detach(), v.detach(), None, True, True, block_m=16, block_n=16)
    ours = fa2_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, None, True, True, block_n=16)
    for name, g_ours, g_ref in zip(("dq", "dk", "dv"), ours, expected):
        assert max_err(g_ours, g_ref) < TOL, name


# ---------------------------------------------------------------------------------------------
# Speed of the CPU path
# ---------------------------------------------------------------------------------------------


def test_cpu_path_speed():
    b, h, n, d = 2, 4, 1024, 64
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    dout = torch.randn(b, n, h, d)
    start = time.perf_counter()
    out, lse = fa2_forward(q, k, v)
    dq, dk, dv = fa2_backward(dout, q, k, v, out, lse)
    elapsed = time.perf_counter() - start
    assert all(torch.isfinite(t).all() for t in (out, lse, dq, dk, dv))
    assert elapsed < 20.0, f"fa2_forward + fa2_backward took {elapsed:.1f} s at B=2, H=4, N=1024, D=64"


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("mode", ["fa2", "fa1", "tiling"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_pytorch_path_memory_is_linear(mode, causal):
    """impl='torch' never builds an (Sq, Sk) tensor, forward or backward, in any mode (the
    largest intermediate is a (Sq, block) score tile)."""
    n = 2048
    q, k, v = (torch.randn(1, n, 1, 16, requires_grad=True) for _ in range(3))
    with _LargestTensor() as seen:
        out = fm.flash_attn_func(q, k, v, causal=causal, mode=mode, impl="torch")
        out.sum().backward()
    assert seen.numel <= n * 256, f"largest tensor has {seen.numel} elements (Sq*Sk = {n * n})"
