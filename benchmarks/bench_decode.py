"""Decode benchmark: a few query tokens against a long KV cache, in TB/s of K/V read.

Usage: PYTHONPATH=$PWD python benchmarks/bench_decode.py [--sq 1] [--shapes 1x65536,8x16384] [--json out.json]

GQA 32 query heads / 8 K/V heads, D = 128, bf16.  Bytes = K + V read once (the floor for
decode).  Rows:

* ``fa2``          ``flash_attn_func`` with the default mode (decode shapes route to split-KV);
* ``tiling``       ``flash_attn_func(mode="tiling")``;
* ``kvcache``      ``flash_attn_with_kvcache`` on a contiguous cache (``cache_seqlens`` = Nk);
* ``paged16`` / ``paged256``  the same cache in pages of 16 / 256 rows, shuffled;
* ``sdpa-flash`` / ``sdpa-cudnn`` / ``flex``  the peers;
* ``copy``         a device-to-device copy of K + V, counted as (read + write) bytes / s: the
  card's streaming bandwidth in this run, the roofline the others are held to.

Two tables: eager calls timed with ``do_bench`` (a decode step's host work counts: Python,
dispatch, launches) and the same calls replayed from a CUDA graph (``do_bench_cudagraph``:
the GPU time alone, as a serving loop that captures its decode step sees it).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_module as fm

IMPLS = ("fa2", "tiling", "kvcache", "paged16", "paged256", "sdpa-flash", "sdpa-cudnn", "flex", "copy")
SHAPES = ((1, 65536), (8, 16384), (32, 8192), (64, 2048))


def _paged(cache: torch.Tensor, page: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache`` (B, N, H_kv, D) as shuffled pages of ``page`` rows and the block table."""
    b, n = cache.shape[:2]
    per_seq = n // page
    order = torch.randperm(b * per_seq, generator=gen).to(cache.device)
    pages = torch.empty(b * per_seq, page, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    pages[order] = cache.reshape(b * per_seq, page, *cache.shape[2:])
    return pages, order.view(b, per_seq).to(torch.int32)


def measure_shape(b: int, nk: int, sq: int, h: int = 32, h_kv: int = 8, d: int = 128,
                  splits: tuple[int, ...] = ()) -> list[dict]:
    """Time every implementation on one decode shape; one record each."""
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, sq, h, d, device=dev, dtype=dt)
    k = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    v = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    nbytes = 2 * k.numel() * k.element_size()
    ref = fm.flash_attn_func(q, k, v, impl="torch").float()
    lens = torch.full((b,), nk, dtype=torch.int32, device=dev)
    paged = {}
    for page in (16, 256):  # K and V get the same permutation (the same seed)
        gen.manual_seed(page)
        kp, table = _paged(k, page, gen)
        gen.manual_seed(page)
        vp, _ = _paged(v, page, gen)
        paged[page] = (kp, vp, table)
    flat = torch.cat([k.flatten(), v.flatten()])
    copy_dst = torch.empty_like(flat)

    def sdpa(backend):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        return out.transpose(1, 2)

    fns = {
        "fa2": lambda: fm.flash_attn_func(q, k, v),
        "tiling": lambda: fm.flash_attn_func(q, k, v, mode="tiling"),
        "kvcache": lambda: fm.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens),
        "paged16": lambda: fm.flash_attn_with_kvcache(q, paged[16][0], paged[16][1], cache_seqlens=lens,
                                                      block_table=paged[16][2]),
        "paged256": lambda: fm.flash_attn_with_kvcache(q, paged[256][0], paged[256][1], cache_seqlens=lens,
                                                       block_table=paged[256][2]),
        "sdpa-flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        fns["flex"] = lambda: flex(qt, kt, vt, enable_gqa=True).transpose(1, 2)
    except Exception:  # noqa: BLE001 - not in this torch
        pass
    for n in splits:  # tuning: fixed split counts
        fns[f"tiling/{n}"] = lambda n=n: fm.flash_attn_func(q, k, v, mode="tiling", num_splits=n)
    rows = []
    for name, fn in fns.items():
        rec = dict(impl=name, B=b, Nk=nk, Sq=sq)
        try:
            rec["max_err"] = (fn().float() - ref).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            rec.update(ms=ms, tbps=nbytes / (ms * 1e-3) / 1e12, graph_ms=graph_ms,
                       graph_tbps=nbytes / (graph_ms * 1e-3) / 1e12)
        except Exception as e:  # noqa: BLE001 - a peer that refuses the shape
            rec["error"] = str(e)[:200]
        rows.append(rec)
    ms = triton.testing.do_bench_cudagraph(lambda: copy_dst.copy_(flat), rep=100, return_mode="median")
    tbps = 2 * nbytes / (ms * 1e-3) / 1e12
    rows.append(dict(impl="copy", B=b, Nk=nk, Sq=sq, ms=ms, tbps=tbps, graph_ms=ms, graph_tbps=tbps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sq", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES), help="BxNk list")
    ap.add_argument("--splits", default="", help="also time these fixed num_splits, e.g. 16,32,64")
    args = ap.parse_args()
    splits = tuple(int(x) for x in args.splits.split(",") if x)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    all_rows = []
    for b, nk in shapes:
        all_rows += measure_shape(b, nk, args.sq, splits=splits)
        torch.cuda.empty_cache()
    for key, title in (("tbps", "eager calls (do_bench: host time included)"),
                       ("graph_tbps", "CUDA-graph replay (do_bench_cudagraph: GPU time only)")):
        names = " ".join(f"{n:>10}" for n in dict.fromkeys(r["impl"] for r in all_rows))
        print(f"\n{title}\n{'B':>3} {'Nk':>6} {'Sq':>3} {names}   (TB/s of K+V)")
        for b, nk in shapes:
            rows = [r for r in all_rows if (r["B"], r["Nk"]) == (b, nk)]
            cells = [f"{r[key]:10.2f}" if key in r else f"{'n/a':>10}" for r in rows]
            print(f"{b:>3} {nk:>6} {args.sq:>3} " + " ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
