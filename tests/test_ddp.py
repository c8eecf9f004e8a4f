"""DistributedDataParallel (gloo, 2 CPU processes) over MultiheadFlashAttention.

Each rank runs forward + backward on its half of a fixed batch; DDP all-reduces (averages) the
gradients.  With a mean loss and equal shards that average is exactly the single-process
gradient of the full batch, which is what the test checks.  The children are started with
``spawn`` and inherit the environment, so under the test suite they run the Triton interpreter
too (TRITON_INTERPRET=1 set by conftest).
"""

from __future__ import annotations

import datetime
import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import flash_module
from flash_module import MultiheadFlashAttention
from flash_module._spawn import free_port, spawn

REPO_ROOT = str(Path(__file__).resolve().parents[1])
WORLD_SIZE = 2
BATCH, SEQ, EMBED, HEADS, KV_HEADS = 4, 8, 32, 4, 2


def _gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")


def _make_model(rotary: bool) -> MultiheadFlashAttention:
    torch.manual_seed(1234)
    return MultiheadFlashAttention(EMBED, HEADS, num_kv_heads=KV_HEADS, causal=True, rotary=rotary)


def _make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(BATCH, SEQ, EMBED, generator=gen)
    target = torch.randn(BATCH, SEQ, EMBED, generator=gen)
    return x, target


def _loss(model, x, target) -> torch.Tensor:
    return (model(x) - target).pow(2).mean()


def _ddp_step(rank: int, world_size: int, rotary: bool, out_path: str) -> None:
    model = torch.nn.parallel.DistributedDataParallel(_make_model(rotary))
    x, target = _make_batch()
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    loss = _loss(model, x[shard], target[shard])
    loss.backward()  # DDP averages the gradients over the ranks here
    losses = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({
            "grads": {name: p.grad.clone() for name, p in model.module.named_parameters()},
            "losses": torch.stack(losses),
            "interpreting": flash_module.ops.interpreting(),
        }, out_path)


def _worker(rank: int, world_size: int, port: int, rotary: bool, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _ddp_step(rank, world_size, rotary, out_path)
        # DDP's reducer holds the process group and sits in reference cycles; collect it while the
        # group is alive, or gloo's threads may be torn down at interpreter exit (SIGABRT).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rotary", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["plain", "rotary"])
def test_ddp_gloo_gradients_match_single_process(tmp_path, monkeypatch, rotary):
    # Spawned children import this module again: make sure they find flash_module and tests/.
    pythonpath = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO_ROOT, pythonpath) if p))
    out_path = str(tmp_path / "ddp_grads.pt")

    spawn(_worker, WORLD_SIZE, WORLD_SIZE, free_port(), rotary, out_path)
    saved = torch.load(out_path)
    assert saved["interpreting"] == flash_module.ops.interpreting(), "children ran a different kernel path"

    model = _make_model(rotary)
    x, target = _make_batch()
    loss = _loss(model, x, target)
    loss.backward()

    # The mean of the equal-sized shards' mean losses is the full-batch mean loss.
    torch.testing.assert_close(saved["losses"].mean(), loss.detach(), atol=1e-6, rtol=1e-5)
    grads = saved["grads"]
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
