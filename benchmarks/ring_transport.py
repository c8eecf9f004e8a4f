"""What one ring hop costs the attention it overlaps, by transport (issue #16).

    python benchmarks/ring_transport.py --worlds 2,4 [--seq-per-rank 16384] [--json out.json]

Ring attention sends each step's K/V shard to the next rank while the step's attention runs.
On the GPUs the ring's exposed time (``bench_ring.py``) is 1-5% of a step although each hop is
far shorter than the step, so the question is how much the transfer slows the kernels it runs
beside.  For each world size W this spawns W ranks (one GPU each, NCCL) and times, per rank
(CUDA events, the slowest rank's time, medians over ``--iters``):

* ``attn``: the forward of ``flash_attn_func`` on the rank's shard (B=1, S, H, D, bf16);
* ``hop``: one hop of K and V, to the next rank and from the previous one, alone;
* ``attn+hop``: both issued together, the hop on its own stream, until both are done.

``slowdown`` = attn+hop - attn is what the hop costs the step when it is the shorter of the two;
``exposed`` = attn+hop - max(attn, hop).  Transports:

* ``p2p``: ``batch_isend_irecv`` (NCCL's copy kernels take SMs);
* ``copy``: a pull through torch's symmetric memory (a barrier and ``copy_`` from the previous
  rank's slot, which the copy engines run: no SM); skipped where torch has no symmetric memory.

Both are the ring's own transports (``flash_module.distributed.TRANSPORTS``), each hop sending
on what the one before brought, as the ring does.

``--env KEY=VALUE,...`` sets more variables for the ranks (e.g. ``NCCL_MAX_P2P_NCHANNELS=4``).
NCCL's NVLink multicast stays off.  ``--device cpu`` is a smoke run (gloo, ``p2p`` transport
only, host clocks).  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flash_module as fm  # noqa: E402
from benchmarks.bench_ring import DTYPES, _env_pairs, _Timer  # noqa: E402
from flash_module import distributed as fmd  # noqa: E402
from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn  # noqa: E402


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ.update(dict(args.env_pairs))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    try:
        dtype = DTYPES[args.dtype]
        shape = (1, args.seq_per_rank, args.heads, args.head_dim)
        torch.manual_seed(rank)
        q, k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
        side = torch.cuda.Stream(device) if cuda else None

        def attn() -> None:
            fm.flash_attn_func(q, k, v, causal=args.causal, impl=args.impl)

        def make_hop(name: str):
            """One K/V hop by the ring's own transport ``name`` (each hop sending what the last one
            brought, as the ring does), or None where it is not available here."""
            fmd.TRANSPORT = name
            transport = fmd._transport(group, [[k, v]])
            if name == "copy" and isinstance(transport, fmd._P2P):
                return None
            state = [k, v]

            def hop() -> None:
                recv, handle = transport.exchange(state)
                transport.wait(handle)
                state[:] = recv

            return hop

        hops = {name: h for name in fmd.TRANSPORTS if world > 1 and (h := make_hop(name)) is not None}

        timer = _Timer(device)
        rows = []
        attn_ms = timer(attn, args.iters, group)
        for name, hop in hops.items():
            def both(hop=hop) -> None:
                if side is None:  # CPU: no streams, so one after the other
                    hop()
                    attn()
                    return
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    hop()  # issued first, as the ring does
                attn()
                torch.cuda.current_stream(device).wait_stream(side)

            hop_ms = timer(hop, args.iters, group)
            both_ms, attn2_ms, slowdown, _ = timer.paired(both, attn, args.iters, group)
            rows.append(dict(world=world, transport=name, attn_ms=attn2_ms, hop_ms=hop_ms, both_ms=both_ms,
                             slowdown_ms=slowdown, exposed_ms=both_ms - max(attn2_ms, hop_ms),
                             bytes_per_hop=2 * k.numel() * k.element_size(), env=dict(args.env_pairs)))
        if world == 1:
            rows.append(dict(world=1, transport="none", attn_ms=attn_ms, hop_ms=0.0, both_ms=attn_ms,
                             slowdown_ms=0.0, exposed_ms=0.0, bytes_per_hop=0, env=dict(args.env_pairs)))
        if rank == 0:
            results.extend(rows)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> list[dict]:
    os.environ.update(SAFE_NCCL_ENV)  # inherited by the spawned ranks
    n_dev = torch.cuda.device_count() if args.device == "cuda" else max(args.worlds)
    rows: list[dict] = []
    with mp.get_context("spawn").Manager() as manager:
        for world in args.worlds:
            if world > n_dev:
                print(f"W={world}: only {n_dev} devices, skipped")
                continue
            results = manager.list()
            spawn(_worker, world, world, free_port(), args, results)
            for r in results:
                gbps = r["bytes_per_hop"] / r["hop_ms"] / 1e6 if r["hop_ms"] > 0 else 0.0
                print(f"W={r['world']} {r['transport']:>5}: attn {r['attn_ms']:.3f} ms, "
                      f"hop {r['hop_ms']:.3f} ms ({gbps:.0f} GB/s), attn+hop {r['both_ms']:.3f} ms, "
                      f"slowdown {r['slowdown_ms']:+.3f} ms, exposed {r['exposed_ms']:+.3f} ms", flush=True)
                rows.append(dict(r))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--seq-per-rank", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--impl", default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--env", default="", help="KEY=VALUE[,KEY=VALUE] for the ranks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.env_pairs = _env_pairs(args.env)
    rows = run(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
