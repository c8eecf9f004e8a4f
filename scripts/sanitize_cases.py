"""Every attention kernel and mode, forward and backward, plus the softmax kernels, on ragged
shapes, sized for compute-sanitizer (memcheck / racecheck / initcheck).

Lengths are not multiples of any tile, head dims 40 / 72 / 136 are padded, GQA and Sq != Sk
both ways, causal and not.  Run it under the sanitizer with PyTorch's caching allocator off, so
that every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

(``bash scripts/gpu_check.sh sanitize`` runs the three tools.)  Prints one line per case.
"""

from __future__ import annotations

import sys

import torch

import flash_module as fm

# (B, Sq, Sk, H, H_kv, D)
SHAPES = [(1, 77, 203, 4, 2, 40), (2, 203, 77, 2, 1, 72), (1, 130, 131, 2, 2, 136), (2, 1, 300, 8, 2, 64)]
CASES = [("fa2", torch.bfloat16), ("fa2", torch.float32), ("fa1", torch.bfloat16), ("tiling", torch.bfloat16),
         ("fa2", torch.float64)]


def main() -> int:
    torch.manual_seed(0)
    n = 0
    for mode, dtype in CASES:
        shapes = SHAPES[:1] if dtype == torch.float64 else SHAPES
        for b, sq, sk, h, h_kv, d in shapes:
            for causal in (False, True):
                q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, requires_grad=True)
                k, v = (torch.randn(b, sk, h_kv, d, device="cuda", dtype=dtype, requires_grad=True)
                        for _ in range(2))
                splits = 3 if mode == "tiling" else 0
                out = fm.flash_attn_func(q, k, v, causal=causal, mode=mode, num_splits=splits)
                out.backward(torch.randn_like(out))
                torch.cuda.synchronize()
                n += 1
                print(f"ok {mode} {str(dtype)[6:]} {(b, sq, sk, h, h_kv, d)} causal={causal}", flush=True)
    for algorithm, splits in (("online", None), ("tiling", 3)):
        x = torch.randn(37, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fm.softmax(x, algorithm=algorithm, num_splits=splits).backward(torch.randn_like(x))
        torch.cuda.synchronize()
        n += 1
        print(f"ok softmax {algorithm}", flush=True)
    print(f"{n} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
