"""Registers and spills of the attention kernels on sm_90a, without a GPU.

Compiles a kernel for Hopper with Triton (``triton.compile`` with a ``GPUTarget``, which needs no
driver) and reads the cubin's resource usage with the ``cuobjdump`` that ships with Triton: registers per
thread, the per-thread stack (where spilled registers go) and the shared memory.  A config that
spills is almost always slow on the H200, so this prunes the tuning space before device time is
spent on it.

    python benchmarks/regs.py --kernel dkdv -d 256 --configs 64x64w8s2,32x128w8s2,64x32w4s2
    python benchmarks/regs.py --kernel fwd -d 128 --causal

Numbers come from the locally installed Triton, which may differ from the device's version;
treat them as a guide, then time the survivors with ``benchmarks/tune.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_module.configs import KernelConfig  # noqa: E402
from flash_module.kernels import _common, fa2_bwd, fa2_fwd  # noqa: E402

KERNELS = {
    "fwd": fa2_fwd._fa2_fwd_kernel,
    "dkdv": fa2_bwd._bwd_dkdv_kernel,
    "dq": fa2_bwd._bwd_dq_kernel,
}
_INT_NAMES = {"H", "H_KV", "GROUP", "Sq", "Sk", "causal_offset", "stats_len", "win_l", "win_r", "drop_thresh"}
_FP32_POINTERS = {"Lse", "Lse2", "Delta", "DLse", "Stats", "Sink", "Alibi"}
_FP32_NAMES = {"cap2", "cap2_lo"}


def parse_config(text: str) -> KernelConfig:
    """``64x128w8s2`` -> KernelConfig(64, 128, 8, 2)."""
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"config {text!r} is not of the form 64x128w8s2")
    return KernelConfig(*(int(g) for g in m.groups()))


def _signature(fn, constexprs: dict, elem: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_NAMES or name.startswith("stride_"):
            sig[name] = "i32"
            if name.startswith("stride_") or name == "stats_len":
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "scale" in name or name in _FP32_NAMES:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name in _FP32_POINTERS else ("*i64" if name == "Rng" else f"*{elem}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_report(kernel: str, head_dim: int, cfg: KernelConfig, causal: bool, elem: str = "bf16",
                 dropout: bool = False) -> dict:
    """Compile one kernel for sm_90a; return registers, spill bytes, shared memory per program and
    the layout conversions / barriers in its IR (what moving a tile between layouts costs)."""
    fn = KERNELS[kernel]
    bd = _common.block_d(head_dim)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal,
        EVEN_D=head_dim == bd, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32", UPCAST=False,
        ROUND_BF16=False, EXACT=False, DROPOUT=dropout, SOFTCAP=False, ALIBI=False, WINDOW=False, SINK=False,
        MASK=0,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig, attrs = _signature(fn, constexprs, elem)
    src = ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(cuobjdump), "-res-usage", cubin], capture_output=True, text=True,
                              check=True).stdout
    # "REG:255 STACK:920 SHARED:1024 LOCAL:0 ...": STACK is the per-thread spill area.
    usage = dict(re.findall(r"([A-Z]+):(\d+)", text.split("Function", 1)[-1]))
    return dict(
        kernel=kernel, D=head_dim, causal=causal, config=str(cfg),
        registers=int(usage.get("REG", 0)),
        stack=int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0)),
        shared=compiled.metadata.shared,
        ptx_lines=compiled.asm["ptx"].count("\n"),
        converts=compiled.asm["ttgir"].count("ttg.convert_layout"),
        barriers=compiled.asm["ptx"].count("bar.sync") + compiled.asm["ptx"].count("barrier.sync"),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    p.add_argument("-d", "--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--dropout", action="store_true", help="compile the DROPOUT=True variant")
    p.add_argument("--configs", type=lambda s: [parse_config(c) for c in s.split(",")], required=True)
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90a, {args.kernel} D={args.head_dim} causal={args.causal}")
    print(f"{'config':<16} {'regs':>5} {'stack B':>8} {'smem KiB':>9} {'converts':>8} {'barriers':>8}")
    for cfg in args.configs:
        try:
            r = ptxas_report(args.kernel, args.head_dim, cfg, args.causal, args.dtype, args.dropout)
        except Exception as exc:  # noqa: BLE001 - report and go on, like the benchmark does
            print(f"{str(cfg):<16} error: {str(exc).splitlines()[0][:100]}")
            continue
        print(f"{r['config']:<16} {r['registers']:>5} {r['stack']:>8} {r['shared'] / 1024:>9.1f}"
              f" {r['converts']:>8} {r['barriers']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
