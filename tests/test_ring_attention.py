"""Ring attention (context parallelism) over torch.distributed with gloo on CPU: 2 and 4 ranks.

Every rank builds the same full q, k, v (same seed), takes its shard, runs ring attention
forward + backward, and compares its rows of the output and of dq/dk/dv with single-process
attention on the full sequence.  Children inherit TRITON_INTERPRET, so under the test suite
each step runs the real Triton kernels through the interpreter.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flash_module as fm
from flash_module.distributed import ring_attention, shard_positions, shard_sequence

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_inputs(seq, h, h_kv, d, dtype):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, seq, h, d, generator=gen, dtype=dtype)
    k = torch.randn(2, seq, h_kv, d, generator=gen, dtype=dtype)
    v = torch.randn(2, seq, h_kv, d, generator=gen, dtype=dtype)
    dout = torch.randn(2, seq, h, d, generator=gen, dtype=dtype)
    return q, k, v, dout


def _worker(rank, world, port, case, errors):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        seq, h, h_kv, d, causal, layout, mode = case
        q, k, v, dout = _full_inputs(seq, h, h_kv, d, torch.float32)
        # Single-process reference on the full sequence.
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        ref = fm.flash_attn_func(qf, kf, vf, causal=causal, mode="reference")
        ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout)
        shard = lambda t: shard_sequence(t, rank, world, layout)  # noqa: E731
        ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(ql, kl, vl, causal=causal, layout=layout, mode=mode)
        grads = torch.autograd.grad(out, (ql, kl, vl), shard(dout))
        errs = [(out - shard(ref)).abs().max().item()]
        errs += [(g - shard(r)).abs().max().item() for g, r in zip(grads, ref_grads)]
        errors[rank] = max(errs)
    finally:
        gc.collect()  # free pending gloo work while the group is alive (see test_distributed)
        dist.destroy_process_group()


CASES = [
    pytest.param(2, (32, 4, 2, 16, False, "contiguous", "fa2"), id="w2-full-contig-gqa"),
    pytest.param(2, (32, 4, 4, 16, True, "contiguous", "fa2"), id="w2-causal-contig"),
    pytest.param(2, (32, 4, 1, 16, True, "zigzag", "fa2"), id="w2-causal-zigzag-mqa"),
    pytest.param(4, (64, 2, 2, 16, True, "zigzag", "fa2"), id="w4-causal-zigzag"),
    pytest.param(4, (32, 2, 1, 16, False, "contiguous", "tiling"), id="w4-full-contig-tiling"),
    pytest.param(2, (32, 2, 2, 16, True, "contiguous", "fa1"), id="w2-causal-fa1"),
]


@pytest.mark.parametrize("world, case", CASES)
def test_ring_attention_matches_single_process(world, case):
    errors = mp.get_context("spawn").Manager().list([float("nan")] * world)
    mp.spawn(_worker, args=(world, _free_port(), case, errors), nprocs=world, join=True)
    assert all(e < 1e-5 for e in errors), list(errors)


def test_shard_helpers():
    x = torch.arange(16)[None, :, None]
    assert shard_sequence(x, 1, 2, "contiguous").flatten().tolist() == list(range(8, 16))
    # zigzag with 2 ranks: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert shard_sequence(x, 0, 2, "zigzag").flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(8, 1, 2, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_ring_attention_bad_input():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="zigzag layout needs an even shard length"):
        ring_attention(q[:, :5], q[:, :5], q[:, :5], layout="zigzag")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ring_attention(q, q, q)


def _module_worker(rank, world, port, layout, errors):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(3)
        full = fm.MultiheadFlashAttention(32, 4, 2, causal=True, rotary=True)
        cp = fm.MultiheadFlashAttention(32, 4, 2, causal=True, rotary=True,
                                        context_parallel_group=dist.group.WORLD,
                                        context_parallel_layout=layout)
        cp.load_state_dict(full.state_dict())
        gen = torch.Generator().manual_seed(5)
        x, w = torch.randn(2, 16, 32, generator=gen), torch.randn(2, 16, 32, generator=gen)
        ref = full(x)
        (ref * w).sum().backward()
        out = cp(shard_sequence(x, rank, world, layout))
        (out * shard_sequence(w, rank, world, layout)).sum().backward()
        errs = [(out - shard_sequence(ref, rank, world, layout)).abs().max().item()]
        for p, pf in zip(cp.parameters(), full.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank holds its shard's share of the parameter gradient
            errs.append((g - pf.grad).abs().max().item())
        errors[rank] = max(errs)
    finally:
        gc.collect()  # free pending gloo work while the group is alive (see test_distributed)
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_module_context_parallel(layout):
    """MultiheadFlashAttention(context_parallel_group=...) with RoPE on global positions."""
    errors = mp.get_context("spawn").Manager().list([float("nan")] * 2)
    mp.spawn(_module_worker, args=(2, _free_port(), layout, errors), nprocs=2, join=True)
    assert all(e < 1e-4 for e in errors), list(errors)
