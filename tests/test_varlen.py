"""Packed variable-length sequences (issue #12): ``flash_attn_varlen_func`` and its packed
forms, the varlen ops, and the kernels themselves, forward and backward, against the float64
oracle sequence by sequence (flash-attn's 2x rule on the packed result), on both
implementations (the Triton kernels, interpreted on CPU, and the PyTorch path)."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm
from flash_module import ops
from flash_module.kernels.varlen import varlen_backward, varlen_forward, work_list
from flash_module.reference import attention_ref

from .helpers import assert_flash_rule

# (lengths_q, lengths_k, H, H_kv, D, seqused_k): zero and one-token sequences, odd lengths,
# Sq != Sk both ways, GQA, head dims that are not powers of two, keys cut short by seqused_k.
CASES = [
    pytest.param([17, 0, 1, 113, 50], [17, 0, 1, 113, 50], 2, 2, 40, None, id="self-0-1-17-113-d40"),
    pytest.param([5, 70, 1], [33, 20, 203], 4, 2, 64, None, id="cross-gqa2-d64"),
    pytest.param([64, 3], [64, 3], 4, 1, 72, None, id="mqa-d72"),
    pytest.param([0, 0], [3, 0], 2, 2, 16, None, id="all-empty-queries"),
    pytest.param([9, 30, 4], [40, 30, 11], 2, 1, 24, [17, 0, 11], id="seqused-k"),
]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _pack(lengths, h, d, dtype, device):
    return torch.randn(int(sum(lengths)), h, d, dtype=dtype, device=device), _cu(lengths, device)


def _oracle(q, k, v, dout, dlse, cu_q, cu_k, used, scale, causal, dtype):
    """Packed (out, lse (H, Tq), dq, dk, dv) from attention_ref on each sequence, in ``dtype``;
    the loss is sum(out * dout) + sum(lse * dlse) over rows that see a key."""
    out, dq, dk, dv = (torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (q, q, k, v))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        ke = ks + min(ke - ks, used[b]) if used is not None else ke
        if qe == qs:
            continue
        seq = [t[None].detach().to(dtype).requires_grad_() for t in (q[qs:qe], k[ks:ke], v[ks:ke])]
        o, s = attention_ref(*seq, scale, causal, True)
        seen = torch.isfinite(s)
        loss = (o * dout[qs:qe][None].to(dtype)).sum()
        loss = loss + (s.masked_fill(~seen, 0) * dlse[:, qs:qe][None]).sum()
        grads = torch.autograd.grad(loss, seq, allow_unused=True)
        out[qs:qe], lse[:, qs:qe] = o[0].detach(), s[0].detach().double()
        dq[qs:qe] = grads[0][0]
        if ke > ks:
            dk[ks:ke], dv[ks:ke] = grads[1][0], grads[2][0]
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# bf16 runs in the slow set (CI runs it; so does the GPU check): the default run keeps fp32.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("lens_q,lens_k,h,h_kv,d,used", CASES)
def test_varlen_matches_oracle(lens_q, lens_k, h, h_kv, d, used, dtype, causal, impl, device):
    """flash_attn_varlen_func's out, lse and the gradients of out and lse."""
    q, cu_q = _pack(lens_q, h, d, dtype, device)
    k, cu_k = _pack(lens_k, h_kv, d, dtype, device)
    v, dout = torch.randn_like(k), torch.randn_like(q)
    dlse = torch.randn(h, q.shape[0], device=device, dtype=torch.float64)
    seqused = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse, _ = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                            return_attn_probs=True, seqused_k=seqused, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, q.shape[0])
    assert lse.dtype == torch.float32
    seen = torch.isfinite(lse)
    loss = (out * dout).sum() + (lse.masked_fill(~seen, 0) * dlse.float()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    args = (q, k, v, dout, dlse, cu_q, cu_k, used, d**-0.5, causal)
    oracle, lowp = _oracle(*args, torch.float64), _oracle(*args, dtype)
    ours = (out, *grads)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], ours, oracle[:1] + oracle[2:], lowp[:1] + lowp[2:]):
        assert a.shape == o.shape and a.dtype == dtype, name
        assert_flash_rule(name, a, o, p, dtype)
    finite = torch.isfinite(oracle[1])
    assert torch.equal(seen, finite)  # -inf exactly where a row sees no key
    assert torch.allclose(lse.double()[finite], oracle[1][finite], atol=1e-3, rtol=0)


def test_work_list_skips_empty_sequences(device):
    cu = torch.tensor([0, 17, 17, 18, 131], dtype=torch.int32, device=device)
    assert work_list(cu, 16).tolist() == [0, 2, 2, 3, 11]


def test_varlen_forward_clamps_bad_offsets(device):
    """cu_seqlens past the tensors cannot be checked without a sync: the kernel clamps them and
    stays in bounds (a wrong answer is allowed, an out-of-bounds access is not)."""
    q = torch.randn(10, 2, 16, device=device)
    cu = torch.tensor([0, 6, 40], dtype=torch.int32, device=device)  # claims 40 tokens, has 10
    out, lse = varlen_forward(q, q, q, cu, cu, 0.25, True)
    assert torch.isfinite(out).all() and out.shape == q.shape


def test_varlen_strided_inputs_and_no_sequence(device):
    """Views with a non-contiguous head axis (slices of a packed QKV) give the same gradients as
    contiguous copies; cu_seqlens with no sequence (B = 0) launches nothing."""
    qkv = torch.randn(30, 3, 2, 16, device=device)
    q, k, v = qkv.unbind(1)  # (T, H, D) views, head stride 16, token stride 96
    cu = torch.tensor([0, 7, 30], dtype=torch.int32, device=device)
    dout = torch.randn(30, 2, 16, device=device)
    out, lse = varlen_forward(q, k, v, cu, cu, 0.25, True)
    grads = varlen_backward(dout, q, k, v, out, lse, cu, cu, 0.25, True)
    dense = [t.contiguous() for t in (q, k, v)]
    out_c, lse_c = varlen_forward(*dense, cu, cu, 0.25, True)
    grads_c = varlen_backward(dout, *dense, out_c, lse_c, cu, cu, 0.25, True)
    assert torch.equal(out, out_c)
    for g, gc in zip(grads, grads_c):
        assert g.is_contiguous() and torch.equal(g, gc)
    none = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = varlen_forward(q, k, v, none, none, 0.25, False)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# -- the public functions' other forms, modes and errors ----------------------------------------


def test_packed_forms_equal_the_unpacked_call(device):
    cu = _cu([7, 0, 12], device)
    qkv = torch.randn(19, 3, 4, 16, device=device)
    q, k, v = qkv.unbind(1)
    expected = fm.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)
    assert torch.equal(fm.flash_attn_varlen_qkvpacked_func(qkv, cu, 12, causal=True), expected)
    kv = qkv[:, 1:, :2]  # (T, 2, H_kv = 2, D): GQA
    expected = fm.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu, cu, None, None)
    assert torch.equal(fm.flash_attn_varlen_kvpacked_func(q, kv, cu, cu), expected)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_one_sequence_is_dense_attention(impl, device):
    """A single packed sequence gives what flash_attn_func gives on the same tokens."""
    q, k, v = (torch.randn(1, n, 2, 32, device=device) for n in (21, 50, 50))
    cu_q, cu_k = _cu([21], device), _cu([50], device)
    out = fm.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 21, 50, causal=True, impl=impl)
    torch.testing.assert_close(out, fm.flash_attn_func(q, k, v, causal=True, impl=impl)[0], atol=1e-5, rtol=0)


def _varlen_args(device, **over):
    q, cu = _pack([3, 5], 2, 16, torch.float32, device)
    args = dict(q=q, k=q, v=q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
    args.update(over)
    return args


BAD_INPUTS = [  # (overrides, error, words the message must contain)
    pytest.param(dict(q=torch.randn(1, 8, 2, 16)), ValueError, "q must be 3-D", id="4-d-q"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens_q must be int32",
                 id="int64-cu"),
    pytest.param(dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError,
                 "cu_seqlens_k must be 1-D", id="cu-k-other-batch"),
    pytest.param(dict(cu_seqlens_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be an int32 torch.Tensor",
                 id="list-cu"),
    pytest.param(dict(seqused_k=torch.tensor([3], dtype=torch.int32)), ValueError, "seqused_k must be 1-D",
                 id="seqused-shape"),
    pytest.param(dict(max_seqlen_q="5"), TypeError, "max_seqlen_q", id="str-max-seqlen"),
    pytest.param(dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0", id="negative-max-seqlen"),
    pytest.param(dict(q=torch.randn(8, 2, 0)), ValueError, "head dim must be >= 1", id="d0"),
    pytest.param(dict(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16)), ValueError,
                 "multiple of key/value heads", id="bad-gqa"),
    pytest.param(dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "k must be 4-D",
                 id="paged-needs-a-paged-cache"),
    pytest.param(dict(window_size=(4,)), TypeError, "window_size must be a pair", id="window-one"),
    pytest.param(dict(mode="fa1"), NotImplementedError, "mode='fa1' has no varlen", id="fa1"),
    pytest.param(dict(mode="tiling"), NotImplementedError, "mode='tiling' has no varlen", id="tiling"),
    pytest.param(dict(mode="fa3"), ValueError, "mode must be one of", id="unknown-mode"),
]


@pytest.mark.parametrize("over,error,words", BAD_INPUTS)
def test_bad_varlen_input_is_a_clear_error(over, error, words, device):
    over = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in over.items()}
    args = _varlen_args(device)
    if "q" in over:  # k and v follow a replaced q
        args.update(k=over["q"], v=over["q"])
    args.update(over)
    with pytest.raises(error, match=words):
        fm.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("page", [16, 64], ids=["page16", "page64"])  # < and >= the key block
def test_paged_kv_equals_contiguous(page, causal, impl, device):
    """block_table: each sequence's keys in shuffled pages give the contiguous result bit for
    bit (the same key blocks in the same order), pages smaller than a key block or not."""
    lens_q, lens_k = [3, 0, 20, 1], [40, 7, 20, 0]
    q, cu_q = _pack(lens_q, 4, 32, torch.float32, device)
    k, cu_k = _pack(lens_k, 2, 32, torch.float32, device)
    v = torch.randn_like(k)
    per_seq = _cdiv(48, page)  # pages per sequence: up to 48 keys
    order = torch.randperm(len(lens_k) * per_seq, device=device)
    table = order.view(len(lens_k), per_seq).to(torch.int32)
    k_pages, v_pages = (torch.randn(len(lens_k) * per_seq, page, 2, 32, device=device) for _ in range(2))
    _into_pages((k_pages, v_pages), (k, v), lens_k, cu_k, table)
    want, want_lse, want_p = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal, impl=impl,
                                                       return_attn_probs=True)
    got, got_lse, got_p = fm.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, causal=causal,
                                                    block_table=table, impl=impl, return_attn_probs=True)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse) and torch.equal(got_p, want_p)
    # With gradients (flash-attn's suite runs the paged forward on inputs that require grad):
    # the same output, dQ of the contiguous call, and dK/dV land in the pages that hold the keys.
    for t in (q, k, v, k_pages, v_pages):
        t.requires_grad_()
    do = torch.randn_like(want)
    want = fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal, impl=impl)
    dq, dk, dv = torch.autograd.grad(want, (q, k, v), do)
    got = fm.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, causal=causal, block_table=table,
                                    impl=impl)
    got_dq, got_dk, got_dv = torch.autograd.grad(got, (q, k_pages, v_pages), do)
    assert torch.equal(got, want) and torch.equal(got_dq, dq)
    want_dk, want_dv = torch.zeros_like(k_pages), torch.zeros_like(v_pages)
    _into_pages((want_dk, want_dv), (dk, dv), lens_k, cu_k, table)
    assert torch.equal(got_dk, want_dk) and torch.equal(got_dv, want_dv)


def _into_pages(pages, packed, lens, cu, table):
    """Copy each sequence's packed rows of each tensor in ``packed`` into its pages (in place)."""
    page = pages[0].shape[1]
    for b, n in enumerate(lens):
        start = int(cu[b])
        for j in range(_cdiv(n, page)):
            rows = slice(start + j * page, start + min(n, (j + 1) * page))
            for dst, src in zip(pages, packed):
                dst[table[b, j], :rows.stop - rows.start] = src[rows]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("cu_k,used", [
    pytest.param([0, 20, 27], [17, 30], id="seqused-past-its-length"),
    pytest.param([0, 40, 90], None, id="lengths-past-the-table"),
    pytest.param([0, 5, 3], None, id="decreasing-offsets"),
])
def test_paged_kv_with_grad_keeps_the_kernels_lengths(cu_k, used, impl, device):
    """With gradients the pages are gathered first (``api._unpage``); the key lengths it gives
    the contiguous kernels are those the paged kernels use, bad values included (clamped the
    same way), so the output does not depend on whether an input requires grad."""
    q, cu_q = _pack([2, 3], 2, 16, torch.float32, device)
    k_pages, v_pages = (torch.randn(4, 16, 1, 16, device=device) for _ in range(2))
    table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=device)
    cu_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
    used = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    args = (k_pages, v_pages, cu_q, cu_k)
    kw = dict(block_table=table, causal=True, seqused_k=used, impl=impl)
    want = fm.flash_attn_varlen_func(q, *args, **kw)
    got = fm.flash_attn_varlen_func(q.clone().requires_grad_(), *args, **kw)
    assert torch.equal(got, want)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- the op contract: opcheck, compile without recompiles, CUDA graphs --------------------------


@pytest.mark.parametrize("with_seqused", [pytest.param(False, id="all-keys", marks=pytest.mark.slow),
                                          pytest.param(True, id="seqused")])
def test_opcheck_varlen_ops(with_seqused, device):
    q, cu_q = _pack([5, 0, 9], 4, 16, torch.float32, device)
    k, cu_k = _pack([7, 3, 9], 2, 16, torch.float32, device)
    v = torch.randn_like(k)
    used = torch.tensor([4, 3, 9], dtype=torch.int32, device=device) if with_seqused else None
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops.varlen_fwd, (q, k, v, cu_q, cu_k, used, 0.25, True))
    pages = torch.tensor([[2, 0], [1, 1], [0, 2]], dtype=torch.int32, device=device)  # pages of 16 keys
    k_pages, v_pages = (torch.randn(3, 16, 2, 16, device=device) for _ in range(2))
    torch.library.opcheck(ops.varlen_fwd, (q.detach(), k_pages, v_pages, cu_q, cu_k, used, 0.25, True, "fa2",
                                           "auto", pages), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.varlen_fwd, (q.detach(), k.detach(), v.detach(), cu_q, cu_k, used, 0.25, True),
                          {"acc_out": True}, test_utils=("test_schema", "test_faketensor"))
    out, lse = ops.varlen_fwd(q, k, v, cu_q, cu_k, used, 0.25, True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    saved = (t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(ops.varlen_bwd, (dout, *saved, dlse, cu_q, cu_k, used, 0.25, True))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_varlen_acc_out_is_the_output_before_its_rounding(impl, device):
    """``acc_out=True`` (the packed-document ring's partials): O in fp32, which rounds to the
    plain call's bf16 O bit for bit; rows of no sequence stay 0."""
    q, cu_q = _pack([5, 0, 9], 4, 16, torch.bfloat16, device)
    k, cu_k = _pack([7, 3, 9], 2, 16, torch.bfloat16, device)
    v = torch.randn_like(k)
    out, lse = ops.varlen_fwd(q, k, v, cu_q, cu_k, None, 0.25, True, "fa2", impl)
    acc, acc_lse = ops.varlen_fwd(q, k, v, cu_q, cu_k, None, 0.25, True, "fa2", impl, acc_out=True)
    assert acc.dtype == torch.float32
    assert torch.equal(acc.to(torch.bfloat16), out) and torch.equal(acc_lse, lse)


def test_compile_does_not_recompile_when_lengths_change(device):
    """New lengths with the same totals, as tensors and as ints, reuse the first graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, cu, max_len):
        out = fm.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out.float().square().sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    q, k, v = (torch.randn(40, 2, 16, device=device, requires_grad=True) for _ in range(3))
    for lengths in ([10, 30, 0], [25, 0, 15], [0, 0, 40], [1, 1, 38]):
        cu = _cu(lengths, device)
        loss = compiled(q, k, v, cu, max(lengths))
        grads = torch.autograd.grad(loss, (q, k, v))
        eager = torch.autograd.grad(step(q, k, v, cu, max(lengths)), (q, k, v))
        for a, b in zip(grads, eager):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, counter.frame_count  # never one graph per lengths


@pytest.mark.gpu
def test_cuda_graph_replays_for_new_lengths():
    """Capture once; replay with other cu_seqlens of the same total and compare with eager."""
    device = "cuda"
    q, k, v = (torch.randn(300, 4, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = _cu([100, 150, 50], device)
    fm.flash_attn_varlen_func(q, k, v, cu, cu, causal=True)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.flash_attn_varlen_func(q, k, v, cu, cu, causal=True)
    for lengths in ([100, 150, 50], [1, 0, 299], [299, 1, 0]):
        cu.copy_(_cu(lengths, device))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fm.flash_attn_varlen_func(q, k, v, cu, cu, causal=True)), lengths


