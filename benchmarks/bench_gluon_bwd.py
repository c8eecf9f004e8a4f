"""The Hopper backward (issue #15): the Gluon passes against the portable Triton ones and the peers.

    PYTHONPATH=$PWD python benchmarks/bench_gluon_bwd.py [--shapes 128x4096x16x16x1,...]

For each shape (D x N x H x H_kv x causal, B = 64k tokens / N, bf16) prints the backward's
TFLOP/s (2.5 x the forward's 4 * B * H * N^2 * D, halved when causal; ``torch.autograd.grad``
timed with ``triton.testing.do_bench``, median) of: ``portable`` (both passes in portable
Triton), ``gluon-dkdv`` (the Gluon dK/dV pass and the portable dQ), ``gluon`` (both in Gluon),
SDPA's cuDNN and flash (FA2) backends; the last column is the default on sm_90 (which of the two
Gluon columns :data:`gluon_bwd.DQ_HEAD_DIMS` picks) over cuDNN.  ``--variants`` adds other launch
configs of the Gluon passes, ``--configs dkdv:128x64x4,dq:64x64x8`` any others (BLOCK_M x
BLOCK_N x warps, or BLOCK_M x BLOCK_N x stages x ws for the warp-specialized dQ pass),
``--fused`` the one-pass backward (``gluon_bwd.FUSED_DQ``: dQ by atomics in the dK/dV pass, at
every head dim of ``FUSED_DKDV_CONFIGS``) and the default again.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_module as fm
from flash_module.kernels import gluon_bwd

SHAPES = ("128x1024x16x16x1,128x4096x16x16x0,128x4096x16x16x1,128x16384x16x16x0,128x16384x16x16x1,"
          "128x8192x32x8x1,64x4096x32x32x0,64x16384x32x32x1,256x1024x8x8x1,256x4096x8x8x0,256x16384x8x8x1")
#: (Gluon on, head dims whose dQ pass is Gluon too)
OURS = {"portable": (False, ()), "gluon-dkdv": (True, ()), "gluon": (True, gluon_bwd.HEAD_DIMS)}
#: extra columns: (name, dK/dV config, dQ config: None = the default for the head dim; a dQ
#: config also runs the Gluon dQ pass); (BLOCK_M, BLOCK_N, warps)
VARIANTS = [("dkdv 64x64w8", (64, 64, 8), None), ("dkdv 64x128w8", (64, 128, 8), None),
            ("dq 64x64w8", None, (64, 64, 8)), ("dq 128x64w8", None, (128, 64, 8))]

def _bwd_ms(out: torch.Tensor, inputs: tuple, dout: torch.Tensor) -> float:
    return triton.testing.do_bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))


def run_shape(d: int, n: int, h: int, h_kv: int, causal: bool, tokens: int, variants: list = (),
              fused: bool = False) -> dict:
    """TFLOP/s of each backward for one shape (``fused``: also the one-pass backward,
    ``gluon_bwd.FUSED_DQ``, at the head dims it takes)."""
    b = max(1, tokens // n)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, n, h_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
    res = {}
    default_dq = gluon_bwd.DQ_HEAD_DIMS
    for name, (enabled, dq_dims) in OURS.items():
        gluon_bwd.ENABLED, gluon_bwd.DQ_HEAD_DIMS = enabled, dq_dims
        res[name] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
    if variants:
        defaults = gluon_bwd.DKDV_CONFIGS, gluon_bwd.DQ_CONFIGS
        for name, dkdv_cfg, dq_cfg in variants:
            gluon_bwd.ENABLED, gluon_bwd.DQ_HEAD_DIMS = True, (d,) if dq_cfg else ()
            gluon_bwd.DKDV_CONFIGS = {**defaults[0], d: dkdv_cfg or defaults[0][d]}
            gluon_bwd.DQ_CONFIGS = {**defaults[1], d: dq_cfg or defaults[1][d]}
            try:
                res[name] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
            except Exception:  # noqa: BLE001 - a config this head dim cannot hold (shared memory)
                res[name] = math.nan
        gluon_bwd.DKDV_CONFIGS, gluon_bwd.DQ_CONFIGS = defaults
    gluon_bwd.ENABLED, gluon_bwd.DQ_HEAD_DIMS = True, default_dq
    if fused:  # every head dim with a one-pass config, then the default again
        default_fused = gluon_bwd.FUSED_DQ, gluon_bwd.FUSED_DQ_HEAD_DIMS
        every_dim = True, tuple(gluon_bwd.FUSED_DKDV_CONFIGS)
        for name, on in (("fused dQ", every_dim), ("gluon2", default_fused)):
            gluon_bwd.FUSED_DQ, gluon_bwd.FUSED_DQ_HEAD_DIMS = on
            res[name] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
    res["default"] = res["gluon" if d in default_dq else "gluon-dkdv"]
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                       enable_gqa=h != h_kv)
                res[name] = flops / _bwd_ms(out, (qt, kt, vt), dout.transpose(1, 2)) / 1e9
        except RuntimeError:
            res[name] = math.nan
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--variants", action="store_true", help="also other launch configs of the Gluon passes")
    ap.add_argument("--configs", default="", help="more configs as columns, e.g. dkdv:128x64x4,dq:64x64x8")
    ap.add_argument("--fused", action="store_true",
                    help="the one-pass backward (dQ by atomics, gluon_bwd.FUSED_DQ), then the default again")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    variants = list(VARIANTS) if args.variants else []
    for spec in filter(None, args.configs.split(",")):
        kind, cfg = spec.split(":")
        name = f"{kind} {cfg}"
        cfg = tuple(x if x == "ws" else int(x) for x in cfg.split("x"))
        variants.append((name, cfg if kind == "dkdv" else None, cfg if kind == "dq" else None))
    fused_cols = ["fused dQ", "gluon2"] if args.fused else []
    cols = [*OURS, *fused_cols, "cudnn", "flash"] + [v[0] for v in variants]
    print("   D      N   H Hkv causal | " + " ".join(f"{c:>10}" for c in cols) + " | default/cudnn")
    for shape in args.shapes.split(","):
        d, n, h, h_kv, causal = (int(x) for x in shape.split("x"))
        res = run_shape(d, n, h, h_kv, bool(causal), args.tokens, variants, args.fused)
        print(f"{d:4} {n:6} {h:3} {h_kv:3} {causal:6} | " + " ".join(f"{res[c]:10.1f}" for c in cols)
              + f" | {res['default'] / res['cudnn']:.2f}", flush=True)


if __name__ == "__main__":
    main()
