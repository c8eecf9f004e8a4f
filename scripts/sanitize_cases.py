"""Every attention kernel and mode, forward and backward, plus the softmax kernels, on ragged
shapes, sized for compute-sanitizer (memcheck / racecheck / initcheck).

Lengths are not multiples of any tile, head dims 40 / 72 / 136 are padded, GQA and Sq != Sk
both ways, causal and not.  Run it under the sanitizer with PyTorch's caching allocator off, so
that every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

(``bash scripts/gpu_check.sh sanitize`` runs the three tools, each over ``--shard i/n`` slices
in parallel.)  Prints one line per case.
"""

from __future__ import annotations

import argparse
import sys

import torch

import flash_module as fm

# (B, Sq, Sk, H, H_kv, D)
SHAPES = [(1, 77, 203, 4, 2, 40), (2, 203, 77, 2, 1, 72), (1, 130, 131, 2, 2, 136), (2, 1, 300, 8, 2, 64)]
CASES = [("fa2", torch.bfloat16), ("fa2", torch.float32), ("fa1", torch.bfloat16), ("tiling", torch.bfloat16),
         ("fa2", torch.float64)]


def _attention_case(mode, dtype, shape, causal):
    def run():
        b, sq, sk, h, h_kv, d = shape
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, sk, h_kv, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        out = fm.flash_attn_func(q, k, v, causal=causal, mode=mode, num_splits=3 if mode == "tiling" else 0)
        out.backward(torch.randn_like(out))
    return f"{mode} {str(dtype)[6:]} {shape} causal={causal}", run


def _softmax_case(algorithm, splits):
    def run():
        x = torch.randn(37, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fm.softmax(x, algorithm=algorithm, num_splits=splits).backward(torch.randn_like(x))
    return f"softmax {algorithm}", run


def cases() -> list:
    """Every case as (name, run)."""
    out = []
    for mode, dtype in CASES:
        for shape in SHAPES[:1] if dtype == torch.float64 else SHAPES:
            out += [_attention_case(mode, dtype, shape, causal) for causal in (False, True)]
    return out + [_softmax_case("online", None), _softmax_case("tiling", 3)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard", default="0/1", help="i/n: run cases i, i+n, i+2n, ... (parallel runs)")
    i, n = (int(x) for x in p.parse_args().shard.split("/"))
    torch.manual_seed(0)
    mine = cases()[i::n]
    for name, run in mine:
        run()
        torch.cuda.synchronize()
        print(f"ok {name}", flush=True)
    print(f"{len(mine)} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
