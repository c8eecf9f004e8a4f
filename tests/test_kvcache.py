"""KV-cache decoding (issue #12): ``flash_attn_with_kvcache`` and its ops, the in-place append
(``kvcache_append``: contiguous, ``cache_batch_idx``, paged) and the attention over the cache
(``kvcache_fwd``), on both implementations, against the float64 oracle batch by batch."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.reference import attention_ref

from .helpers import assert_flash_rule

IMPLS = ["triton", "torch"]


def _append_oracle(k_cache, k_new, seqlens, batch_idx=None, block_table=None):
    """The cache after the append, written position by position in Python."""
    out = k_cache.clone()
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if block_table is not None else k_cache.shape[1]
    for b in range(k_new.shape[0]):
        for i in range(k_new.shape[1]):
            p = int(seqlens[b]) + i
            if not 0 <= p < capacity:
                continue
            if block_table is not None:
                out[int(block_table[b, p // page]), p % page] = k_new[b, i]
            else:
                out[int(batch_idx[b]) if batch_idx is not None else b, p] = k_new[b, i]
    return out


APPEND_CASES = [  # (cache shape, B, S_new, seqlens, batch_idx, block_table)
    pytest.param((2, 30, 2, 40), 2, 5, [0, 27], None, None, id="contiguous-overflow"),
    pytest.param((4, 30, 2, 16), 2, 3, [7, 1], [3, 0], None, id="batch-idx"),
    pytest.param((6, 16, 2, 24), 2, 20, [14, -3], None, [[4, 1], [0, 5]], id="paged-16"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,b,s_new,seqlens,batch_idx,table", APPEND_CASES)
def test_append_writes_in_place(shape, b, s_new, seqlens, batch_idx, table, impl, device):
    k_cache, v_cache = (torch.randn(shape, device=device) for _ in range(2))
    k_new, v_new = (torch.randn(b, s_new, shape[2], shape[3], device=device) for _ in range(2))
    idx = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    seq, bidx, bt = idx(seqlens), idx(batch_idx), idx(table)
    want_k, want_v = (_append_oracle(c, n, seq, bidx, bt) for c, n in ((k_cache, k_new), (v_cache, v_new)))
    ops.kvcache_append(k_cache, v_cache, k_new, v_new, seq, bidx, bt, impl)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def _rotary_oracle(x, cos, sin, pos, interleaved):
    """Rotary embedding, one position at a time, in float64."""
    out = x.double().clone()
    half = cos.shape[1]
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            c, sn = cos[int(pos[b, s])].double(), sin[int(pos[b, s])].double()
            idx1 = torch.arange(0, 2 * half, 2) if interleaved else torch.arange(half)
            idx2 = idx1 + 1 if interleaved else idx1 + half
            x1, x2 = out[b, s, :, idx1].clone(), out[b, s, :, idx2].clone()
            out[b, s, :, idx1], out[b, s, :, idx2] = x1 * c - x2 * sn, x1 * sn + x2 * c
    return out.to(x.dtype)


# (B, Sq, S_new, H, H_kv, D, S_cache, seqlens): decode (Sq = 1), a few tokens (speculative
# decoding / chunked prefill), GQA, odd head dims, empty and full caches.
CASES = [
    pytest.param(3, 1, 1, 8, 2, 64, 40, [0, 17, 39], id="decode-gqa4-d64"),
    pytest.param(2, 5, 5, 4, 4, 40, 37, [9, 31], id="chunk-5-d40"),
    pytest.param(2, 3, 0, 2, 1, 72, 33, [33, 2], id="no-new-keys-mqa-d72"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# bf16 runs in the slow set (CI runs it; so does the GPU check): the default run keeps fp32.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("b,sq,s_new,h,h_kv,d,s_cache,seqlens", CASES)
def test_kvcache_matches_oracle(b, sq, s_new, h, h_kv, d, s_cache, seqlens, dtype, causal, impl, device):
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(b + 1, s_cache, h_kv, d, device=device, dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.randn(b, s_new, h_kv, d, device=device, dtype=dtype) for _ in range(2))
    seq = torch.tensor(seqlens, dtype=torch.int32, device=device)
    batch_idx = torch.arange(b, 0, -1, dtype=torch.int32, device=device)  # rows b..1 of the cache
    cache_before = k_cache.clone(), v_cache.clone()
    new = (k_new, v_new) if s_new else (None, None)
    out, lse = fm.flash_attn_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=seq,
                                          cache_batch_idx=batch_idx, causal=causal, return_softmax_lse=True,
                                          impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    want_k = _append_oracle(cache_before[0], k_new, seq, batch_idx)
    want_v = _append_oracle(cache_before[1], v_new, seq, batch_idx)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    for i in range(b):
        n, row = min(seqlens[i] + s_new, s_cache), int(batch_idx[i])
        keys = want_k[row:row + 1, :n], want_v[row:row + 1, :n]
        o64, l64 = attention_ref(q[i:i + 1].double(), *(t.double() for t in keys), d**-0.5, causal, True)
        o_lp, _ = attention_ref(q[i:i + 1], *keys, d**-0.5, causal, True)
        assert_flash_rule(f"out[{i}]", out[i:i + 1], o64, o_lp, dtype)
        finite = torch.isfinite(l64[0])
        assert torch.equal(torch.isfinite(lse[i]), finite)
        assert torch.allclose(lse[i].double()[finite], l64[0][finite], atol=1e-3, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("page", [16, 64], ids=["page16", "page64"])  # < and >= the key block
def test_rotary_and_paged_cache(page, interleaved, causal, impl, device):
    """Rotary on q and the new k (flash-attn's positions), into a paged cache whose result equals
    the contiguous cache's bit for bit."""
    b, sq, h, h_kv, d = 2, 3, 4, 2, 32
    q = torch.randn(b, sq, h, d, device=device)
    k_new, v_new = (torch.randn(b, sq, h_kv, d, device=device) for _ in range(2))
    seq = torch.tensor([5, page + 4], dtype=torch.int32, device=device)
    cos, sin = torch.randn(2 * page, 12, device=device), torch.randn(2 * page, 12, device=device)
    contiguous = [torch.randn(b, 2 * page, h_kv, d, device=device) for _ in range(2)]
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32, device=device)
    paged = [torch.empty(4, page, h_kv, d, device=device) for _ in range(2)]
    for c, p in zip(contiguous, paged):  # the same contents, paged
        for i in range(b):
            for j in range(2):
                p[table[i, j]] = c[i, j * page:(j + 1) * page]
    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seq, causal=causal,
                  rotary_interleaved=interleaved, impl=impl)
    out = fm.flash_attn_with_kvcache(q, *contiguous, k_new, v_new, **kwargs)
    out_paged = fm.flash_attn_with_kvcache(q, *paged, k_new, v_new, block_table=table, **kwargs)
    assert torch.equal(out, out_paged)
    # The rotated new keys are in the cache at their positions.
    new_pos = seq.long()[:, None] + torch.arange(sq, device=device)
    q_pos = seq.long()[:, None] + torch.arange(sq, device=device) * int(causal)
    k_rot = _rotary_oracle(k_new, cos, sin, new_pos, interleaved)
    for i in range(b):
        got = contiguous[0][i, int(seq[i]):int(seq[i]) + sq]
        torch.testing.assert_close(got, k_rot[i], atol=1e-5, rtol=1e-5)
    q_rot = _rotary_oracle(q, cos, sin, q_pos, interleaved)
    want = fm.flash_attn_with_kvcache(q_rot, *contiguous, cache_seqlens=seq + sq, causal=causal, impl=impl)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_cache_seqlens_forms(device):
    """An int, a tensor and None (the whole cache) give the same answer as the equivalent tensor."""
    q = torch.randn(2, 1, 2, 16, device=device)
    kc, vc = (torch.randn(2, 12, 2, 16, device=device) for _ in range(2))
    full = torch.full((2,), 12, dtype=torch.int32, device=device)
    seven = torch.full((2,), 7, dtype=torch.int32, device=device)
    assert torch.equal(fm.flash_attn_with_kvcache(q, kc, vc),
                       fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full))
    assert torch.equal(fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7),
                       fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seven))


# (seqlens, leftpad, S_new): padding before each sequence, incl. none, all of it, and past it.
LEFTPAD_CASES = [
    pytest.param([20, 9, 0], [3, 0, 0], 2, id="append-2"),
    pytest.param([17, 30, 8], [16, 29, 11], 0, id="one-key-none-and-past"),
    pytest.param([25, 5, 12], [7, 5, 1], 1, id="decode"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens,leftpad,s_new", LEFTPAD_CASES)
def test_kvcache_leftpad_matches_oracle(seqlens, leftpad, s_new, causal, impl, device):
    """cache_leftpad as flash-attn defines it: batch b attends to cache positions
    [leftpad[b], seqlens[b] + S_new), the causal mask aligned to that stretch's end; the new keys
    are still written at seqlens[b] + i."""
    b, sq, h, h_kv, d, s_cache = 3, 2, 4, 2, 24, 40
    q = torch.randn(b, sq, h, d, device=device)
    k_cache, v_cache = (torch.randn(b, s_cache, h_kv, d, device=device) for _ in range(2))
    k_new, v_new = (torch.randn(b, s_new, h_kv, d, device=device) for _ in range(2))
    seq, pad = (torch.tensor(x, dtype=torch.int32, device=device) for x in (seqlens, leftpad))
    want_k = _append_oracle(k_cache, k_new, seq)
    want_v = _append_oracle(v_cache, v_new, seq)
    new = (k_new, v_new) if s_new else (None, None)
    out, lse = fm.flash_attn_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=seq, cache_leftpad=pad,
                                          causal=causal, return_softmax_lse=True, impl=impl)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    for i in range(b):
        end = min(seqlens[i] + s_new, s_cache)
        start = min(leftpad[i], end)
        if start == end:  # no key: zeros and -inf, as for an empty cache
            assert torch.equal(out[i], torch.zeros_like(out[i])) and torch.isneginf(lse[i]).all()
            continue
        keys = want_k[i:i + 1, start:end].double(), want_v[i:i + 1, start:end].double()
        o64, l64 = attention_ref(q[i:i + 1].double(), *keys, d**-0.5, causal, True)
        o_lp, _ = attention_ref(q[i:i + 1], *(t.float() for t in keys), d**-0.5, causal, True)
        assert_flash_rule(f"out[{i}]", out[i:i + 1], o64, o_lp, torch.float32)
        finite = torch.isfinite(l64[0])
        assert torch.equal(torch.isfinite(lse[i]), finite)
        assert torch.allclose(lse[i].double()[finite], l64[0][finite], atol=1e-4, rtol=0)


def test_kvcache_leftpad_zero_is_no_padding_and_paged_is_refused(device):
    q = torch.randn(2, 1, 4, 16, device=device)
    kc, vc = (torch.randn(2, 32, 2, 16, device=device) for _ in range(2))
    lens = torch.tensor([9, 30], dtype=torch.int32, device=device)
    zero = torch.zeros(2, dtype=torch.int32, device=device)
    plain = fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
    assert torch.equal(plain, fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=zero,
                                                         causal=True))
    table = torch.tensor([[0], [1]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cache_leftpad cannot be used with block_table"):
        fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=zero, block_table=table)


def _kv_args(device, **over):
    q = torch.randn(2, 1, 4, 16, device=device)
    kc, vc = (torch.randn(2, 32, 2, 16, device=device) for _ in range(2))
    lengths = torch.tensor([3, 5], dtype=torch.int32, device=device)
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lengths)
    args.update({n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in over.items()})
    return args


KV_BAD = [
    pytest.param(dict(q=torch.randn(2, 1, 4, 16, requires_grad=True)), ValueError, "inference only",
                 id="grad"),
    pytest.param(dict(k=torch.randn(2, 1, 2, 16)), ValueError, "k and v must be given together", id="k-no-v"),
    pytest.param(dict(k=torch.randn(2, 1, 3, 16), v=torch.randn(2, 1, 3, 16)), ValueError,
                 "seqlen_new, nheads_k", id="new-heads"),
    pytest.param(dict(cache_seqlens=torch.tensor([3, 5])), TypeError, "cache_seqlens must be int32",
                 id="int64-lens"),
    pytest.param(dict(cache_seqlens="3"), TypeError, "cache_seqlens must be an int", id="str-lens"),
    pytest.param(dict(block_table=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "power of two >= 16",
                 id="page-24"),
    pytest.param(dict(rotary_cos=torch.randn(8, 4), rotary_sin=torch.randn(8, 4)), ValueError, "pass k and v",
                 id="rotary-without-k"),
    pytest.param(dict(cache_leftpad=torch.zeros(2)), TypeError, "cache_leftpad must be int32",
                 id="leftpad-fp32"),
    pytest.param(dict(cache_leftpad=torch.zeros(3, dtype=torch.int32)), ValueError,
                 "cache_leftpad must be 1-D", id="leftpad-size"),
    pytest.param(dict(window_size=(-2, 0)), ValueError, "window_size entries must be >= -1", id="window-neg"),
    pytest.param(dict(v_cache=torch.randn(2, 31, 2, 16)), ValueError, "same sequence length",
                 id="cache-shapes"),
]


@pytest.mark.parametrize("over,error,words", KV_BAD)
def test_bad_kvcache_input_is_a_clear_error(over, error, words, device):
    args = _kv_args(device, **over)
    if "block_table" in over:  # a paged cache with pages of 24 rows
        kc, vc = (torch.randn(4, 24, 2, 16, device=device) for _ in range(2))
        args.update(k_cache=kc, v_cache=vc)
    with pytest.raises(error, match=words):
        fm.flash_attn_with_kvcache(**args)


def test_opcheck_kvcache_ops(device):
    q = torch.randn(2, 3, 4, 16, device=device)
    kc, vc = (torch.randn(3, 20, 2, 16, device=device) for _ in range(2))
    kn, vn = (torch.randn(2, 3, 2, 16, device=device) for _ in range(2))
    seq = torch.tensor([4, 15], dtype=torch.int32, device=device)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(ops.kvcache_append, (kc, vc, kn, vn, seq, idx, None))
    torch.library.opcheck(ops.kvcache_fwd, (q, kc, vc, seq, idx, None, 0.25, True))
    pad = torch.tensor([1, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(ops.kvcache_fwd, (q, kc, vc, seq, idx, None, 0.25, True, 0, "auto", pad))
    table = torch.tensor([[1, 0], [2, 2]], dtype=torch.int32, device=device)  # pages of 20 rows
    torch.library.opcheck(ops.kvcache_append, (kc, vc, kn, vn, seq, None, table))
    torch.library.opcheck(ops.kvcache_fwd, (q, kc, vc, seq, None, table, 0.25, False, 2))
    # new_tokens: the lengths count the keys just appended, added in the kernel
    for impl in ("auto", "torch"):
        args = (q, kc, vc, seq, idx, None, 0.25, True, 0, impl, None, 0.0, None, -1, -1, None)
        torch.library.opcheck(ops.kvcache_fwd, args + (3,))
        for got, want in zip(ops.kvcache_fwd(*args, 3), ops.kvcache_fwd(*args[:3], seq + 3, *args[4:])):
            assert torch.equal(got, want)


def test_compiled_decode_step_does_not_recompile(device):
    """Append + attend under torch.compile(fullgraph=True), for growing cache lengths: one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, k_cache, v_cache, seqlens):
        return fm.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    caches = [torch.randn(2, 24, 2, 16, device=device) for _ in range(2)]
    eager_caches = [c.clone() for c in caches]
    for n in range(3):
        q = torch.randn(2, 1, 4, 16, device=device)
        k, v = (torch.randn(2, 1, 2, 16, device=device) for _ in range(2))
        seqlens = torch.tensor([5 + n, 11 + 2 * n], dtype=torch.int32, device=device)
        got = compiled(q, k, v, *caches, seqlens)
        want = step(q, k, v, *eager_caches, seqlens)
        torch.testing.assert_close(got, want)
        assert all(torch.equal(a, b) for a, b in zip(caches, eager_caches))  # the append happened in place
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.gpu
def test_cuda_graph_decode_replays_for_new_lengths():
    """One captured decode step (append + attend) replays for other cache lengths."""
    device, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(4, 1, h, 64, device=device, dtype=dt) for h in (8, 2, 2))
    k_cache, v_cache = (torch.randn(4, 256, 2, 64, device=device, dtype=dt) for _ in range(2))
    seqlens = torch.tensor([0, 10, 100, 255], dtype=torch.int32, device=device)
    fm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=seqlens)  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens)
    for lengths in ([3, 4, 5, 6], [200, 0, 17, 250]):
        before = k_cache.clone(), v_cache.clone()
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        want = fm.flash_attn_with_kvcache(q, *before, k, v, cache_seqlens=seqlens)
        assert torch.equal(out, want), lengths


MERGE_CASES = [  # (B, Sq, H, H_kv, D, cache length, num_splits, sink): many chunks merged, at real sizes
    pytest.param(1, 1, 32, 8, 128, 65536, 0, False, id="b1-64k-auto"),
    pytest.param(4, 1, 32, 8, 128, 16384, 256, False, id="b4-16k-256splits"),
    pytest.param(3, 5, 16, 16, 96, 7000, 7, True, id="b3-sq5-7splits-sink"),
    pytest.param(2, 40, 8, 2, 64, 5000, 64, False, id="b2-sq40-64splits"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,sq,h,h_kv,d,n,num_splits,sink", MERGE_CASES)
def test_split_merge_is_exact_and_deterministic(b, sq, h, h_kv, d, n, num_splits, sink):
    """Split-KV at real sizes with up to 256 chunks: the output is within the 2x rule of the
    oracle, its LSE matches the one-chunk kernel's, and repeated runs are bitwise equal (the
    merge reads every chunk's partial in a fixed order)."""
    dt = torch.bfloat16
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dt)
    kc, vc = (torch.randn(b, n, h_kv, d, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.randint(n // 2, n + 1, (b,), device="cuda", dtype=torch.int32)
    s = torch.randn(h, device="cuda") if sink else None
    run = (lambda k: fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, num_splits=k,
                                                learnable_sink=s, return_softmax_lse=True))
    out, lse = run(num_splits)
    one, one_lse = run(1)
    for _ in range(20):
        again, again_lse = run(num_splits)
        assert torch.equal(again, out) and torch.equal(again_lse, lse)
    for i in range(b):
        m = int(lens[i])
        args = (q[i:i + 1], kc[i:i + 1, :m], vc[i:i + 1, :m])
        ref, _ = attention_ref(*(t.double() for t in args), d ** -0.5, True, True, sink=s)
        lowp, _ = attention_ref(*args, d ** -0.5, True, True, sink=s)
        assert_flash_rule("out", out[i:i + 1], ref, lowp, dt)
    torch.testing.assert_close(lse, one_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_split_counts_and_bad_indices(num_splits, device):
    """Any split count gives the oracle's answer (chunks past a sequence's length do no work);
    out-of-range lengths, batch rows and pages are clamped, never read out of bounds."""
    q = torch.randn(3, 2, 4, 16, device=device)
    kc, vc = (torch.randn(2, 48, 2, 16, device=device) for _ in range(2))
    seq = torch.tensor([5, 48, 70], dtype=torch.int32, device=device)  # 70 > capacity: clamped to 48
    idx = torch.tensor([1, 0, 9], dtype=torch.int32, device=device)  # 9: clamped to row 1
    out = fm.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seq, cache_batch_idx=idx, causal=True,
                                     num_splits=num_splits)
    for i, (n, row) in enumerate([(5, 1), (48, 0), (48, 1)]):
        want, _ = attention_ref(q[i:i + 1], kc[row:row + 1, :n], vc[row:row + 1, :n], 0.25, True, True)
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=1e-5)
    pages = torch.tensor([[0, 7, 2], [-1, 1, 3], [1, 0, 5]], dtype=torch.int32, device=device)  # 7, -1: bad
    paged = fm.flash_attn_with_kvcache(q, kc.view(6, 16, 2, 16), vc.view(6, 16, 2, 16), cache_seqlens=seq,
                                       block_table=pages, num_splits=num_splits)
    assert torch.isfinite(paged).all()


EMPTY = [  # (q shape, cache shape, new tokens): nothing to compute somewhere
    pytest.param((0, 1, 4, 16), (2, 32, 2, 16), 0, id="no-batch"),
    pytest.param((2, 0, 4, 16), (2, 32, 2, 16), 0, id="no-query"),
    pytest.param((2, 1, 4, 16), (2, 0, 2, 16), 1, id="no-cache"),
    pytest.param((2, 40, 4, 16), (2, 32, 2, 16), 0, id="more-queries-than-cache"),
    pytest.param((2, 1, 4, 16), (2, 32, 2, 16), 0, id="no-new-keys"),
]


@pytest.mark.parametrize("q_shape,cache_shape,s_new", EMPTY)
def test_empty_shapes_match_the_pytorch_path(q_shape, cache_shape, s_new, device):
    q = torch.randn(q_shape, device=device)
    caches = [torch.randn(cache_shape, device=device) for _ in range(2)]
    shape_new = (q_shape[0], s_new, *cache_shape[2:])
    new = [torch.randn(shape_new, device=device) if s_new else None for _ in range(2)]
    lens = torch.full((q_shape[0],), 3, dtype=torch.int32, device=device)
    outs = []
    for impl in IMPLS:
        c = [t.clone() for t in caches]
        outs.append(fm.flash_attn_with_kvcache(q, *c, *new, cache_seqlens=lens, causal=True, impl=impl,
                                               return_softmax_lse=True))
    for a, b in zip(*outs):
        assert a.shape == b.shape and torch.isfinite(a).eq(torch.isfinite(b)).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
