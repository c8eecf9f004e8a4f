"""Ring attention (context parallelism) over torch.distributed with gloo on CPU: 2 and 4 ranks.

Every rank builds the same full q, k, v (same seed), takes its shard, runs ring attention
forward + backward, and compares its rows of the output and of dq/dk/dv with single-process
attention on the full sequence.  Children inherit TRITON_INTERPRET, so under the test suite
each step runs the real Triton kernels through the interpreter.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flash_module as fm
from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn
from flash_module.distributed import ring_attention, shard_positions, shard_sequence

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _full_inputs(seq, h, h_kv, d, dtype):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, seq, h, d, generator=gen, dtype=dtype)
    k = torch.randn(2, seq, h_kv, d, generator=gen, dtype=dtype)
    v = torch.randn(2, seq, h_kv, d, generator=gen, dtype=dtype)
    dout = torch.randn(2, seq, h, d, generator=gen, dtype=dtype)
    return q, k, v, dout


def _worker(rank, world, port, case, errors, backend="gloo"):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        seq, h, h_kv, d, causal, layout, mode, *rest = case
        dtype = rest[0] if rest else torch.float32
        storage = rest[1] if len(rest) > 1 else "bshd"  # "bhsd": non-contiguous (B, S, H, D) views
        variants = rest[2] if len(rest) > 2 else {}  # softcap / sinks / window / ALiBi
        softcap = variants.get("softcap", 0.0)
        sink = torch.linspace(-1.0, 1.0, h, device=device) if variants.get("sink") else None
        window = variants.get("window", (-1, -1))
        dropout_p = variants.get("dropout", 0.0)  # same seed on every rank and in the reference
        slopes = (torch.tensor([2.0 ** (-(i + 1)) for i in range(h)], device=device) if variants.get("alibi")
                  else None)
        q, k, v, dout = (t.to(device) for t in _full_inputs(seq, h, h_kv, d, dtype))
        shard = lambda t: shard_sequence(t, rank, world, layout)  # noqa: E731
        if storage == "bhsd":
            ql, kl, vl = (shard(t).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                          for t in (q, k, v))
        else:
            ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
        sl = sink.clone().requires_grad_() if sink is not None else None
        torch.manual_seed(1234)
        out = ring_attention(ql, kl, vl, causal=causal, layout=layout, mode=mode, softcap=softcap,
                             learnable_sink=sl, window_size=window, alibi_slopes=slopes, dropout_p=dropout_p)
        inputs = (ql, kl, vl, sl) if sink is not None else (ql, kl, vl)
        ours = [out, *torch.autograd.grad(out, inputs, shard(dout))]
        if sink is not None:  # each rank's dsink covers its rows: the group's sum is the full gradient
            dist.all_reduce(ours[-1])
        if os.environ.get("FLASH_MODULE_RING_TRANSPORT") == "copy" and world > 1:
            from flash_module import distributed as fmd

            assert fmd._WORKSPACES, "the copy transport fell back to p2p"

        def single_process(ref_dtype):  # the full sequence on one device, PyTorch path
            qf, kf, vf = (t.to(ref_dtype).requires_grad_() for t in (q, k, v))
            sf = sink.clone().requires_grad_() if sink is not None else None
            torch.manual_seed(1234)  # the ring's dropout seed: the same mask over the whole sequence
            ref = fm.flash_attn_func(qf, kf, vf, dropout_p, causal=causal, impl="torch", softcap=softcap,
                                     learnable_sink=sf, window_size=window, alibi_slopes=slopes)
            inputs = (qf, kf, vf, sf) if sink is not None else (qf, kf, vf)
            return [ref, *torch.autograd.grad(ref, inputs, dout.to(ref_dtype))]

        def shard(t, full=shard):  # the sink's gradient is not sharded
            return t if t.dim() == 1 else full(t)

        def err(a, b):
            return max((x.double() - shard(y).double()).abs().max().item() for x, y in zip(a, b))

        if dtype == torch.float32:  # exact enough to compare directly
            errors[rank] = (err(ours, single_process(torch.float32)), 0.0)
        else:  # flash-attn's rule: ring error vs the PyTorch path's own error in this dtype
            oracle = [shard(t) for t in single_process(torch.float32)]
            lowp = [shard(t) for t in single_process(dtype)]
            # per tensor (out, dq, dk, dv[, dsink]): each within 2x the PyTorch path's error
            def gap(a, o):
                return (a.double() - o.double()).abs().max().item()

            errors[rank] = [(gap(a, o), gap(b, o)) for a, b, o in zip(ours, lowp, oracle)]
    finally:
        gc.collect()  # free pending gloo work while the group is alive (see test_ddp)
        dist.destroy_process_group()


CASES = [
    # The default run keeps one case (it spawns processes: ~7-25 s), the softcap-sink one below;
    # the rest are `slow` (the shift the window / ALiBi cases need: test_window.py, by default).
    pytest.param(1, (16, 2, 2, 16, True, "contiguous", "fa2"), id="w1-causal", marks=pytest.mark.slow),
    pytest.param(2, (32, 4, 2, 16, False, "contiguous", "fa2"), id="w2-full-contig-gqa",
                 marks=pytest.mark.slow),
    pytest.param(2, (32, 4, 4, 16, True, "contiguous", "fa2"), id="w2-causal-contig", marks=pytest.mark.slow),
    pytest.param(2, (32, 4, 1, 16, True, "zigzag", "fa2"), id="w2-causal-zigzag-mqa", marks=pytest.mark.slow),
    pytest.param(4, (64, 2, 2, 16, True, "zigzag", "fa2"), id="w4-causal-zigzag", marks=pytest.mark.slow),
    pytest.param(4, (32, 2, 1, 16, False, "contiguous", "tiling"), id="w4-full-contig-tiling",
                 marks=pytest.mark.slow),
    pytest.param(2, (32, 2, 2, 16, True, "contiguous", "fa1"), id="w2-causal-fa1", marks=pytest.mark.slow),
    pytest.param(2, (32, 4, 2, 16, True, "zigzag", "fa2", torch.bfloat16), id="w2-causal-zigzag-bf16",
                 marks=pytest.mark.slow),
    # (B, H, S, D) storage, i.e. non-contiguous K/V with H_kv > 1 (FlashAttention(layout="bhsd")).
    pytest.param(2, (16, 2, 2, 16, True, "contiguous", "fa2", torch.float32, "bhsd"), id="w2-causal-bhsd",
                 marks=pytest.mark.slow),
    # softcap in every step, the sink once after all chunks (its gradient summed over the ranks)
    pytest.param(2, (32, 4, 2, 16, True, "zigzag", "fa2", torch.float32, "bshd",
                     dict(softcap=3.0, sink=True)), id="w2-causal-zigzag-softcap-sink"),
    pytest.param(4, (32, 2, 2, 16, False, "contiguous", "tiling", torch.float32, "bshd", dict(sink=True)),
                 id="w4-full-tiling-sink", marks=pytest.mark.slow),
    # a window narrower than a chunk (zigzag: 4 chunks of 8 per rank pair): whole key chunks
    # skipped, rows of a step with no visible key; ALiBi over global distances
    pytest.param(2, (32, 4, 2, 16, True, "zigzag", "fa2", torch.float32, "bshd",
                     dict(window=(5, 0), alibi=True)), id="w2-causal-zigzag-window-alibi",
                 marks=pytest.mark.slow),
    pytest.param(4, (32, 2, 1, 16, False, "contiguous", "fa2", torch.float32, "bshd",
                     dict(window=(3, 9))), id="w4-full-window", marks=pytest.mark.slow),
    pytest.param(2, (32, 2, 2, 16, False, "zigzag", "tiling", torch.float32, "bshd",
                     dict(window=(20, -1), alibi=True, sink=True)),
                 id="w2-full-zigzag-tiling-window-alibi-sink", marks=pytest.mark.slow),
    # dropout over the global sequence: each step's mask is the one-device mask's block
    # (chunks of 16: the mask's tiles), in the forward and both backward passes
    pytest.param(2, (64, 4, 2, 16, True, "zigzag", "fa2", torch.float32, "bshd", dict(dropout=0.25)),
                 id="w2-causal-zigzag-dropout", marks=pytest.mark.slow),
    pytest.param(4, (64, 2, 1, 16, False, "contiguous", "fa2", torch.float32, "bshd",
                     dict(dropout=0.3, window=(20, 9), softcap=4.0)),
                 id="w4-full-dropout-window-softcap", marks=pytest.mark.slow),
]


def _spawn_and_check(world, case, backend="gloo", fp32_tol=1e-5):
    """Run ``case`` on ``world`` ranks; every rank's rows must match the single-process result."""
    errors = mp.get_context("spawn").Manager().list([(float("nan"), float("nan"))] * world)
    spawn(_worker, world, world, free_port(), case, errors, backend)
    errors = list(errors)
    if len(case) < 8 or case[7] == torch.float32:
        assert all(e < fp32_tol for e, _ in errors), errors
    else:  # 2x the PyTorch path's own error in this dtype, plus a small atol, for every tensor
        assert all(e <= 2 * ref + 1e-2 for per_rank in errors for e, ref in per_rank), errors


@pytest.mark.parametrize("world, case", CASES)
def test_ring_attention_matches_single_process(world, case):
    _spawn_and_check(world, case)


# On GPUs: one process per GPU, NCCL.  Sizes where every step runs full and masked tiles.
NCCL_CASES = [
    pytest.param(2, (2048, 8, 2, 128, True, "zigzag", "fa2", torch.bfloat16), id="w2-causal-zigzag-gqa-bf16"),
    pytest.param(2, (1024, 4, 4, 64, False, "contiguous", "fa2", torch.float32), id="w2-full-contig-fp32"),
    pytest.param(4, (4096, 8, 8, 128, True, "contiguous", "fa2", torch.float16), id="w4-causal-contig-fp16"),
    pytest.param(8, (8192, 8, 2, 128, True, "zigzag", "fa2", torch.bfloat16), id="w8-causal-zigzag-gqa-bf16"),
    pytest.param(2, (2000, 4, 1, 96, False, "contiguous", "tiling", torch.bfloat16),
                 id="w2-full-tiling-d96-bf16"),
    # the variants at real sizes: a window narrower than a chunk (whole steps skipped), ALiBi over
    # global distances, softcap in every step, the sink once.  With bf16 partial outputs per
    # step this failed on two H200s (dsink, a sum over 8192 rows of dO.O, at 2.25x torch's
    # error); the steps now return fp32 partials (acc_out) and round once after the merges.
    pytest.param(2, (4096, 8, 2, 128, True, "zigzag", "fa2", torch.bfloat16, "bshd",
                     dict(window=(700, 0), alibi=True, softcap=30.0, sink=True)),
                 id="w2-causal-zigzag-window-alibi-softcap-sink-bf16"),
    pytest.param(2, (4096, 8, 2, 128, True, "zigzag", "fa2", torch.bfloat16, "bshd",
                     dict(window=(700, 0), alibi=True, softcap=30.0)),
                 id="w2-causal-zigzag-window-alibi-softcap-bf16"),
    pytest.param(4, (4096, 4, 4, 64, False, "contiguous", "fa2", torch.float16, "bshd",
                     dict(window=(300, 1500))), id="w4-full-window-fp16"),
    pytest.param(2, (4096, 8, 2, 128, True, "zigzag", "fa2", torch.bfloat16, "bshd", dict(dropout=0.1)),
                 id="w2-causal-zigzag-dropout-bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("world, case", NCCL_CASES)
def test_ring_attention_nccl(world, case, monkeypatch):
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} present")
    for name, value in SAFE_NCCL_ENV.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned ranks
    _spawn_and_check(world, case, "nccl", fp32_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("world, case", [p for p in NCCL_CASES if p.id in ("w2-causal-zigzag-gqa-bf16",
                                                                           "w4-causal-contig-fp16")])
def test_ring_attention_nccl_copy_transport(world, case, monkeypatch):
    """The same comparison with the hops pulled through symmetric memory by the copy engines
    (``FLASH_MODULE_RING_TRANSPORT=copy``, read by the spawned ranks at import)."""
    monkeypatch.setenv("FLASH_MODULE_RING_TRANSPORT", "copy")
    test_ring_attention_nccl(world, case, monkeypatch)


_WORKSPACE_BYTES = 1 << 20


class _SharedWorkspace:
    """A stand-in for torch's symmetric memory on CPU: every rank's buffer is a file all the
    spawned processes map (``torch.from_file(shared=True)``), and the barrier is gloo's."""

    def __init__(self, bufs, group):
        self.bufs, self.group = bufs, group

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        n = torch.Size(sizes).numel()
        return self.bufs[rank].view(dtype)[storage_offset:storage_offset + n].view(sizes)

    def barrier(self, channel=0):
        dist.barrier(self.group)


def _transport_worker(rank, world, port, paths, layout, causal, failures, checked):
    from flash_module import distributed as fmd

    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    bufs = [torch.from_file(p, shared=True, size=_WORKSPACE_BYTES, dtype=torch.uint8) for p in paths]
    original = fmd._symmetric_workspace
    try:
        handle = _SharedWorkspace(bufs, dist.group.WORLD)
        sizes = []

        def workspace(group, device, nbytes):
            sizes.append(nbytes)
            assert nbytes <= bufs[rank].numel()
            return bufs[rank], handle

        fmd._symmetric_workspace = workspace
        q, k, v, dout = (shard_sequence(t, rank, world, layout) for t in _full_inputs(16 * world, 4, 2, 16,
                                                                                     torch.float32))
        packed_cu = torch.tensor([0, 8 * world, 16 * world], dtype=torch.int32)  # two documents

        def run(transport):
            fmd.TRANSPORT = transport
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            out = ring_attention(qs, ks, vs, causal=causal, layout=layout)
            grads = torch.autograd.grad(out, (qs, ks, vs), dout)
            qv, kv, vv = (fmd.shard_documents(t[0], packed_cu, rank, world, layout).requires_grad_()
                          for t in _full_inputs(16 * world, 4, 2, 16, torch.float32)[:3])
            out_v = fmd.ring_attention_varlen(qv, kv, vv, packed_cu, causal=causal, layout=layout)
            return [out, *grads, out_v, *torch.autograd.grad(out_v.sum(), (qv, kv, vv))]

        want = run("p2p")
        if sizes:
            failures.append((rank, "p2p asked for a workspace"))
        for attempt in range(2):  # twice: the slots are reused from pass to pass
            got = run("copy")
            bad = [i for i, (a, b) in enumerate(zip(want, got)) if not torch.equal(a, b)]
            if bad:
                failures.append((rank, attempt, bad))
        if not sizes:
            failures.append((rank, "the copy transport never asked for its workspace"))
        checked.append(rank)
    except Exception as err:  # reported, not raised: a rank dying mid-collective aborts the others
        failures.append((rank, repr(err)))
    finally:
        # The stand-in (which holds the process group) leaves the module, so the group is
        # released here and not at exit (spawn() skips the interpreter's teardown anyway).
        fmd._symmetric_workspace = original
        handle = workspace = None
        gc.collect()
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
        dist.destroy_process_group()


@pytest.mark.parametrize("world,layout,causal", [
    pytest.param(2, "zigzag", True, id="w2-zigzag", marks=pytest.mark.slow),
    pytest.param(3, "contiguous", False, id="w3-full"),
    pytest.param(4, "zigzag", True, id="w4-zigzag", marks=pytest.mark.slow),
])
def test_copy_transport_gives_the_p2p_bits(world, layout, causal, tmp_path):
    """The ``"copy"`` transport (pulls through two slots per lane of a buffer every rank reads,
    one barrier per exchange) on CPU with shared-memory buffers and gloo barriers, processes
    racing for real: ring attention and its packed-document variant, forward and backward
    (K/V lanes both ways, the dK/dV lane), give the ``"p2p"`` transport's bits, in two passes
    in a row over the same slots."""
    paths = [str(tmp_path / f"workspace{r}") for r in range(world)]
    for p in paths:
        Path(p).write_bytes(bytes(_WORKSPACE_BYTES))
    manager = mp.get_context("spawn").Manager()
    failures, checked = manager.list(), manager.list()
    spawn(_transport_worker, world, world, free_port(), paths, layout, causal, failures, checked)
    assert not list(failures), list(failures)
    assert sorted(checked) == list(range(world)), list(checked)


@pytest.mark.slow
def test_ring_transport_cpu_smoke(tmp_path):
    """benchmarks/ring_transport.py (what one hop costs the attention beside it) runs end to
    end with gloo on CPU: 1 and 2 ranks, the p2p transport (the copy-engine one needs
    CUDA symmetric memory)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ring_transport.py"
    out = tmp_path / "transport.json"
    argv = ["--device", "cpu", "--worlds", "1,2", "--seq-per-rank", "32", "--heads", "2", "--head-dim", "16",
            "--iters", "3", "--impl", "torch", "--json", str(out)]
    res = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["world"], r["transport"]) for r in rows] == [(1, "none"), (2, "p2p")]
    two = rows[1]
    assert two["hop_ms"] > 0 and two["attn_ms"] > 0 and two["bytes_per_hop"] == 2 * 32 * 2 * 16 * 2  # K and V
    assert two["both_ms"] > 0 and two["exposed_ms"] == two["both_ms"] - max(two["attn_ms"], two["hop_ms"])


@pytest.mark.slow
def test_bench_ring_cpu_smoke(tmp_path):
    """benchmarks/bench_ring.py (weak scaling) runs end to end with gloo on CPU: 1 and 2 ranks,
    a dense sequence and packed documents."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ring.py"
    out = tmp_path / "ring.json"
    argv = ["--device", "cpu", "--worlds", "1,2", "--seq-per-rank", "32", "--heads", "2", "--head-dim", "16",
            "--iters", "3", "--impl", "torch", "--causal", "--json", str(out)]
    res = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "W=2 N=64" in res.stdout
    rows = json.loads(out.read_text())
    assert [r["world"] for r in rows] == [1, 2]
    assert [r["seq_total"] for r in rows] == [32, 64]
    for r in rows:
        assert r["ring_ms"] > 0 and r["compute_ms"] > 0 and r["tokens_per_s"] > 0
    assert rows[0]["comm_hidden"] is None and rows[1]["comm_ms"] > 0
    assert 0.0 <= rows[1]["comm_hidden"] <= 1.0
    lo, hi = rows[1]["comm_hidden_range"]  # from the exposed time's third and first quartiles
    assert 0.0 <= lo <= hi <= 1.0 and rows[0]["comm_hidden_range"] == [None, None]
    q1, q3 = rows[1]["exposed_quartiles_ms"]
    assert q1 <= q3
    assert "exposed_ms" in rows[1] and rows[1]["exposed_share"] == rows[1]["exposed_ms"] / rows[1]["ring_ms"]
    assert rows[1]["env"] == {}
    # packed documents through ring_attention_varlen, K/V all-gathered
    res = subprocess.run([sys.executable, str(path), *argv, "--docs", "3", "--method", "allgather",
                          "--env", "NCCL_MAX_P2P_NCHANNELS=1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["world"], r["docs"], r["method"]) for r in rows] == [(1, 3, "allgather"), (2, 3, "allgather")]
    assert rows[1]["comm_ms"] > 0 and rows[1]["ring_ms"] > 0
    assert rows[1]["env"] == {"NCCL_MAX_P2P_NCHANNELS": "1"}


def _rank_leaves_a_file(rank, directory, failing_rank):
    if rank == failing_rank:
        raise ValueError(f"rank {rank} was told to fail")
    (Path(directory) / f"rank{rank}").write_text(str(rank))


def test_spawn_ends_ranks_and_reports_a_failing_one(tmp_path):
    """flash_module._spawn.spawn (every multi-process test, benchmark and example): ranks that
    return leave what they wrote and exit cleanly (no interpreter teardown), and a rank that
    raises fails the call with its own error."""
    spawn(_rank_leaves_a_file, 2, str(tmp_path), -1)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["0", "1"]
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 was told to fail"):
        spawn(_rank_leaves_a_file, 2, str(tmp_path), 1)


def test_shard_helpers():
    x = torch.arange(16)[None, :, None]
    assert shard_sequence(x, 1, 2, "contiguous").flatten().tolist() == list(range(8, 16))
    # zigzag with 2 ranks: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert shard_sequence(x, 0, 2, "zigzag").flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(8, 1, 2, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def _uneven_worker(rank, world, port, errors):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        q = torch.randn(1, 74 + 2 * rank, 2, 16, requires_grad=True)  # 74 and 76 tokens
        try:
            ring_attention(q, q, q, causal=True)
            errors[rank] = "no error"
        except ValueError as e:
            errors[rank] = str(e)
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_uneven_shards_are_a_clear_error():
    """Ranks with different shard lengths get a ValueError (not an abort inside gloo)."""
    errors = mp.get_context("spawn").Manager().list(["not run"] * 2)
    spawn(_uneven_worker, 2, 2, free_port(), errors)
    assert all("shards of one shape" in e and "rank 1: q (1, 76, 2, 16)" in e for e in errors), list(errors)


def _hops_worker(rank, world, port, counts):
    import flash_module.distributed as fmd

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        real, hops = fmd._ring_exchange, []

        def counted(tensors, group, rank, world, reverse=False):
            hops.append((phase, reverse, len(tensors)))
            return real(tensors, group, rank, world, reverse)

        fmd._ring_exchange = counted
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, 32, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
        phase = "fwd"
        out = ring_attention(q, k, v, causal=True, layout="zigzag", impl="torch")
        phase = "bwd"
        out.sum().backward()
        counts[rank] = hops
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_ring_hops_per_pass():
    """The ring's communication schedule: W - 1 K/V hops forward (to the next rank); backward,
    in reverse order (to the previous rank), W - 2 K/V hops (it starts from the shard the
    forward ended with and ends on its own) and W - 1 dK/dV hops, the last one home."""
    world = 4
    counts = mp.get_context("spawn").Manager().list([None] * world)
    spawn(_hops_worker, world, world, free_port(), counts)
    for hops in counts:  # (pass, to the previous rank, tensors sent)
        assert [h for h in hops if h[0] == "fwd"] == [("fwd", False, 2)] * (world - 1), hops
        assert [h for h in hops if h[0] == "bwd"] == [("bwd", True, 2)] * ((world - 2) + (world - 1)), hops


def test_shard_sequence_needs_equal_chunks():
    x = torch.randn(1, 150, 2, 8)
    with pytest.raises(ValueError, match=r"150 .* does not split into 4 equal chunks"):
        shard_sequence(x, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="rank must be in"):
        shard_sequence(x, 2, 2, "contiguous")


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
        window = (5, 0) if layout == "zigzag" else (-1, -1)  # zigzag: a window over global positions
        full = fm.MultiheadFlashAttention(32, 4, 2, causal=True, rotary=True, window_size=window)
        cp = fm.MultiheadFlashAttention(32, 4, 2, causal=True, rotary=True, window_size=window,
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
        gc.collect()  # free pending gloo work while the group is alive (see test_ddp)
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_module_context_parallel(layout):
    """MultiheadFlashAttention(context_parallel_group=...) with RoPE on global positions (and,
    zigzag, a sliding window)."""
    errors = mp.get_context("spawn").Manager().list([float("nan")] * 2)
    spawn(_module_worker, 2, 2, free_port(), layout, errors)
    assert all(e < 1e-4 for e in errors), list(errors)
