"""Sliding-window (local) attention (issue #13: Mistral, Gemma; flash-attn's ``window_size``):
query i sees keys [i + Sk - Sq - left, i + Sk - Sq + right] (-1 = unbounded; causal sets right = 0),
forward and backward, in every entry point that takes it (dense with modes fa2 and tiling, packed,
varlen per sequence, KV cache, SDPA extension, modules), on the Triton kernels and the PyTorch
path, against the float64 oracle with flash-attn's 2x rule.

The shapes span several 64-key blocks (the interpreter's tiles), so the kernels' three key ranges
(the window's left edge masked, the full blocks unmasked, the right edge / diagonal masked) and
the skipped blocks outside the window all occur."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.kernels._common import window_args
from flash_module.reference import attention_ref

from .helpers import assert_compiles_like_eager, assert_flash_rule, assert_matches_reference, make_qkv

IMPLS = ["triton", "torch"]

# (B, Sq, Sk, H, H_kv, D, causal, window): Sq != Sk both ways, GQA, odd head dims; windows
# narrower than a block, wider than several, one-sided, and Sq > Sk where rows see no key.
CASES = [
    pytest.param(1, 300, 300, 4, 2, 40, True, (70, -1), id="300-gqa2-d40-causal-left70"),
    pytest.param(2, 150, 230, 2, 2, 32, False, (40, 9), id="150x230-full-40-9", marks=pytest.mark.slow),
    pytest.param(1, 230, 150, 2, 1, 24, False, (0, 0), id="230x150-mqa-diagonal",
                 marks=pytest.mark.slow),
    pytest.param(1, 200, 200, 2, 2, 72, False, (-1, 17), id="200-d72-right17-only", marks=pytest.mark.slow),
    pytest.param(1, 17, 300, 2, 2, 16, True, (100, 50), id="17x300-causal-right-ignored",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fa2", pytest.param("tiling", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal,window", CASES)
def test_window_matches_oracle(b, sq, sk, h, h_kv, d, causal, window, dtype, mode, impl, device):
    q, k, v = make_qkv(b, sq, sk, h, h_kv, d, dtype, device)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=causal, window_size=window, mode=mode, impl=impl,
                                     return_attn_probs=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference((out, lse, dq, dk, dv), q, k, v, dout, causal, True, dtype, window_size=window)


@pytest.mark.slow  # ~12 s on CPU
def test_window_composes_with_softcap_and_alibi(device):
    q, k, v = make_qkv(2, 130, 200, 4, 2, 32, torch.float32, device)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    variants = dict(softcap=3.0, alibi_slopes=slopes, window_size=(50, 20))
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=False, return_attn_probs=True, **variants)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference((out, lse, *grads), q, k, v, dout, False, True, torch.float32, **variants)


@pytest.mark.parametrize("impl", IMPLS)
def test_probs_are_zero_outside_the_window(impl, device):
    """``return_attn_probs`` gives the windowed probabilities, and a window changes the answer."""
    q, k, v = make_qkv(1, 9, 12, 2, 2, 16, torch.float64, device, requires_grad=False)
    plain = fm.flash_attn_func(q, k, v, impl=impl)
    out, lse, probs = fm.flash_attn_func(q, k, v, window_size=(2, 1), impl=impl, return_attn_probs=True)
    assert (out - plain).abs().max() > 1e-3
    i = torch.arange(9, device=device)[:, None] + 3  # + Sk - Sq
    j = torch.arange(12, device=device)[None, :]
    inside = (j >= i - 2) & (j <= i + 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 16**-0.5
    want = torch.softmax(s.masked_fill(~inside, float("-inf")), -1)
    torch.testing.assert_close(probs, want, atol=1e-12, rtol=0)
    assert (probs[..., ~inside] == 0).all()


def test_rows_whose_window_is_empty_give_zero_and_no_nan(device):
    """Sq > Sk with a window of (0, 0): the first Sq - Sk rows see no key (0, LSE -inf), and their
    gradients are zero, not NaN."""
    q, k, v = make_qkv(1, 80, 10, 2, 2, 16, torch.float32, device)
    out, lse, _ = fm.flash_attn_func(q, k, v, window_size=(0, 0), return_attn_probs=True)
    assert (out[:, :70] == 0).all() and torch.isinf(lse[..., :70]).all()
    assert torch.isfinite(lse[..., 70:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :70] == 0).all()


def test_head_dim_0_lse_counts_the_window(device):
    """With head dim 0 every score is 0, so the LSE is log(keys in the window): the no-work path
    must know the window too."""
    q = torch.randn(1, 6, 2, 0, device=device)
    k = torch.randn(1, 9, 2, 0, device=device)
    _, lse = ops.attention_fwd(q, k, k, 1.0, False, True, "fa2", 0, "auto", 0.0, None, 2, 1)
    i = torch.arange(6, device=device) + 3
    seen = (torch.minimum(i + 2, torch.tensor(9, device=device)) - (i - 2).clamp(min=0)).double()
    torch.testing.assert_close(lse[0, 0].double(), seen.log())


def test_window_args_fold_causal_and_unbounded_sides():
    assert window_args((-1, -1), False) == (0, 0, False, False)
    assert window_args((-1, -1), True) == (0, 0, False, True)
    assert window_args((-1, 0), False) == (0, 0, False, True)  # a window that is just causal
    assert window_args((5, 7), True)[1:] == (0, True, False)  # causal overrides right
    left, right, on, causal = window_args((5, -1), False)
    assert (left, on, causal) == (5, True, False) and right >= 1 << 30


@pytest.mark.parametrize("impl", ["triton", pytest.param("torch", marks=pytest.mark.slow)])
def test_varlen_window_per_sequence(impl, device):
    lens_q, lens_k, h, h_kv, d, window = [3, 0, 140, 1], [140, 7, 140, 0], 4, 2, 32, (30, 5)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), h, d, device=device).requires_grad_()
    k, v = (torch.randn(sum(lens_k), h_kv, d, device=device).requires_grad_() for _ in range(2))
    out = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, window_size=window, impl=impl)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[i]), int(cu_q[i + 1]))
        rk = slice(int(cu_k[i]), int(cu_k[i + 1]))
        if lq == 0 or lk == 0:
            continue
        ours = (out[None, rq], None, grads[0][None, rq], grads[1][None, rk], grads[2][None, rk])
        qs, ks, vs = (t[None, r].detach() for t, r in ((q, rq), (k, rk), (v, rk)))
        assert_matches_reference(ours, qs, ks, vs, dout[None, rq], False, True, torch.float32,
                                 window_size=window)


# Default run: decode on a contiguous cache and 3 queries on a paged one; the rest are slow.
KV_WINDOW = [pytest.param(impl, sq, paged, id=f"{impl}-sq{sq}-{'paged' if paged else 'contiguous'}",
                          marks=() if (impl, sq, paged) in {("triton", 1, False), ("triton", 3, True)}
                          else pytest.mark.slow)
             for impl in IMPLS for sq in (1, 3) for paged in (False, True)]


@pytest.mark.parametrize("impl,sq,paged", KV_WINDOW)
def test_kvcache_window(impl, sq, paged, device):
    """Decode over a cache with a window: each batch's window ends at its own length; the split
    count is automatic and explicit."""
    b, h, h_kv, d, cap, window = 2, 4, 2, 32, 256, (70, 0)
    q = torch.randn(b, sq, h, d, device=device)
    kc, vc = (torch.randn(b, cap, h_kv, d, device=device) for _ in range(2))
    lens = [200, 37]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    extra = {}
    if paged:
        page = 64
        table = torch.randperm(b * cap // page, device=device).to(torch.int32).view(b, cap // page)
        pages_k, pages_v = (torch.empty(b * cap // page, page, h_kv, d, device=device) for _ in range(2))
        for i in range(b):
            for p in range(cap // page):
                pages_k[table[i, p]] = kc[i, p * page:(p + 1) * page]
                pages_v[table[i, p]] = vc[i, p * page:(p + 1) * page]
        caches, extra = (pages_k, pages_v), dict(block_table=table)
    else:
        caches = (kc, vc)
    for splits in (0, 3):
        out = fm.flash_attn_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True, window_size=window,
                                         num_splits=splits, impl=impl, **extra)
        for i, n in enumerate(lens):
            keys = kc[i:i + 1, :n], vc[i:i + 1, :n]
            o64, _ = attention_ref(q[i:i + 1].double(), *(t.double() for t in keys), None, True, True,
                                   window_size=window)
            o32, _ = attention_ref(q[i:i + 1], *keys, None, True, True, window_size=window)
            assert_flash_rule(f"out[{i}] splits={splits}", out[i:i + 1], o64, o32, torch.float32)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_modules_and_sdpa_pass_window(layout, device):
    q, k, v = make_qkv(1, 70, 70, 2, 2, 16, torch.float64, device, layout, requires_grad=False)
    attn = fm.FlashAttention(causal=True, window_size=(9, -1), layout=layout)
    want = fm.flash_attn_func(q, k, v, causal=True, window_size=(9, -1))  # Sq == Sk: alignments agree
    got = attn(*(t if layout == "bshd" else t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(got if layout == "bshd" else got.transpose(1, 2), want)
    assert "window_size=(9, -1)" in repr(attn)
    mha = fm.MultiheadFlashAttention(32, 2, causal=True, window_size=(4, 0), dtype=torch.float64,
                                     device=device)
    assert mha.attn.window_size == (4, 0)


def test_sdpa_window_is_top_left_aligned(device):
    """Our SDPA's ``window_size`` aligns like its ``is_causal``: query i sees [i - left, i + right]."""
    q, k, v = make_qkv(1, 5, 9, 2, 2, 16, torch.float64, device, requires_grad=False)
    got = fm.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), window_size=(1, 2))
    want, _ = attention_ref(q, k, v, None, False, False, window_size=(1, 2))
    torch.testing.assert_close(got.transpose(1, 2), want)


@pytest.mark.slow  # opcheck + compile: CI's slow run and the GPU check
def test_window_opcheck_and_compile(device):
    q, k, v = make_qkv(1, 70, 90, 4, 2, 32, torch.float32, device)
    args = (q, k, v, 0.2, False, True, "fa2", 0, "auto", 0.0, None, 20, 3)
    torch.library.opcheck(ops.attention_fwd, args)
    out, lse = ops.attention_fwd(*(t.detach() for t in (q, k, v)), *args[3:])
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out,
                                              lse, None, 0.2, False, True, "fa2", "auto", 0.0, None, 20, 3))

    def f(q, k, v):
        return fm.flash_attn_func(q, k, v, causal=True, window_size=(20, 0))

    assert_compiles_like_eager(f, q, k, v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal, window, alibi", [
    pytest.param(True, (-1, -1), False, id="causal"),
    pytest.param(True, (9, -1), True, id="causal-window9-alibi"),
    pytest.param(False, (4, 6), False, id="window4-6"),
])
def test_shift_moves_the_diagonal(impl, causal, window, alibi, device):
    """The ops' ``shift`` (ring attention's chunk distance): query i's diagonal key moves to
    i + shift, with the causal mask, the window and ALiBi's distances.  Equal to the same
    attention with ``shift`` unseen query rows in front (top-left alignment), whose last Sq
    rows are ours."""
    b, sq, sk, h, d, shift = 1, 19, 90, 2, 16, 70
    q, k, v = make_qkv(b, sq, sk, h, h, d, torch.float32, device)
    dout = torch.randn(b, sq, h, d, device=device)
    slopes = torch.tensor([0.25, 0.5], device=device) if alibi else None
    variants = (0.0, slopes, *window)  # softcap, alibi_slopes, window_left, window_right
    out, lse = ops.attention_fwd(q, k, v, 0.3, causal, False, "fa2", 0, impl, *variants, shift=shift)
    dq, dk, dv = ops.attention_bwd(dout, q, k, v, out, lse, None, 0.3, causal, False, "fa2", impl, *variants,
                                   shift=shift)
    pad = torch.randn(b, shift, h, d, device=device)
    qp, kp, vp = (t.double().requires_grad_() for t in (torch.cat([pad, q], 1), k, v))
    ref, ref_lse = attention_ref(qp, kp, vp, 0.3, causal, False, alibi_slopes=slopes, window_size=window)
    grads = torch.autograd.grad(ref, (qp, kp, vp), torch.cat([torch.zeros_like(pad), dout], 1).double())
    for ours, theirs in ((out, ref[:, shift:]), (lse, ref_lse[:, :, shift:]), (dq, grads[0][:, shift:]),
                         (dk, grads[1]), (dv, grads[2])):
        torch.testing.assert_close(ours.double(), theirs, atol=2e-5, rtol=1e-4)


def test_window_size_as_integer_tensors_like_flash_attn_tests(device):
    """flash-attn's own tests pass ``window_size = torch.randint(0, seqlen_k, (2,))``: a pair of
    integer tensors is the same window as the pair of ints, in every entry point; floats and
    bools are still a TypeError."""
    q, k, v = make_qkv(1, 40, 50, 2, 1, 16, torch.float32, device, requires_grad=False)
    window = torch.tensor([7, 3])
    expected = fm.flash_attn_func(q, k, v, window_size=(7, 3))
    assert torch.equal(fm.flash_attn_func(q, k, v, window_size=window), expected)
    assert torch.equal(fm.flash_attn_func(q, k, v, window_size=(window[0], window[1])), expected)
    cu_q = torch.tensor([0, 40], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 50], dtype=torch.int32, device=device)
    varlen = (q[0], k[0], v[0], cu_q, cu_k, 40, 50)
    assert torch.equal(fm.flash_attn_varlen_func(*varlen, window_size=window),
                       fm.flash_attn_varlen_func(*varlen, window_size=(7, 3)))
    cache = (q[:, :1], k.clone(), v.clone())
    assert torch.equal(fm.flash_attn_with_kvcache(*cache, cache_seqlens=30, window_size=window),
                       fm.flash_attn_with_kvcache(*cache, cache_seqlens=30, window_size=(7, 3)))
    for bad in ((7.0, 3), (True, 3), torch.tensor([7.0, 3.0]), torch.tensor([[7, 3]]), (7,)):
        with pytest.raises(TypeError, match="window_size"):
            fm.flash_attn_func(q, k, v, window_size=bad)
