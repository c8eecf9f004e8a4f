"""Sliding-window benchmark (issue #13): a long causal sequence with a window against full causal
attention, ours and FlexAttention (the same window as a block mask) in one run.

Usage: PYTHONPATH=$PWD python benchmarks/bench_window.py [--seqlen 65536] [--window 4096]
       [--heads 16] [--dim 128] [--json out.json]

bf16, B = 1, (B, N, H, D) inputs; ``triton.testing.do_bench`` medians of the forward (no grad) and
of the backward alone (``autograd.grad`` of a graph built once).  The issue's target: the window
runs >= 7x faster than full causal at N = 64k, W = 4k (the FLOP ratio is ~8x: a causal row sees
i + 1 keys, a windowed one at most W + 1).  TFLOP/s count the FLOPs each call really does.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import flash_module as fm


def _flops(n: int, h: int, d: int, window: int | None) -> float:
    """Forward FLOPs of causal attention over n tokens (4·h·d per visible (query, key) pair)."""
    if window is None:
        pairs = n * (n + 1) / 2
    else:
        w = min(window, n - 1)
        pairs = (w + 1) * (w + 2) / 2 + (n - w - 1) * (w + 1)  # rows past the first w see w + 1 keys
    return 4 * h * d * pairs


def _bench(fn, inputs) -> tuple[float, float]:
    with torch.no_grad():
        fwd = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    out = fn()
    dout = torch.randn_like(out)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
                                  warmup=5, rep=30, return_mode="median")
    return fwd, bwd


def measure(n: int, window: int, h: int, d: int) -> list[dict]:
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    impls = {
        "ours causal": (lambda: fm.flash_attn_func(q, k, v, causal=True), (q, k, v), None),
        "ours window": (lambda: fm.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)), (q, k, v),
                        window),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        full = create_block_mask(lambda b, h_, i, j: i >= j, None, None, n, n, device="cuda")
        local = create_block_mask(lambda b, h_, i, j: (i >= j) & (i - j <= window), None, None, n, n,
                                  device="cuda")
        impls["flex causal"] = (lambda: flex(qt, kt, vt, block_mask=full), (qt, kt, vt), None)
        impls["flex window"] = (lambda: flex(qt, kt, vt, block_mask=local), (qt, kt, vt), window)
    except Exception as e:  # noqa: BLE001 - no FlexAttention in this torch
        print(f"flex unavailable: {e}")
    rows, base = [], {}
    for name, (fn, inputs, w) in impls.items():
        rec = dict(impl=name, N=n, H=h, D=d, window=w)
        try:
            fwd, bwd = _bench(fn, inputs)
            flops = _flops(n, h, d, w)
            rec.update(fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flops / fwd / 1e9,
                       bwd_tflops=2.5 * flops / bwd / 1e9)
        except Exception as e:  # noqa: BLE001 - a peer that refuses the shape
            rec["error"] = str(e)[:200]
            print(f"{name:12} n/a ({rec['error']})")
            rows.append(rec)
            continue
        who = name.split()[0]
        if w is None:
            base[who] = (fwd, bwd)
        elif who in base:
            rec.update(fwd_speedup=base[who][0] / fwd, bwd_speedup=base[who][1] / bwd)
        rows.append(rec)
        speed = (f"  speedup vs causal: fwd {rec['fwd_speedup']:.2f}x  bwd {rec['bwd_speedup']:.2f}x"
                 if "fwd_speedup" in rec else "")
        print(f"{name:12} fwd {fwd:8.2f} ms ({rec['fwd_tflops']:5.0f} TFLOP/s)  bwd {bwd:8.2f} ms "
              f"({rec['bwd_tflops']:5.0f} TFLOP/s){speed}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"N={args.seqlen} W={args.window} H={args.heads} D={args.dim} causal bf16")
    rows = measure(args.seqlen, args.window, args.heads, args.dim)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
