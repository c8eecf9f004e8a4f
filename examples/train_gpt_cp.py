"""Train the example GPT with its sequence sharded over several ranks (context parallelism), and
check every step's loss against the same model trained on one device.

Each of ``--world`` processes holds a shard of every training sequence (``zigzag`` layout by
default: the sequence in 2W chunks, rank r holding chunks r and 2W-1-r, so causal work is even).
The attention blocks run ``flash_module.ring_attention`` over the ranks
(``MultiheadFlashAttention``'s ``context_parallel_group``; RoPE takes the shard's global
positions), each rank's loss is its tokens' share of the mean, and the parameter gradients are
summed over the ranks before the optimizer step, as data parallelism would.  Rank 0 also trains
a copy of the model on the whole sequences, on one device, from the same weights and batches;
both loss curves are printed side by side.

    python examples/train_gpt_cp.py                       # 2 gloo ranks on CPU, 30 steps
    python examples/train_gpt_cp.py --world 4 --layout contiguous
    python examples/train_gpt_cp.py --device cuda --world 2 --precision bf16   # NCCL, 2 GPUs

``main(argv)`` returns the per-step losses of the sharded and the one-device runs (the tests use
it).  The model, corpus and schedule are those of ``examples/train_gpt.py``; positions come from
RoPE (learned absolute positions would need the shard's positions as well).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpt import CharData, CharGPT, _lr_at, make_corpus  # noqa: E402

try:
    from flash_module.distributed import shard_sequence
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flash_module.distributed import shard_sequence
# spawn: local ranks that skip the interpreter's teardown once done (gloo can abort in it);
# SAFE_NCCL_ENV: NVLink multicast off in NCCL (the GPU machines' rule), harmless elsewhere.
from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks the sequence is sharded over")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: one GPU per rank, NCCL")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=64, help="global sequence length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-chars", type=int, default=50_000)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    chunks = args.world * (2 if args.layout == "zigzag" else 1)
    if args.seq_len % chunks:
        p.error(f"--seq-len {args.seq_len} must divide into {chunks} chunks ({args.layout}, "
                f"world {args.world})")
    return args


def enable_context_parallel(model: CharGPT, group, layout: str) -> CharGPT:
    """Run every attention block as ring attention over ``group`` (inputs: sequence shards)."""
    for block in model.blocks:
        for m in (block.attn, block.attn.attn):  # the block (RoPE positions) and its core
            m.context_parallel_group = group
            m.context_parallel_layout = layout
    return model


def _optimizer(model: CharGPT, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _step(model, opt, lr, loss_fn, group=None) -> float:
    """One optimizer step; with ``group``, the loss and the gradients are summed over its ranks."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = loss_fn()
    loss.backward()
    total = loss.detach().clone()
    if group is not None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        dist.all_reduce(total, group=group)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(SAFE_NCCL_ENV)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        data = CharData(make_corpus(args.corpus_chars))
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        base = CharGPT(data.vocab_size, args.seq_len, args.d_model, args.layers, args.heads, args.kv_heads,
                       rotary=True, tie_weights=True).to(device)
        sharded = enable_context_parallel(copy.deepcopy(base), dist.group.WORLD, args.layout)
        opt = _optimizer(sharded, args.lr)
        single, single_opt = (base, _optimizer(base, args.lr)) if rank == 0 else (None, None)
        amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16"
               else nullcontext)
        gen = torch.Generator().manual_seed(args.seed)  # the same batches on every rank
        tokens = args.batch_size * args.seq_len
        losses, reference = [], []
        for step in range(args.steps):
            x, y = (t.to(device) for t in data.batch("train", args.batch_size, args.seq_len, gen))
            xs, ys = (shard_sequence(t, rank, world, args.layout) for t in (x, y))
            lr = _lr_at(step, args.steps, args.lr)

            def sharded_loss(xs=xs, ys=ys):  # this rank's tokens' share of the global mean
                with amp():
                    logits = sharded(xs)
                return F.cross_entropy(logits.float().flatten(0, 1), ys.flatten(), reduction="sum") / tokens

            losses.append(_step(sharded, opt, lr, sharded_loss, dist.group.WORLD))
            if single is not None:
                def full_loss(x=x, y=y):
                    with amp():
                        return single(x, y)

                reference.append(_step(single, single_opt, lr, full_loss))
                if not args.quiet:
                    print(f"step {step:4d}  loss {world} ranks {losses[-1]:.5f}  one device "
                          f"{reference[-1]:.5f}  |diff| {abs(losses[-1] - reference[-1]):.2e}", flush=True)
        if rank == 0:
            results.append(dict(losses=losses, reference=reference))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs, {torch.cuda.device_count()} present")
    os.environ.update(SAFE_NCCL_ENV)
    if not args.quiet:
        print(f"{args.world} ranks ({args.device}, {args.layout}), sequence {args.seq_len} -> "
              f"{args.seq_len // args.world} tokens per rank; {args.precision}")
    with mp.get_context("spawn").Manager() as manager:
        results = manager.list()
        spawn(_worker, args.world, args.world, free_port(), args, results)
        out = dict(results[0])
    diff = max(abs(a - b) for a, b in zip(out["losses"], out["reference"]))
    out["max_abs_diff"] = diff
    if not args.quiet:
        print(f"largest |loss difference| over {args.steps} steps: {diff:.2e}")
    return out


if __name__ == "__main__":
    main()
