"""The Hopper forward (issue #15): the Gluon forward against the portable Triton one and the peers.

    PYTHONPATH=$PWD python benchmarks/bench_gluon_fwd.py [--shapes 128x4096x16x16x1,...]
        [--configs 128x128x3,...] [--dtype bf16|fp16] [--flex] [--persistent]

For each shape (D x N x H x H_kv x causal, B = 64k tokens / N) prints the forward's TFLOP/s
(4 * B * H * N^2 * D, halved when causal; ``triton.testing.do_bench``, median) of ``portable``
(the Triton kernel), ``gluon`` (:mod:`flash_module.kernels.gluon_fwd`, the default on sm_90),
SDPA's cuDNN and flash (FA2) backends, FlexAttention (compiled) with ``--flex``, with
``--persistent`` the Gluon forward persistent and with one tile per program
(``gluon_fwd.PERSISTENT`` on, then off), and the Gluon
forward at other launch configs (BLOCK_M x BLOCK_N x warps x stages).  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_module as fm
from flash_module.kernels import gluon_fwd

SHAPES = ("64x1024x32x32x1,64x4096x32x32x0,64x16384x32x32x1,128x1024x16x16x1,128x4096x16x16x0,"
          "128x4096x16x16x1,128x16384x16x16x0,128x16384x16x16x1,128x8192x32x8x1,256x1024x8x8x1,"
          "256x4096x8x8x0,256x16384x8x8x1")


def run_shape(d: int, n: int, h: int, h_kv: int, causal: bool, tokens: int, dtype: torch.dtype,
              configs: list, flex: bool, persistent: bool = False) -> dict:
    b = max(1, tokens // n)
    q = torch.randn(b, n, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, n, h_kv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    flops = 4 * b * h * n * n * d / (2 if causal else 1)

    def tflops(fn) -> float:
        try:
            return flops / triton.testing.do_bench(fn) / 1e9
        except Exception:  # noqa: BLE001 - a config this head dim cannot hold, a peer without the shape
            return math.nan

    res = {}
    for name, enabled in (("portable", False), ("gluon", True)):
        gluon_fwd.ENABLED = enabled
        res[name] = tflops(lambda: fm.flash_attn_func(q, k, v, causal=causal))
    if persistent:  # both schedules after the default column (two readings of one of them)
        default_persistent = gluon_fwd.PERSISTENT
        for name, on in (("persistent", True), ("one-tile", False)):
            gluon_fwd.PERSISTENT = on
            res[name] = tflops(lambda: fm.flash_attn_func(q, k, v, causal=causal))
        gluon_fwd.PERSISTENT = default_persistent
    default = gluon_fwd.FWD_CONFIGS
    for cfg in configs:
        gluon_fwd.FWD_CONFIGS = {**default, d: cfg}
        res["x".join(map(str, cfg))] = tflops(lambda: fm.flash_attn_func(q, k, v, causal=causal))
    gluon_fwd.FWD_CONFIGS = default
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            res[name] = tflops(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal, enable_gqa=h != h_kv))
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, n, n) if causal else None
        res["flex"] = tflops(lambda: compiled(qt, kt, vt, block_mask=mask, enable_gqa=h != h_kv))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--configs", default="", help="Gluon launch configs as columns, e.g. 128x128x3")
    ap.add_argument("--flex", action="store_true", help="FlexAttention too (compiles per shape)")
    ap.add_argument("--d64-min-keys", type=int, default=None,
                    help="gluon_fwd.D64_MIN_KEYS for this run (0: the Gluon forward at every D=64 length)")
    ap.add_argument("--persistent", action="store_true",
                    help="the Gluon forward persistent and one tile per program (gluon_fwd.PERSISTENT)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.d64_min_keys is not None:
        gluon_fwd.D64_MIN_KEYS = args.d64_min_keys
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| {args.dtype}")
    cols = ["portable", "gluon"] + (["persistent", "one-tile"] if args.persistent else []) + [
        "cudnn", "flash"] + (["flex"] if args.flex else []) + [
        "x".join(map(str, c)) for c in configs]
    print("   D      N   H Hkv causal | " + " ".join(f"{c:>10}" for c in cols) + " | gluon/cudnn")
    for shape in args.shapes.split(","):
        d, n, h, h_kv, causal = (int(x) for x in shape.split("x"))
        res = run_shape(d, n, h, h_kv, bool(causal), args.tokens, dtype, configs, args.flex, args.persistent)
        print(f"{d:4} {n:6} {h:3} {h_kv:3} {causal:6} | " + " ".join(f"{res[c]:10.1f}" for c in cols)
              + f" | {res['gluon'] / res['cudnn']:.2f}", flush=True)


if __name__ == "__main__":
    main()
