"""Weak scaling of ring attention: the sequence length per GPU is fixed, 1 -> 2 -> 4 -> 8 GPUs.

    python benchmarks/bench_ring.py --seq-per-rank 16384 --worlds 1,2,4,8 --causal --layout zigzag \
        --json ring.json

For each world size W (at most the number of GPUs present) it spawns W processes, one GPU each,
joined by NCCL (or gloo with ``--device cpu``, for a smoke run), and each rank times three things
on its shard, a barrier before each iteration and the slowest rank's time kept:

* ``ring``: ``ring_attention`` forward + backward (global length W * S_local);
* ``compute``: the same kernel calls with the ring exchange replaced by a local no-op (every step
  attends to the rank's own K/V shard, so the work per step is identical, with no communication);
* ``comm``: the same exchanges with no compute (K/V forward; K/V and the fp32 dK/dV backward, as
  many hops as the ring makes: W - 1 forward, W - 2 and W - 1 backward).

It reports global tokens/s (forward + backward), TFLOP/s per GPU (FLOPs of the global attention,
3.5 x the forward's 4 * B * H * N^2 * D, halved when causal, divided by W), the exposed time
(ring - compute) and the fraction of the communication hidden behind compute, ``(comm -
exposed) / comm`` clamped to [0, 1].  Ring and compute run alternately, one of each per
iteration, and the exposed time is the median of the per-iteration differences: a drift of the
clocks over the run then shifts both sides alike instead of showing up as exposed time.
Medians over ``--iters`` iterations (CUDA events on GPU, perf_counter on CPU).  The hidden share
also comes as a range, from the per-iteration exposed times' third and first quartiles: with a
K/V hop of ~0.6 ms against a 5-25 ms step it is a small difference of two large times, and
ten-iteration medians of one code moved it by tens of points between runs.

With ``--docs N`` the global sequence is a packed sequence of N documents of random lengths
(the same on every rank; each a multiple of the piece count) and the call is
``ring_attention_varlen`` with ``--method ring`` or ``allgather`` (Llama 3's all-gather of K/V);
FLOPs count attention within documents only.  For ``allgather`` "compute" replaces the
all-gather with the rank's own K/V repeated and skips the dK/dV all-reduce, and "comm" is one
all-gather of K and V plus the all-reduce of the fp32 dK/dV of the whole sequence.

NCCL's NVLink multicast is kept off (NCCL_NVLS_ENABLE=0 and friends) as the device notes ask.
``--env KEY=VALUE,...`` sets more variables for the ranks (recorded in each row), e.g.
``NCCL_MAX_P2P_NCHANNELS=1``: fewer channels, so NCCL's send/receive kernels take fewer SMs from
the attention kernels they overlap.  ``--transport copy`` runs the ring (and the "comm" hops)
through ``flash_module.distributed``'s copy-engine transport instead of NCCL's send/receive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_module import distributed as fmd  # noqa: E402
from flash_module._runtime import acc_dtype  # noqa: E402
from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ring_flops(batch: int, heads: int, seq_total: int, head_dim: int, causal: bool) -> float:
    """Forward + backward FLOPs of attention over the whole (global) sequence."""
    fwd = 4.0 * batch * heads * seq_total * seq_total * head_dim / (2.0 if causal else 1.0)
    return 3.5 * fwd


def document_lengths(n_docs: int, total: int, multiple: int, seed: int = 0) -> list[int]:
    """``n_docs`` random lengths, multiples of ``multiple``, summing to ``total`` (itself a multiple
    of ``multiple``); the same for a given seed on every rank."""
    gen = torch.Generator().manual_seed(seed)
    units = total // multiple
    cuts = torch.randperm(units - 1, generator=gen)[: n_docs - 1].add(1).tolist() if n_docs > 1 else []
    cuts.sort()
    bounds = [0, *cuts, units]
    return [(b - a) * multiple for a, b in zip(bounds[:-1], bounds[1:])]


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def once(self, fn, group) -> float:
        """The slowest rank's time of one call of ``fn``, in ms."""
        dist.barrier(group)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        slowest = torch.tensor([ms], dtype=torch.float64, device=self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        return float(slowest.item())

    def __call__(self, fn, iters: int, group) -> float:
        """Median over iterations of the slowest rank's time, in ms."""
        fn()  # warm-up: compiles, allocations, NCCL connections
        return statistics.median(self.once(fn, group) for _ in range(iters))

    def paired(self, fn_a, fn_b, iters: int, group) -> tuple[float, float, float, tuple[float, float]]:
        """``fn_a`` and ``fn_b`` alternately, one of each per iteration: the medians of their
        times, the median of the per-iteration differences a - b and those differences' first
        and third quartiles, in ms."""
        fn_a()
        fn_b()
        pairs = [(self.once(fn_a, group), self.once(fn_b, group)) for _ in range(iters)]
        diffs = [a - b for a, b in pairs]
        return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
                statistics.median(diffs), _quartiles(diffs))


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``xs`` (both the value itself for one value)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def _hidden_share(exposed: float, comm: float) -> float | None:
    """The share of ``comm`` hidden behind the compute when ``exposed`` ms of the ring's time
    are not compute, in [0, 1]."""
    return min(1.0, max(0.0, (comm - exposed) / comm)) if comm > 0 else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _pct_range(r: list) -> str:
    """`` (lo-hi%)`` of a hidden-share range, empty without one."""
    return "" if r[0] is None else f" ({100 * r[0]:.0f}-{100 * r[1]:.0f}%)"


def _local_exchange(tensors, group, rank, world, reverse=False):
    """Stand-in for the ring exchange: 'receive' the tensors just sent (no communication)."""
    return list(tensors), []


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(SAFE_NCCL_ENV)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        dtype = DTYPES[args.dtype]
        gen = torch.Generator(device=device).manual_seed(1234 + rank)
        packed = args.docs > 0
        lead = () if packed else (args.batch,)
        shape_q = (*lead, args.seq_per_rank, args.heads, args.head_dim)
        shape_kv = (*lead, args.seq_per_rank, args.kv_heads or args.heads, args.head_dim)
        q, dout = (torch.randn(shape_q, generator=gen, device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(shape_kv, generator=gen, device=device, dtype=dtype) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        group = dist.group.WORLD
        timer = _Timer(device)
        pieces = world if args.layout == "contiguous" else 2 * world
        lengths = document_lengths(args.docs, world * args.seq_per_rank, pieces) if packed else []
        cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()],
                          dtype=torch.int32, device=device)

        def forward() -> torch.Tensor:
            if packed:
                return fmd.ring_attention_varlen(q, k, v, cu, causal=args.causal, layout=args.layout,
                                                 mode=args.mode, impl=args.impl, method=args.method)
            return fmd.ring_attention(q, k, v, causal=args.causal, layout=args.layout, mode=args.mode,
                                      impl=args.impl)

        def step() -> None:
            torch.autograd.grad(forward(), (q, k, v), dout)

        def step_fwd() -> None:
            with torch.no_grad():
                forward()

        fmd.TRANSPORT = args.transport
        real = fmd._ring_exchange, fmd._gather_blocks, fmd._sum_over_group

        def local(fn):
            """``fn`` with the ring's exchanges replaced by local no-ops (the compute alone)."""
            def run_local() -> None:
                fmd.TRANSPORT = "p2p"  # (its exchange is the one replaced)
                fmd._ring_exchange = _local_exchange
                fmd._gather_blocks = lambda x, group, world, layout: x.repeat(world, *[1] * (x.dim() - 1))
                fmd._sum_over_group = lambda x, group: x
                try:
                    fn()
                finally:
                    fmd._ring_exchange, fmd._gather_blocks, fmd._sum_over_group = real
                    fmd.TRANSPORT = args.transport
            return run_local

        ring_ms, compute_ms, exposed_ms, exposed_q = timer.paired(step, local(step), args.iters, group)
        ring_fwd_ms, compute_fwd_ms, exposed_fwd_ms, exposed_fwd_q = timer.paired(
            step_fwd, local(step_fwd), args.iters, group)

        acc = acc_dtype(dtype)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        kd, vd = k.detach(), v.detach()

        def comm_only(forward_only: bool = False) -> None:
            if packed and args.method == "allgather":
                for t in (kd, vd):
                    dist.all_gather([torch.empty_like(t) for _ in range(world)], t, group=group)
                if not forward_only:
                    grads = torch.zeros((2, world * kd.shape[0], *kd.shape[1:]), dtype=acc, device=device)
                    dist.all_reduce(grads, group=group)
                return
            # forward K/V hops; the backward's K/V hops (it starts from the forward's last shard
            # and ends on its own) and its fp32 dK/dV hops (the last one: home)
            # (through the ring's transport, each K/V hop sending what the last one brought, as
            # the ring does; the dK/dV ones a fresh accumulator each time)
            hops = [([kd, vd], world - 1, True), ([kd, vd], world - 2, True), ([dk, dv], world - 1, False)]
            for tensors, n, onward in hops[:1] if forward_only else hops:
                if n <= 0:
                    continue
                transport = fmd._transport(group, [tensors])
                for _ in range(n):
                    recv, handle = transport.exchange(tensors)
                    transport.wait(handle)
                    tensors = recv if onward else tensors
                transport.finish()

        comm_ms = timer(comm_only, args.iters, group) if world > 1 else 0.0
        comm_fwd_ms = timer(lambda: comm_only(True), args.iters, group) if world > 1 else 0.0
        if rank == 0:
            seq_total = world * args.seq_per_rank
            if packed:
                flops = sum(ring_flops(1, args.heads, n, args.head_dim, args.causal) for n in lengths)
            else:
                flops = ring_flops(args.batch, args.heads, seq_total, args.head_dim, args.causal)
            hidden = _hidden_share(exposed_ms, comm_ms)
            results.append(dict(
                world=world, seq_per_rank=args.seq_per_rank, seq_total=seq_total, batch=args.batch,
                heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                causal=args.causal, layout=args.layout, mode=args.mode, impl=args.impl, dtype=args.dtype,
                docs=args.docs, method=args.method if packed else "ring", env=dict(args.env),
                transport=args.transport,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                ring_ms=ring_ms, compute_ms=compute_ms, comm_ms=comm_ms, exposed_ms=exposed_ms,
                exposed_share=exposed_ms / ring_ms,
                tokens_per_s=(1 if packed else args.batch) * seq_total / (ring_ms * 1e-3),
                tflops_per_gpu=flops / world / (ring_ms * 1e-3) / 1e12,
                comm_hidden=hidden,
                # the exposed time's quartiles over the iterations, and the hidden share they give
                # (at the third quartile, then the first): how far the reading can be trusted
                exposed_quartiles_ms=list(exposed_q), exposed_fwd_quartiles_ms=list(exposed_fwd_q),
                comm_hidden_range=[_hidden_share(exposed_q[1], comm_ms),
                                   _hidden_share(exposed_q[0], comm_ms)],
                comm_hidden_fwd_range=[_hidden_share(exposed_fwd_q[1], comm_fwd_ms),
                                       _hidden_share(exposed_fwd_q[0], comm_fwd_ms)],
                # per pass: the backward's times are the step's minus the forward's
                ring_fwd_ms=ring_fwd_ms, compute_fwd_ms=compute_fwd_ms, comm_fwd_ms=comm_fwd_ms,
                exposed_fwd_ms=exposed_fwd_ms,
                comm_hidden_fwd=_hidden_share(exposed_fwd_ms, comm_fwd_ms),
                comm_hidden_bwd=_hidden_share(exposed_ms - exposed_fwd_ms, comm_ms - comm_fwd_ms),
                tflops_per_gpu_fwd=flops / 3.5 / world / (ring_fwd_ms * 1e-3) / 1e12,
                tflops_per_gpu_bwd=flops * 2.5 / 3.5 / world / ((ring_ms - ring_fwd_ms) * 1e-3) / 1e12,
            ))
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> list[dict]:
    """Spawn each world size in turn; one result row per world size."""
    os.environ.update(SAFE_NCCL_ENV)  # inherited by the spawned ranks
    os.environ.update(dict(args.env))  # --env: e.g. NCCL_MAX_P2P_NCHANNELS=1 (NCCL's SM share)
    available = torch.cuda.device_count() if args.device == "cuda" else max(args.worlds)
    rows: list[dict] = []
    with mp.get_context("spawn").Manager() as manager:
        for world in args.worlds:
            if world > available:
                print(f"world {world}: skipped, {available} GPU(s) present", file=sys.stderr)
                continue
            results = manager.list()
            spawn(_worker, world, world, free_port(), args, results)
            rows.extend(dict(r) for r in results)
            r = rows[-1]
            hidden = _pct(r["comm_hidden"]) + _pct_range(r["comm_hidden_range"])
            hidden_fwd = _pct(r["comm_hidden_fwd"]) + _pct_range(r["comm_hidden_fwd_range"])
            print(f"W={world} N={r['seq_total']} ({r['transport']}): ring {r['ring_ms']:.2f} ms, "
                  f"compute {r['compute_ms']:.2f}, "
                  f"comm {r['comm_ms']:.2f}, exposed {r['exposed_ms']:.2f} "
                  f"({100 * r['exposed_share']:.1f}% of the step) | {r['tokens_per_s']:.3g} tok/s, "
                  f"{r['tflops_per_gpu']:.1f} TFLOP/s/GPU, comm hidden {hidden} | fwd: ring "
                  f"{r['ring_fwd_ms']:.2f} compute {r['compute_fwd_ms']:.2f} comm {r['comm_fwd_ms']:.2f} "
                  f"{r['tflops_per_gpu_fwd']:.1f} TFLOP/s hidden {hidden_fwd} | bwd: "
                  f"{r['tflops_per_gpu_bwd']:.1f} TFLOP/s hidden {_pct(r['comm_hidden_bwd'])}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Weak scaling of flash_module's ring attention.")
    p.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--seq-per-rank", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=fmd.LAYOUTS, default="zigzag")
    p.add_argument("--mode", default="fa2", help="attention algorithm (flash_module.MODES)")
    p.add_argument("--impl", default="auto", help="implementation (flash_module.IMPLS): auto, triton, torch")
    p.add_argument("--iters", type=int, default=30,
                   help="timed iterations (the hidden share's quartile range shows their spread)")
    p.add_argument("--docs", type=int, default=0,
                   help="packed documents of random lengths (ring_attention_varlen); 0: one dense sequence")
    p.add_argument("--method", choices=fmd.METHODS, default="ring", help="with --docs: ring or allgather")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--transport", choices=fmd.TRANSPORTS, default="p2p",
                   help="how the ring moves shards: p2p (NCCL send/receive) or copy (copy engines through "
                        "symmetric memory; flash_module.distributed.TRANSPORT)")
    p.add_argument("--env", type=_env_pairs, default=[],
                   help="KEY=VALUE[,KEY=VALUE] set for the ranks, e.g. NCCL_MAX_P2P_NCHANNELS=1 (how many "
                        "SMs NCCL's send/receive kernels take from attention); multicast stays off")
    return p


def _env_pairs(text: str) -> list[tuple[str, str]]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 or not p[0] for p in pairs) or any(k in SAFE_NCCL_ENV for k, _ in pairs):
        raise argparse.ArgumentTypeError(
            f"--env wants KEY=VALUE pairs (not {sorted(SAFE_NCCL_ENV)}): {text!r}")
    return [(k, v) for k, v in pairs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cpu" and args.dtype != "fp32":
        args.dtype = "fp32"  # CPU kernels: keep it simple and exact
    rows = run(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
