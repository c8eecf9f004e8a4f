"""Per-kernel GPU time of one attention step (forward + backward), read from torch.profiler.

For A/B runs of two checkouts on one machine: run it once with each on ``PYTHONPATH`` and a
``--label``; the rows name each Triton kernel with its mean time per step.

    PYTHONPATH=. python benchmarks/kernel_times.py --label new -d 128 -n 4096,16384
    (cd baseline && PYTHONPATH=. python ../benchmarks/kernel_times.py --label old -d 128 -n 4096)
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import flash_module as fm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def kernel_ms(d: int, n: int, causal: bool, tokens: int, hidden: int, mode: str,
              iters: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Mean CUDA time (ms) per fwd+bwd step of each kernel, B = tokens / n, H = hidden / d."""
    b, h = max(1, tokens // n), max(1, hidden // d)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def step() -> None:
        out = fm.flash_attn_func(q, k, v, causal=causal, mode=mode)
        torch.autograd.grad(out, (q, k, v), dout)

    return profile_ms(step, iters)


def profile_ms(step, iters: int, warmup: int = 3) -> dict[str, float]:
    """Mean CUDA time (ms) per call of ``step`` of each kernel it launches (torch.profiler)."""
    for _ in range(warmup):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.device_time / iters / 1000
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="", help="a word printed on each row (e.g. old / new)")
    p.add_argument("-d", "--head-dims", default="64,128")
    p.add_argument("-n", "--seqlens", default="4096,16384")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--mode", default="fa2")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args()
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    for d in map(int, args.head_dims.split(",")):
        for n in map(int, args.seqlens.split(",")):
            for causal in causals:
                times = kernel_ms(d, n, causal, args.tokens, args.hidden, args.mode, args.iters,
                                  DTYPES[args.dtype])
                for name, ms in sorted(times.items(), key=lambda x: -x[1])[:6]:
                    print(f"{args.label:5} D={d:<4} N={n:<6} causal={causal!s:5} {name[:40]:40} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
