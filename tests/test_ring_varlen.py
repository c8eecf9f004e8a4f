"""Ring attention over packed documents (issue #16): ``ring_attention_varlen`` with gloo on CPU.

Every rank builds the same packed q, k, v of several documents (same seed), takes its shard with
``shard_documents`` (each document cut into pieces, the rank's pieces of all documents), runs
the ring forward + backward, and compares its rows of the output and of dq/dk/dv with
``flash_attn_varlen_func`` on the whole packed sequence in one process.  Under the test suite
each step runs the varlen Triton kernels through the interpreter.
"""

from __future__ import annotations

import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flash_module as fm
from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn
from flash_module.distributed import document_positions, ring_attention_varlen, shard_documents

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _packed_inputs(lengths, h, h_kv, d, dtype):
    gen = torch.Generator().manual_seed(11)
    total = sum(lengths)
    q = torch.randn(total, h, d, generator=gen, dtype=dtype)
    k = torch.randn(total, h_kv, d, generator=gen, dtype=dtype)
    v = torch.randn(total, h_kv, d, generator=gen, dtype=dtype)
    dout = torch.randn(total, h, d, generator=gen, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, dout, cu


def _worker(rank, world, port, case, errors, backend="gloo"):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        lengths, h, h_kv, d, causal, layout, dtype, variants = case
        softcap = variants.get("softcap", 0.0)
        sink = torch.linspace(-1.0, 1.0, h, device=device) if variants.get("sink") else None
        q, k, v, dout, cu = (t.to(device) for t in _packed_inputs(lengths, h, h_kv, d, dtype))
        shard = lambda t: shard_documents(t, cu, rank, world, layout)  # noqa: E731
        ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
        sl = sink.clone().requires_grad_() if sink is not None else None
        out = ring_attention_varlen(ql, kl, vl, cu, causal=causal, layout=layout, softcap=softcap,
                                    learnable_sink=sl, method=variants.get("method", "ring"))
        inputs = (ql, kl, vl, sl) if sink is not None else (ql, kl, vl)
        ours = [out, *torch.autograd.grad(out, inputs, shard(dout))]
        if sink is not None:  # each rank's dsink covers its rows: the group's sum is the full gradient
            dist.all_reduce(ours[-1])

        def single_process(ref_dtype):  # the whole packed sequence in one process, PyTorch path
            qf, kf, vf = (t.to(ref_dtype).requires_grad_() for t in (q, k, v))
            sf = sink.clone().requires_grad_() if sink is not None else None
            ref = fm.flash_attn_varlen_func(qf, kf, vf, cu, cu, causal=causal, impl="torch", softcap=softcap,
                                            learnable_sink=sf)
            inputs = (qf, kf, vf, sf) if sink is not None else (qf, kf, vf)
            return [ref, *torch.autograd.grad(ref, inputs, dout.to(ref_dtype))]

        def local(t):  # the sink's gradient is not sharded
            return t if t.dim() == 1 else shard(t)

        high = torch.float64 if dtype == torch.float32 else torch.float32
        oracle = [local(t) for t in single_process(high)]
        lowp = [local(t) for t in single_process(dtype)]
        errors[rank] = (max((a.double() - o.double()).abs().max().item() for a, o in zip(ours, oracle)),
                        max((a.double() - o.double()).abs().max().item() for a, o in zip(lowp, oracle)))
    finally:
        gc.collect()
        dist.destroy_process_group()


CASES = [  # (world, (document lengths, H, H_kv, D, causal, layout, dtype, variants))
    # Lengths are multiples of 2 x world (zigzag) or world (contiguous); one empty document.
    # All `slow` (each spawns processes: ~17 s); the default run keeps the dense ring's case.
    pytest.param(2, ([12, 0, 28, 4, 20], 4, 2, 16, True, "zigzag", torch.float32, {}),
                 id="w2-causal-zigzag-gqa", marks=pytest.mark.slow),
    pytest.param(2, ([6, 10, 2], 2, 2, 16, False, "contiguous", torch.float32, {}), id="w2-full-contig",
                 marks=pytest.mark.slow),
    pytest.param(4, ([24, 8, 0, 32], 4, 1, 16, True, "zigzag", torch.float32, dict(softcap=3.0, sink=True)),
                 id="w4-causal-zigzag-mqa-softcap-sink", marks=pytest.mark.slow),
    pytest.param(4, ([12, 4, 20], 2, 2, 16, True, "contiguous", torch.float32, {}), id="w4-causal-contig",
                 marks=pytest.mark.slow),
    pytest.param(2, ([16, 36, 8], 4, 2, 16, True, "zigzag", torch.bfloat16, {}), id="w2-causal-zigzag-bf16",
                 marks=pytest.mark.slow),
    # all-gather K/V (Llama 3 style): the same function
    pytest.param(2, ([12, 0, 28, 4, 20], 4, 1, 16, True, "zigzag", torch.float32, dict(method="allgather")),
                 id="w2-causal-zigzag-mqa-allgather", marks=pytest.mark.slow),
    pytest.param(4, ([24, 8, 0, 32], 4, 2, 16, True, "zigzag", torch.float32,
                     dict(method="allgather", softcap=3.0, sink=True)),
                 id="w4-causal-zigzag-allgather-softcap-sink", marks=pytest.mark.slow),
    pytest.param(2, ([6, 10, 2], 2, 2, 16, False, "contiguous", torch.float32, dict(method="allgather")),
                 id="w2-full-contig-allgather", marks=pytest.mark.slow),
    pytest.param(4, ([12, 4, 20], 4, 2, 16, True, "contiguous", torch.bfloat16, dict(method="allgather")),
                 id="w4-causal-contig-allgather-bf16", marks=pytest.mark.slow),
]


def _spawn_and_check(world, case, backend="gloo"):
    errors = mp.get_context("spawn").Manager().list([(float("nan"), float("nan"))] * world)
    spawn(_worker, world, world, free_port(), case, errors, backend)
    errors = list(errors)
    atol = 1e-5 if case[6] == torch.float32 else 1e-2
    # flash-attn's rule: the ring's error within 2x the one-process PyTorch path's own, plus atol
    assert all(e <= 2 * ref + atol for e, ref in errors), errors


@pytest.mark.parametrize("world, case", CASES)
def test_ring_attention_varlen_matches_single_process(world, case):
    _spawn_and_check(world, case)


NCCL_CASES = [
    pytest.param(2, ([1024, 256, 2048, 0, 768], 8, 2, 128, True, "zigzag", torch.bfloat16, {}),
                 id="w2-causal-zigzag-gqa-bf16"),
    pytest.param(4, ([4096, 1024, 3072], 8, 8, 64, True, "zigzag", torch.float16, dict(sink=True)),
                 id="w4-causal-zigzag-fp16-sink"),
    pytest.param(2, ([512, 1536], 4, 4, 64, False, "contiguous", torch.float32, {}),
                 id="w2-full-contig-fp32"),
    pytest.param(4, ([4096, 1024, 3072], 8, 2, 128, True, "zigzag", torch.bfloat16, dict(method="allgather")),
                 id="w4-causal-zigzag-gqa-bf16-allgather"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("world, case", NCCL_CASES)
def test_ring_attention_varlen_nccl(world, case, monkeypatch):
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} present")
    for name, value in SAFE_NCCL_ENV.items():
        monkeypatch.setenv(name, value)
    _spawn_and_check(world, case, "nccl")


def test_shard_documents_and_positions():
    cu = torch.tensor([0, 8, 8, 12], dtype=torch.int32)  # documents of 8, 0 and 4 tokens
    x = torch.arange(12)
    # zigzag, 2 ranks: 4 pieces per document; rank 0 holds pieces 0 and 3 of each document
    assert shard_documents(x, cu, 0, 2, "zigzag").tolist() == [0, 1, 8, 6, 7, 11]
    assert shard_documents(x, cu, 1, 2, "zigzag").tolist() == [2, 3, 9, 4, 5, 10]
    assert document_positions(cu, 0, 2, "zigzag").tolist() == [0, 1, 0, 6, 7, 3]
    assert shard_documents(x, cu, 1, 2, "contiguous").tolist() == [4, 5, 6, 7, 10, 11]
    assert document_positions(cu, 1, 2, "contiguous").tolist() == [4, 5, 6, 7, 2, 3]
    rows = torch.cat([shard_documents(x, cu, r, 2, "zigzag") for r in range(2)])
    assert sorted(rows.tolist()) == list(range(12))  # every token on exactly one rank


def test_shard_documents_bad_input():
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="document 0 has length 6, which does not split into 4 equal pieces"):
        shard_documents(torch.arange(12), cu, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="x has 10 tokens"):
        shard_documents(torch.arange(10), cu, 0, 2, "contiguous")
    with pytest.raises(ValueError, match="non-decreasing"):
        shard_documents(torch.arange(12), torch.tensor([0, 8, 6, 12], dtype=torch.int32), 0, 2, "contiguous")
    with pytest.raises(TypeError, match="int32"):
        shard_documents(torch.arange(12), cu.float(), 0, 2, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_documents(torch.arange(12), cu, 0, 2, "striped")


def test_ring_attention_varlen_bad_input():
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q must be 3-D \(local_tokens, nheads, headdim\)"):
        ring_attention_varlen(q[None], q[None], q[None], cu)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention_varlen(q, q, q, cu, layout="striped")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ring_attention_varlen(q, q, q, cu)
    with pytest.raises(ValueError, match="method must be one of"):
        ring_attention_varlen(q, q, q, cu, method="a2a")
    with pytest.raises(ValueError, match="cu_seqlens must be a tensor on q's device"):
        ring_attention_varlen(q, q, q, [0, 8])
