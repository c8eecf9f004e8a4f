"""Kernel launch configurations (block sizes, warps, pipeline stages).

Configs are chosen by a fixed table keyed on (pass, dtype, head-dim bucket, causal), measured on
an H200 (see ``docs/performance.md`` and ``benchmarks/tune.py``).  Choosing from a table rather
than autotuning at call time keeps the first call deterministic and cheap, and means nothing is
ever benchmarked during CUDA-graph capture or torch.compile tracing.

Under the Triton interpreter (CPU) large blocks are fastest (NumPy is vectorised over a block),
so the interpreter uses 64x64 tiles (32 for float64 at large head dims).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ._runtime import INTERPRET


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of an attention kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int = 4
    num_stages: int = 2

    def __str__(self) -> str:
        return f"M{self.block_m}_N{self.block_n}_w{self.num_warps}_s{self.num_stages}"


_OVERRIDES: dict[str, KernelConfig] = {}
#: The kernels whose config :func:`override` can force.
PASSES: tuple[str, ...] = ("fwd", "dkdv", "dq", "split_kv", "fa1")


@contextlib.contextmanager
def override(**cfgs: KernelConfig) -> Iterator[None]:
    """Force launch configs while the block runs (for tuning and tests).

    Keys: ``fwd`` (FA2 forward), ``dkdv`` and ``dq`` (FA2 backward), ``split_kv`` (the split-KV
    partial kernel) and ``fa1`` (FA1's (Br, Bc) = (block_m, block_n); warps/stages unused).
    """
    unknown = set(cfgs) - set(PASSES)
    if unknown:
        raise ValueError(f"override: unknown passes {sorted(unknown)}; choose from {PASSES}")
    old = dict(_OVERRIDES)
    _OVERRIDES.update(cfgs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


def _d_bucket(head_dim: int) -> int:
    for b in (32, 64, 128):
        if head_dim <= b:
            return b
    return 256


def _interpret_cfg(dtype: torch.dtype, head_dim: int) -> KernelConfig:
    big = dtype == torch.float64 and head_dim > 64
    return KernelConfig(32, 32) if big else KernelConfig(64, 64)


# (head-dim bucket, causal) -> config, for fp16/bf16 on sm90, measured with benchmarks/tune.py
# on an H200 at B*N = 64k tokens, N = 4096, bf16 (2026-11-23; docs/performance.md has the sweep).
_FWD_16 = {
    (32, False): KernelConfig(64, 64, 4, 3), (32, True): KernelConfig(128, 64, 8, 3),
    (64, False): KernelConfig(64, 64, 4, 3), (64, True): KernelConfig(128, 64, 8, 3),
    (128, False): KernelConfig(128, 64, 8, 3), (128, True): KernelConfig(128, 64, 8, 3),
    (256, False): KernelConfig(128, 64, 8, 2), (256, True): KernelConfig(128, 64, 8, 2),
}
# (head-dim bucket) -> (dK/dV config, dQ config); the same choice won causal and not.
_BWD_16 = {
    32: (KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    64: (KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    128: (KernelConfig(64, 128, 8, 2), KernelConfig(128, 64, 8, 3)),
    256: (KernelConfig(64, 64, 8, 2), KernelConfig(128, 32, 8, 2)),
}


# The pruned tuning space for fp16/bf16 on sm90: (pass, head-dim bucket) -> candidates.
# benchmarks/tune.py times every entry; tests/test_gpu.py runs every entry on ragged shapes, so
# whatever the sweep puts into the tables above has already been checked for correctness.
# Pruned by hand (tiles whose accumulators cannot fit 255 registers per thread are left out)
# and with benchmarks/regs.py, which reads each candidate's registers and spills offline.
_C = KernelConfig
TUNING_SPACE: dict[str, dict[int, tuple[KernelConfig, ...]]] = {
    "fwd": {
        64: (_C(128, 64, 4, 3), _C(128, 64, 4, 4), _C(128, 128, 8, 3), _C(128, 64, 8, 3), _C(64, 64, 4, 3),
             _C(128, 128, 4, 3), _C(128, 32, 4, 4), _C(64, 128, 4, 3)),
        128: (_C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(128, 64, 4, 3), _C(128, 32, 4, 3), _C(64, 64, 4, 3),
              _C(128, 64, 8, 2), _C(128, 128, 8, 2), _C(64, 128, 4, 3), _C(128, 64, 4, 4)),
        # (128, 64, 8, 3) and (64, 128, 8, 2) need 256 and 288 KiB of shared memory at D=256 (> 227).
        256: (_C(64, 64, 4, 2), _C(128, 64, 8, 2), _C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 64, 4, 3)),
    },
    "dkdv": {
        64: (_C(64, 128, 8, 3), _C(64, 128, 8, 2), _C(32, 128, 4, 3), _C(64, 64, 4, 3), _C(128, 128, 8, 2),
             _C(32, 64, 4, 3), _C(64, 128, 4, 3)),
        128: (_C(64, 128, 8, 2), _C(64, 128, 8, 3), _C(32, 128, 4, 3), _C(64, 64, 4, 3), _C(32, 128, 8, 2),
              _C(64, 64, 8, 2), _C(128, 128, 8, 2), _C(64, 128, 8, 1)),
        256: (_C(32, 64, 4, 2), _C(64, 64, 8, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(16, 64, 4, 2),
              _C(64, 32, 4, 2), _C(64, 32, 8, 2), _C(64, 32, 8, 1), _C(32, 32, 8, 2), _C(32, 32, 4, 2)),
    },
    "dq": {
        64: (_C(128, 64, 8, 3), _C(128, 64, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 4, 3), _C(64, 128, 8, 2),
             _C(128, 128, 8, 2)),
        128: (_C(128, 64, 8, 2), _C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 32, 4, 3), _C(64, 128, 8, 2),
              _C(128, 128, 8, 2), _C(64, 64, 4, 2)),
        256: (_C(64, 32, 4, 2), _C(64, 64, 8, 2), _C(128, 32, 8, 2), _C(32, 64, 4, 2), _C(64, 64, 4, 2),
              _C(128, 32, 8, 1)),
    },
}


def _wide_cfg(dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """fp32 (ieee) and fp64 tiles: registers and shared memory are 2-4x the fp16 footprint."""
    if dtype == torch.float64:
        return KernelConfig(32, 32, 4, 1) if head_dim <= 64 else KernelConfig(16, 16, 4, 1)
    return KernelConfig(64, 32, 4, 2) if head_dim <= 128 else KernelConfig(32, 32, 4, 1)


def _interpreted(device: torch.device) -> bool:
    return INTERPRET or device.type != "cuda"


def fwd_config(dtype: torch.dtype, head_dim: int, causal: bool, device: torch.device) -> KernelConfig:
    """Forward-kernel config for these inputs."""
    if "fwd" in _OVERRIDES:
        return _OVERRIDES["fwd"]
    if _interpreted(device):
        return _interpret_cfg(dtype, head_dim)
    if dtype in (torch.float16, torch.bfloat16):
        return _FWD_16[(_d_bucket(head_dim), causal)]
    return _wide_cfg(dtype, head_dim)


def bwd_configs(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[KernelConfig, KernelConfig]:
    """(dK/dV-kernel config, dQ-kernel config) for these inputs (one choice won causal and not)."""
    if _interpreted(device):
        cfg = _interpret_cfg(dtype, head_dim)
        dkdv = dq = cfg
    elif dtype in (torch.float16, torch.bfloat16):
        dkdv, dq = _BWD_16[_d_bucket(head_dim)]
    else:
        dkdv = dq = _wide_cfg(dtype, head_dim)
        if dtype == torch.float32 and 64 < head_dim <= 128:
            # H100, fp32 D=128, N=2k: 64x32 spilled in the dK/dV loop (1.3 TFLOP/s non-causal,
            # 2.8 causal); 32x32 gave 5.4 / 4.5 (issue #10's run).
            dkdv = KernelConfig(32, 32, 4, 2)
            # H200, triton 3.6, fp32 D=72 causal (Sq 70, Sk 33): the 64x32 dQ kernel returned dQ
            # off by 0.06-0.8 (every seed; dK/dV, O and the LSE exact; non-causal exact), while
            # the interpreter at the same tiles is exact and 32x32 on the GPU is exact: a
            # compiled-code fault of the big fp32 tile, not the algorithm.  32x32 until it is
            # narrowed down (docs/performance.md, fifth session).
            dq = KernelConfig(32, 32, 4, 2)
    return _OVERRIDES.get("dkdv", dkdv), _OVERRIDES.get("dq", dq)


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def fa1_blocks(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[int, int]:
    """FA1's block sizes (Br, Bc) from on-chip memory, as in the FA1 paper.

    With M the shared memory of one SM in fp32 words: Bc = ceil(M / 4d), Br = min(Bc, d);
    both rounded down to powers of two (tl.dot needs them) and clamped to [16, 128]
    ([16, 32] for float64, whose tiles are twice as large).  Override with
    ``override(fa1=KernelConfig(br, bc))``.
    """
    if "fa1" in _OVERRIDES:
        return _OVERRIDES["fa1"].block_m, _OVERRIDES["fa1"].block_n
    d = max(16, 1 << (max(head_dim, 1) - 1).bit_length())  # padded head dim
    if _interpreted(device):
        smem_bytes = 64 * 1024
    else:
        props = torch.cuda.get_device_properties(device)
        smem_bytes = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    m_words = smem_bytes // 4
    bc = -(-m_words // (4 * d))
    br = min(bc, d)
    hi = 32 if dtype == torch.float64 else 128
    clamp = lambda x: max(16, min(hi, _pow2_floor(x)))
    return clamp(br), clamp(bc)


def split_kv_config(dtype: torch.dtype, head_dim: int, seqlen_q: int, device: torch.device) -> KernelConfig:
    """Config of the split-KV partial kernel: 16-row query tiles for decode (Sq <= 16)."""
    if "split_kv" in _OVERRIDES:
        return _OVERRIDES["split_kv"]
    decode = seqlen_q <= 16
    if _interpreted(device):
        if dtype == torch.float64 and head_dim > 64:
            return KernelConfig(16 if decode else 32, 32)
        return KernelConfig(16 if decode else 64, 64)
    if dtype not in (torch.float16, torch.bfloat16):
        cfg = _wide_cfg(dtype, head_dim)
        return KernelConfig(16, cfg.block_n, 4, cfg.num_stages) if decode else cfg
    if decode:  # 64-key tiles, 4 stages: 3.9-4.3 TB/s on an H200 at the decode benchmark's shapes
        return KernelConfig(16, 64, 4, 3 if head_dim > 128 else 4)
    return fwd_config(dtype, head_dim, False, device)
