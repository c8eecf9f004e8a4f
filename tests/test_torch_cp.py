"""torch's own context-parallel API running our kernels (issue #16).

``torch.distributed.tensor.experimental.context_parallel`` shards the given buffers along the
sequence and replaces ``F.scaled_dot_product_attention`` with a ring over the mesh whose every
step calls aten's ``_scaled_dot_product_flash_attention`` (or the efficient / cuDNN op) on local
shards.  With ``flash_module.integrations.register_torch_flash_impl()`` active, that aten flash op
is ours on CUDA, so a model written against torch SDPA gets torch's context parallelism with
flash_module's kernels in every step.  (On CPU torch's ring has no SDPA op to call: GPUs only.)
Models that call flash_module directly use its own ring, ``context_parallel_group=`` on the
modules or :func:`flash_module.ring_attention` (``tests/test_ring_attention.py``).
"""

from __future__ import annotations

import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flash_module._spawn import SAFE_NCCL_ENV, free_port, spawn


def _worker(rank, world, port, causal, results):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from flash_module.integrations import sdpa as override

        assert override.register_torch_flash_impl()
        mesh = init_device_mesh("cuda", (world,))
        gen = torch.Generator(device="cuda").manual_seed(3)
        q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        with sdpa_kernel(SDPBackend.MATH):  # the reference, on the whole sequence, fp32
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            lowp = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.nn.attention.activate_flash_attention_impl(override.TORCH_IMPL_NAME)
        try:
            before = override.torch_impl_calls
            cq, ck, cv = (t.clone() for t in (q, k, v))
            # torch's load-balanced sharding (its default) is for causal attention only: it raises
            # "Load balancing requires `is_causal=True`" otherwise
            _cp_options.enable_load_balance = causal
            with context_parallel(mesh, buffers=[cq, ck, cv], buffer_seq_dims=[2, 2, 2]):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(cq, ck, cv, is_causal=causal)
            calls = override.torch_impl_calls - before
        finally:
            torch.nn.attention.restore_flash_attention_impl()
        (full,) = context_parallel_unshard(mesh, [out], [2])
        results[rank] = (calls, (full.float() - ref).abs().max().item(),
                         (lowp.float() - ref).abs().max().item())
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_context_parallel_runs_our_kernels(causal, monkeypatch):
    if not (torch.cuda.is_available() and dist.is_nccl_available()) or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs and NCCL")
    if not hasattr(torch.nn.attention, "register_flash_attention_impl"):
        pytest.skip("this torch has no flash-attention registry")
    for name, value in SAFE_NCCL_ENV.items():
        monkeypatch.setenv(name, value)
    results = mp.get_context("spawn").Manager().list([None] * 2)
    spawn(_worker, 2, 2, free_port(), causal, results)
    for calls, err, ref_err in results:
        assert calls >= 2  # one aten flash call per ring step, each ours
        assert err <= 2 * ref_err + 1e-2  # flash-attn's rule against torch's own bf16 error
