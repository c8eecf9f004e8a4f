"""Decode benchmark: a few query tokens against a long KV cache, in TB/s of K/V read.

Usage: python benchmarks/bench_decode.py [--sq 1] [--json out.json]
Shapes follow the platform notes: GQA 32 query heads / 8 K/V heads, D = 128, bf16;
(B=1, Nk=64k), (B=32, Nk=8k), (B=8, Nk=32k).  Bytes = K + V read once (the floor for decode).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_module as fm

IMPLS = ("fa2", "tiling", "sdpa-flash", "sdpa-cudnn")


def measure_shape(b: int, nk: int, sq: int, h: int = 32, h_kv: int = 8, d: int = 128,
                  splits: tuple[int, ...] = ()) -> list[dict]:
    """Time every implementation on one decode shape; one record each."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, sq, h, d, device=dev, dtype=dt)
    k = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    v = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    nbytes = 2 * k.numel() * k.element_size()
    ref = fm.flash_attn_func(q, k, v, impl="torch").float()

    def sdpa(backend):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        return out.transpose(1, 2)

    fns = {
        "fa2": lambda: fm.flash_attn_func(q, k, v),
        "tiling": lambda: fm.flash_attn_func(q, k, v, mode="tiling"),
        "sdpa-flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    for n in splits:  # tuning: fixed split counts
        fns[f"tiling/{n}"] = lambda n=n: fm.flash_attn_func(q, k, v, mode="tiling", num_splits=n)
    rows = []
    for name, fn in fns.items():
        rec = dict(impl=name, B=b, Nk=nk, Sq=sq)
        try:
            rec["max_err"] = (fn().float() - ref).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rec.update(ms=ms, tbps=nbytes / (ms * 1e-3) / 1e12)
        except Exception as e:  # a peer that refuses the shape
            rec["error"] = str(e)[:200]
        rows.append(rec)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sq", type=int, default=1)
    ap.add_argument("--splits", default="", help="also time these fixed num_splits, e.g. 16,32,64")
    args = ap.parse_args()
    splits = tuple(int(x) for x in args.splits.split(",") if x)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    names = IMPLS + tuple(f"tiling/{n}" for n in splits)
    print(f"{'B':>3} {'Nk':>6} {'Sq':>3} " + " ".join(f"{n:>12}" for n in names) + "   (TB/s of K+V)")
    all_rows = []
    for b, nk in ((1, 65536), (32, 8192), (8, 32768)):
        rows = measure_shape(b, nk, args.sq, splits=splits)
        all_rows += rows
        cells = [f"{r['tbps']:12.2f}" if "tbps" in r else f"{'n/a':>12}" for r in rows]
        print(f"{b:>3} {nk:>6} {args.sq:>3} " + " ".join(cells))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
