"""Property-based fuzz of the public attention API against the float64 oracle (hypothesis):
dense calls, the variants, packed sequences and KV-cache decoding.

Each example draws a shape (odd lengths, Sq != Sk both ways, GQA/MQA, head dims that are not
powers of two), a layout, causal or not, an entry point (flash-attn's or SDPA's, with their two
causal alignments), a mode and an implementation, then checks out, dq, dk and dv with
flash-attn's rule (2x PyTorch's own error in the dtype, plus a small atol).

The budget is small and fixed in CI (``derandomize``: the same examples every run); set
``FLASH_FUZZ_EXAMPLES`` for a longer run, e.g. ``FLASH_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import flash_module as fm
from flash_module.reference import attention_ref

from .helpers import assert_flash_rule, assert_matches_reference, make_qkv, reference_grads

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("FLASH_FUZZ_EXAMPLES", "12"))


@st.composite
def cases(draw):
    h_kv = draw(st.sampled_from([1, 2]))
    return dict(
        b=draw(st.integers(1, 2)),
        sq=draw(st.integers(1, 80)),
        sk=draw(st.integers(1, 80)),
        h_kv=h_kv,
        h=h_kv * draw(st.sampled_from([1, 2, 3])),
        d=draw(st.sampled_from([8, 16, 24, 40, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        layout=draw(st.sampled_from(["bshd", "bhsd"])),
        causal=draw(st.booleans()),
        api=draw(st.sampled_from(["flash", "sdpa"])),
        mode=draw(st.sampled_from(fm.MODES)),
        impl=draw(st.sampled_from(["auto", "torch"])),
    )


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=cases())
def test_public_api_matches_oracle(case, device):
    c = case
    q, k, v = make_qkv(c["b"], c["sq"], c["sk"], c["h"], c["h_kv"], c["d"], c["dtype"], device, c["layout"])
    dout = torch.randn(c["b"], c["sq"], c["h"], c["d"], dtype=c["dtype"], device=device)
    kw = dict(mode=c["mode"], impl=c["impl"], num_splits=2 if c["mode"] == "tiling" else 0)
    if c["api"] == "flash":  # (B, S, H, D), bottom-right causal
        out = fm.flash_attn_func(q, k, v, causal=c["causal"], **kw)
    else:  # (B, H, S, D), top-left causal
        out = fm.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=c["causal"],
                                              enable_gqa=True, **kw).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    bottom_right = c["api"] == "flash"
    oracle = reference_grads(q, k, v, dout, c["causal"], bottom_right, dtype=torch.float64)
    lowp = reference_grads(q, k, v, dout, c["causal"], bottom_right)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], (out, *grads), (oracle[0], *oracle[2:]),
                             (lowp[0], *lowp[2:])):
        assert_flash_rule(f"{name} {c}", a, o, p, c["dtype"])


@st.composite
def variant_cases(draw):
    """A dense call with flash-attn's variants: a sliding window (either side unbounded, 0 or a
    few keys), softcap, ALiBi slopes per head or per (batch, head), over both layouts and the
    modes that take them."""
    h_kv = draw(st.sampled_from([1, 2]))
    b = draw(st.integers(1, 2))
    h = h_kv * draw(st.sampled_from([1, 2, 3]))
    return dict(
        b=b, sq=draw(st.integers(1, 70)), sk=draw(st.integers(1, 70)), h_kv=h_kv, h=h,
        d=draw(st.sampled_from([8, 24, 40, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        layout=draw(st.sampled_from(["bshd", "bhsd"])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (-1, 0), (0, 0), (5, -1), (17, 3), (1, 40)])),
        softcap=draw(st.sampled_from([0.0, 5.0, 30.0])),
        alibi=draw(st.sampled_from([None, (h,), (b, h)])),
        mode=draw(st.sampled_from(["fa2", "tiling"])),
        impl=draw(st.sampled_from(["auto", "torch"])),
    )


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=variant_cases())
def test_variants_match_oracle(case, device):
    """out, LSE, dq, dk, dv of ``flash_attn_func`` with the variants, by flash-attn's rule."""
    c = case
    q, k, v = make_qkv(c["b"], c["sq"], c["sk"], c["h"], c["h_kv"], c["d"], c["dtype"], device, c["layout"])
    dout = torch.randn(c["b"], c["sq"], c["h"], c["d"], dtype=c["dtype"], device=device)
    alibi = None if c["alibi"] is None else torch.rand(c["alibi"], device=device)
    variants = dict(window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi)
    out, lse, _ = fm.flash_attn_func(q, k, v, causal=c["causal"], return_attn_probs=True, mode=c["mode"],
                                     impl=c["impl"], num_splits=2 if c["mode"] == "tiling" else 0, **variants)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference((out, lse, *grads), q, k, v, dout, c["causal"], True, c["dtype"], **variants)


@st.composite
def varlen_cases(draw):
    """Packed sequences with empty, one-token and ragged lengths (queries and keys apart or the
    same), GQA, causal, a window and softcap."""
    n = draw(st.integers(1, 4))
    length = st.one_of(st.just(0), st.just(1), st.integers(2, 50))
    lens_q = draw(st.lists(length, min_size=n, max_size=n))
    lens_k = lens_q if draw(st.booleans()) else draw(st.lists(length, min_size=n, max_size=n))
    h_kv = draw(st.sampled_from([1, 2]))
    return dict(
        lens_q=lens_q, lens_k=lens_k, h_kv=h_kv, h=h_kv * draw(st.sampled_from([1, 2])),
        d=draw(st.sampled_from([16, 40, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (0, 0), (3, -1), (20, 3)])),
        softcap=draw(st.sampled_from([0.0, 10.0])),
        impl=draw(st.sampled_from(["auto", "torch"])),
    )


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=varlen_cases())
def test_varlen_matches_oracle_per_sequence(case, device):
    """``flash_attn_varlen_func``: each sequence's out, LSE, dq, dk and dv against the oracle on
    that sequence alone, by flash-attn's rule; a sequence without keys gives out 0 and LSE -inf."""
    c = case
    cu_q, cu_k = _cu(c["lens_q"], device), _cu(c["lens_k"], device)
    tq, tk = sum(c["lens_q"]), sum(c["lens_k"])
    q = torch.randn(tq, c["h"], c["d"], dtype=c["dtype"], device=device, requires_grad=True)
    k = torch.randn(tk, c["h_kv"], c["d"], dtype=c["dtype"], device=device, requires_grad=True)
    v = torch.randn(tk, c["h_kv"], c["d"], dtype=c["dtype"], device=device, requires_grad=True)
    dout = torch.randn(tq, c["h"], c["d"], dtype=c["dtype"], device=device)
    variants = dict(window_size=c["window"], softcap=c["softcap"])
    out, lse, _ = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(c["lens_q"]), max(c["lens_k"]),
                                            causal=c["causal"], impl=c["impl"], return_attn_probs=True,
                                            **variants)
    if tq == 0:
        return
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for i, (n_q, n_k) in enumerate(zip(c["lens_q"], c["lens_k"])):
        a, e = int(cu_q[i]), int(cu_k[i])
        if n_q == 0:
            continue
        if n_k == 0:
            assert torch.all(out[a:a + n_q] == 0) and torch.all(torch.isneginf(lse[:, a:a + n_q]))
            continue
        seq_q, seq_k, seq_v = (t.detach()[s:s + m].unsqueeze(0) for t, s, m in ((q, a, n_q), (k, e, n_k),
                                                                                 (v, e, n_k)))
        ours = (out[a:a + n_q], lse[:, a:a + n_q], dq[a:a + n_q], dk[e:e + n_k], dv[e:e + n_k])
        assert_matches_reference(tuple(t.unsqueeze(0) for t in ours), seq_q, seq_k, seq_v,
                                 dout[a:a + n_q].unsqueeze(0), c["causal"], True, c["dtype"], **variants)


@st.composite
def kvcache_cases(draw):
    """A decoding step: a cache contiguous or in shuffled pages, per-sequence lengths from 0 to
    full, new keys appended or not, GQA, causal, a window, softcap, ALiBi and a split count."""
    h_kv = draw(st.sampled_from([1, 2]))
    paged = draw(st.booleans())
    page = draw(st.sampled_from([16, 32]))
    cache = page * draw(st.integers(1, 3)) if paged else draw(st.integers(8, 80))
    sq = draw(st.sampled_from([1, 2, 5]))
    new = draw(st.booleans()) and sq <= cache
    b = draw(st.integers(1, 3))
    return dict(
        b=b, h_kv=h_kv, h=h_kv * draw(st.sampled_from([1, 2, 4])), d=draw(st.sampled_from([16, 32, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), paged=paged, page=page, cache=cache,
        sq=sq, new=new,
        seqlens=draw(st.lists(st.integers(0, cache - (sq if new else 0)), min_size=b, max_size=b)),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (0, 0), (3, -1), (20, 3)])),
        softcap=draw(st.sampled_from([0.0, 10.0])),
        alibi=draw(st.booleans()),
        num_splits=draw(st.sampled_from([0, 1, 3])),
        impl=draw(st.sampled_from(["auto", "torch"])),
    )


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=kvcache_cases())
def test_kvcache_matches_oracle(case, device):
    """``flash_attn_with_kvcache``: the new keys land in the cache (in place, contiguous or paged)
    and each sequence's output is the oracle's over its cache, by flash-attn's rule."""
    c = case
    b, h, h_kv, d, dtype, sq = c["b"], c["h"], c["h_kv"], c["d"], c["dtype"], c["sq"]
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k_cache, v_cache = (torch.randn(b, c["cache"], h_kv, d, dtype=dtype, device=device) for _ in range(2))
    k_new = v_new = None
    if c["new"]:
        k_new, v_new = (torch.randn(b, sq, h_kv, d, dtype=dtype, device=device) for _ in range(2))
    seqlens = torch.tensor(c["seqlens"], dtype=torch.int32, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()  # the caches after the append
    if c["new"]:
        for i, s in enumerate(c["seqlens"]):
            want_k[i, s:s + sq], want_v[i, s:s + sq] = k_new[i], v_new[i]
    alibi = torch.rand(h, device=device) if c["alibi"] else None
    variants = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi)
    kw = dict(cache_seqlens=seqlens, num_splits=c["num_splits"], impl=c["impl"], **variants)
    if c["paged"]:
        per, page = c["cache"] // c["page"], c["page"]
        table = torch.randperm(b * per, device=device).to(torch.int32).view(b, per)
        pages = [torch.empty(b * per, page, h_kv, d, dtype=dtype, device=device) for _ in range(2)]
        for pages_x, x in zip(pages, (k_cache, v_cache)):
            pages_x[table.flatten().long()] = x.reshape(b * per, page, h_kv, d)
        out = fm.flash_attn_with_kvcache(q, *pages, k_new, v_new, block_table=table, **kw)
        for pages_x, want in zip(pages, (want_k, want_v)):
            assert torch.equal(pages_x[table.flatten().long()].reshape(want.shape), want)
    else:
        out = fm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    ref_vars = dict(softcap=c["softcap"], alibi_slopes=alibi, window_size=c["window"])
    for i, s in enumerate(c["seqlens"]):
        n = s + (sq if c["new"] else 0)
        if n == 0:
            assert torch.all(out[i] == 0)
            continue
        qi, ki, vi = q[i:i + 1], want_k[i:i + 1, :n], want_v[i:i + 1, :n]
        oracle = attention_ref(qi.double(), ki.double(), vi.double(), None, c["causal"], True, **ref_vars)[0]
        lowp = attention_ref(qi, ki, vi, None, c["causal"], True, **ref_vars)[0]
        assert_flash_rule(f"out {c}", out[i:i + 1], oracle, lowp, dtype)
