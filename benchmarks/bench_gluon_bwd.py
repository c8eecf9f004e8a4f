"""The Hopper backward (issue #15): the Gluon passes against the portable Triton ones and the peers.

    PYTHONPATH=$PWD python benchmarks/bench_gluon_bwd.py [--shapes 128x4096x16x16x1,...]

For each shape (D x N x H x H_kv x causal, B = 64k tokens / N, bf16) prints the backward's
TFLOP/s (2.5 x the forward's 4 * B * H * N^2 * D, halved when causal; ``torch.autograd.grad``
timed with ``triton.testing.do_bench``, median) of: ``portable`` (both passes in portable
Triton), ``gluon-dkdv`` (the Gluon dK/dV pass and the portable dQ), ``gluon`` (both in Gluon),
these three two passes; ``default``, what a call runs on sm_90 (the one-pass backward at D=64,
:data:`gluon_bwd.FUSED_DQ`; else the Gluon column :data:`gluon_bwd.DQ_HEAD_DIMS` picks); SDPA's
cuDNN and flash (FA2) backends; the last column is the default over cuDNN.  ``--variants`` adds
other launch configs of the Gluon passes, ``--configs dkdv:128x64x4,dq:64x64x8`` any others (BLOCK_M x
BLOCK_N x warps, or BLOCK_M x BLOCK_N x stages x ws for the warp-specialized dQ pass),
``--fused`` the one-pass backward (``gluon_bwd.FUSED_DQ``: dQ added into an fp32 buffer by the
dK/dV pass, at every head dim of ``FUSED_DKDV_CONFIGS``; by TMA reductions and by atomics) and
the default again, ``--fused-configs 64:64x128x8`` other one-pass configs (TMA adds).
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
              fused: list = ()) -> dict:
    """TFLOP/s of each backward for one shape (``fused``: also the one-pass backward,
    ``gluon_bwd.FUSED_DQ``, as columns (name, TMA adds or atomics, {head dim: dK/dV config}
    overriding ``FUSED_DKDV_CONFIGS``), then the default again as ``gluon2``)."""
    b = max(1, tokens // n)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, n, h_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
    res = {}
    default_dq, default_fused = gluon_bwd.DQ_HEAD_DIMS, gluon_bwd.FUSED_DQ
    res["default"] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
    gluon_bwd.FUSED_DQ = False  # the columns below: two passes
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
    gluon_bwd.ENABLED, gluon_bwd.DQ_HEAD_DIMS, gluon_bwd.FUSED_DQ = True, default_dq, default_fused
    if fused:  # at every head dim with a one-pass config, then the default again
        default_fused = (gluon_bwd.FUSED_DQ, gluon_bwd.FUSED_DQ_HEAD_DIMS, gluon_bwd.FUSED_DQ_TMA,
                         gluon_bwd.FUSED_DKDV_CONFIGS)
        for name, tma, cfgs in fused:
            configs = {**default_fused[3], **cfgs}
            gluon_bwd.FUSED_DQ, gluon_bwd.FUSED_DQ_HEAD_DIMS = True, tuple(configs)
            gluon_bwd.FUSED_DQ_TMA, gluon_bwd.FUSED_DKDV_CONFIGS = tma and gluon_bwd.HAVE_TMA_ADD, configs
            try:
                res[name] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
            except Exception:  # noqa: BLE001 - a config this head dim cannot hold (shared memory)
                res[name] = math.nan
        (gluon_bwd.FUSED_DQ, gluon_bwd.FUSED_DQ_HEAD_DIMS, gluon_bwd.FUSED_DQ_TMA,
         gluon_bwd.FUSED_DKDV_CONFIGS) = default_fused
        res["gluon2"] = flops / _bwd_ms(fm.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout) / 1e9
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
    ap.add_argument("--configs", default="",
                    help="more configs as columns, e.g. dkdv:128x64x4,dq:64x64x8")
    ap.add_argument("--fused", action="store_true",
                    help="the one-pass backward (gluon_bwd.FUSED_DQ), dQ added by TMA and by atomics, then "
                         "the default again")
    ap.add_argument("--fused-configs", default="",
                    help="more one-pass columns (TMA adds), e.g. 64:64x128x8,128:64x64x4")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    variants = list(VARIANTS) if args.variants else []
    for spec in filter(None, args.configs.split(",")):
        kind, cfg = spec.split(":")
        name = f"{kind} {cfg}"
        cfg = tuple(x if x == "ws" else int(x) for x in cfg.split("x"))
        variants.append((name, cfg if kind == "dkdv" else None, cfg if kind == "dq" else None))
    fused = [("fused tma", True, {}), ("fused red", False, {})] if args.fused else []
    for spec in filter(None, args.fused_configs.split(",")):
        dim, cfg = spec.split(":")
        cfg_t = tuple(int(x) for x in cfg.split("x"))
        fused.append((f"tma {cfg}", True, {int(dim): cfg_t}))
    fused_cols = [c[0] for c in fused] + (["gluon2"] if fused else [])
    cols = [*OURS, "default", *fused_cols, "cudnn", "flash"] + [v[0] for v in variants]
    print("   D      N   H Hkv causal | " + " ".join(f"{c:>10}" for c in cols) + " | default/cudnn")
    for shape in args.shapes.split(","):
        d, n, h, h_kv, causal = (int(x) for x in shape.split("x"))
        res = run_shape(d, n, h, h_kv, bool(causal), args.tokens, variants, fused)
        print(f"{d:4} {n:6} {h:3} {h_kv:3} {causal:6} | " + " ".join(f"{res[c]:10.1f}" for c in cols)
              + f" | {res['default'] / res['cudnn']:.2f}", flush=True)


if __name__ == "__main__":
    main()
