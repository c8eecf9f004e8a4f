"""Benchmark the softmax ops (online, tiling) against torch.softmax: GB/s over the last dim.

Usage:
    python benchmarks/bench_softmax.py                        # GPU: the default shapes, bf16 + fp32
    python benchmarks/bench_softmax.py --shapes 4096x32768 --dtypes bf16 --passes fwd,bwd --json out.json
    python benchmarks/bench_softmax.py --sweep                # also time candidate launch configs
    python benchmarks/bench_softmax.py --cudagraph            # time CUDA-graph replays (no launch overhead)

GB/s counts the minimum traffic: forward reads x once and writes y once (2 x size bytes);
backward reads y and dy and writes dx (3 x size).  Timing is triton.testing.do_bench's median
(L2 flushed between runs).  Every implementation's output is checked against torch.softmax in
float32/float64 first and its max error printed next to the time.

Without CUDA it runs tiny shapes on the CPU (perf_counter timing; the kernels run under the
Triton interpreter when TRITON_INTERPRET=1, else the PyTorch path): a smoke check only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import flash_module.softmax as fsm  # noqa: E402
from flash_module.kernels import softmax as ksm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
GPU_SHAPES = "4096x4096,4096x32768,256x262144,1x16777216"
CPU_SHAPES = "64x1000,4x4099"
IMPLS = ("online", "tiling", "torch", "inductor")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, n = item.lower().split("x")
        shapes.append((int(parse_int(rows)), int(parse_int(n))))
    return shapes


def parse_int(text: str) -> int:
    """'4096', '2**22' or '1<<22'."""
    text = text.strip()
    if "**" in text:
        base, exp = text.split("**")
        return int(base) ** int(exp)
    if "<<" in text:
        base, exp = text.split("<<")
        return int(base) << int(exp)
    return int(text)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def gpu_median_ms(fn: Callable[[], Any], cudagraph: bool, rep: int) -> float:
    import triton.testing as tt

    if cudagraph:
        params = inspect.signature(tt.do_bench_cudagraph).parameters
        res = tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") if "return_mode" in params \
            else tt.do_bench_cudagraph(fn, rep=rep, quantiles=[0.5])
    else:
        params = inspect.signature(tt.do_bench).parameters
        res = tt.do_bench(fn, warmup=25, rep=rep, return_mode="median") if "return_mode" in params \
            else tt.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5])
    return float(res[0] if isinstance(res, (list, tuple)) else res)


def cpu_median_ms(fn: Callable[[], Any], reps: int = 5, budget_s: float = 2.0) -> float:
    times, spent = [], 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
        if spent > budget_s:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def forward_fn(impl: str, x: torch.Tensor, num_splits: int | None = None,
               config: ksm.SoftmaxConfig | None = None) -> Callable[[], torch.Tensor]:
    interpret = x.device.type == "cpu"
    if config is not None or (impl == "tiling" and num_splits is not None):
        algo = "online" if impl == "online" else "tiling"
        return lambda: ksm.softmax_forward(x, algo, num_splits, interpret=interpret, config=config)
    if impl in fsm.ALGORITHMS:
        return lambda: fsm.softmax(x, -1, impl)
    if impl == "torch":
        return lambda: torch.softmax(x, -1)
    if impl == "inductor":
        compiled = torch.compile(lambda t: torch.softmax(t, -1), dynamic=False)
        return lambda: compiled(x)
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def backward_fn(impl: str, y: torch.Tensor, dy: torch.Tensor) -> Callable[[], torch.Tensor]:
    if impl in fsm.ALGORITHMS:  # one backward op for both algorithms
        return lambda: fsm.softmax_bwd(y, dy)
    if impl == "torch":
        return lambda: torch._softmax_backward_data(dy, y, -1, y.dtype)
    if impl == "inductor":
        compiled = torch.compile(lambda a, b: torch._softmax_backward_data(b, a, -1, a.dtype), dynamic=False)
        return lambda: compiled(y, dy)
    raise ValueError(f"unknown impl {impl!r}")


def _oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.to(ref.dtype) - ref).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def measure(fn: Callable[[], torch.Tensor], device: torch.device, args) -> float:
    if device.type == "cuda":
        return gpu_median_ms(fn, args.cudagraph, args.rep)
    return cpu_median_ms(fn)


def run(args) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for rows, n in parse_shapes(args.shapes):
            torch.manual_seed(0)
            x = (torch.randn(rows, n, device=device) * 4).to(dtype)
            size = x.numel() * x.element_size()
            ref = torch.softmax(x.to(_oracle_dtype(dtype)), -1)
            y = None
            for pass_ in args.passes.split(","):
                if pass_ == "bwd":
                    y = ref.to(dtype)
                    dy = torch.randn_like(y)
                    yo, dyo = y.to(ref.dtype), dy.to(ref.dtype)
                    ref_b = yo * (dyo - (yo * dyo).sum(-1, keepdim=True))
                for impl in args.impls.split(","):
                    rec = dict(dtype=dname, rows=rows, n=n, impl=impl, pass_=pass_, config="default")
                    try:
                        if pass_ == "fwd":
                            fn = forward_fn(impl, x)
                            rec["max_err"] = max_error(fn(), ref)
                            rec["bytes"] = 2 * size
                        else:
                            fn = backward_fn(impl, y, dy)
                            rec["max_err"] = max_error(fn(), ref_b)
                            rec["bytes"] = 3 * size
                        if impl == "tiling" and pass_ == "fwd":
                            rec["num_splits"] = ksm.auto_num_splits(rows, n, ksm.sm_count(device))
                        rec["ms"] = measure(fn, device, args)
                        rec["gbps"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9
                    except Exception as exc:  # report and go on (e.g. OOM, no inductor backend)
                        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    records.append(rec)
                    print_row(rec)
                if pass_ == "fwd" and args.sweep:
                    for rec in sweep(x, ref, device, args):
                        records.append(rec)
                        print_row(rec)
            del x, ref, y
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def sweep_configs(n: int, dtype: torch.dtype) -> list[ksm.SoftmaxConfig]:
    """Candidate launch configs of the online kernel for rows of n elements."""
    cands = []
    p2 = max(16, 1 << (n - 1).bit_length())
    if p2 <= 65536:
        for rows in (1, 2, 4, 8):
            if rows * p2 > 65536 or (rows > 1 and p2 > 8192):
                continue
            for warps in (4, 8, 16, 32):
                if rows * p2 >= 32 * warps * 2:
                    cands.append(ksm.SoftmaxConfig(p2, rows, warps, True))
    if n > 1024:
        for block in (1024, 2048, 4096, 8192, 16384):
            if block < p2:
                for warps in (4, 8, 16):
                    cands.append(ksm.SoftmaxConfig(block, 1, warps, False))
    return cands


def sweep(x: torch.Tensor, ref: torch.Tensor, device: torch.device, args) -> list[dict[str, Any]]:
    rows, n = x.shape
    dname = next(k for k, v in DTYPES.items() if v == x.dtype)
    out = []
    size = x.numel() * x.element_size()
    auto = ksm.auto_num_splits(rows, n, ksm.sm_count(device))
    trials = [("online", None, c) for c in sweep_configs(n, x.dtype)]
    splits = sorted({max(1, auto // 2), auto, auto * 2, auto * 4} | ({1} if rows > 1 else set()))
    for s in splits:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                trials.append(("tiling", s, ksm.SoftmaxConfig(block, 1, warps, False)))
    for impl, s, cfg in trials:
        rec = dict(dtype=dname, rows=rows, n=n, impl=impl, pass_="fwd", bytes=2 * size,
                   config=f"block={cfg.block} rows={cfg.rows} warps={cfg.num_warps} single={cfg.single}"
                   + (f" splits={s}" if s else ""))
        try:
            fn = forward_fn(impl, x, s, cfg)
            rec["max_err"] = max_error(fn(), ref)
            rec["ms"] = measure(fn, device, args)
            rec["gbps"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        out.append(rec)
    best = {}
    for r in out:
        if "gbps" in r and (r["impl"] not in best or r["gbps"] > best[r["impl"]]["gbps"]):
            best[r["impl"]] = r
    for r in best.values():
        r["best"] = True
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
               python=platform.python_version(), device_type=device.type,
               triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(device_name=platform.processor() or platform.machine())
    return env


HEADER = (f"{'dtype':5s} {'shape':>14s} {'pass':4s} {'impl':9s} {'ms':>9s} {'GB/s':>8s} {'max err':>9s}"
          "  config")


def print_row(r: dict[str, Any]) -> None:
    shape = f"{r['rows']}x{r['n']}"
    if "error" in r:
        print(f"{r['dtype']:5s} {shape:>14s} {r['pass_']:4s} {r['impl']:9s} {'n/a':>9s} {'n/a':>8s} "
              f"{'':9s}  {r['error']}", flush=True)
        return
    cfg = r["config"] + (f" (splits={r['num_splits']})" if "num_splits" in r else "")
    cfg += "  <- best" if r.get("best") else ""
    print(f"{r['dtype']:5s} {shape:>14s} {r['pass_']:4s} {r['impl']:9s} {r['ms']:9.4f} {r['gbps']:8.1f} "
          f"{r['max_err']:9.2e}  {cfg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--shapes", default=None,
                   help=f"ROWSxN list (N may be 2**22); default {GPU_SHAPES} on GPU, {CPU_SHAPES} on CPU")
    p.add_argument("--dtypes", default=None, help="from bf16,fp16,fp32,fp64; default bf16,fp32 (CPU: fp32)")
    p.add_argument("--impls", default="online,tiling,torch", help=f"from {','.join(IMPLS)}")
    p.add_argument("--passes", default="fwd", help="fwd and/or bwd")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--cudagraph", action="store_true", help="time CUDA-graph replays (do_bench_cudagraph)")
    p.add_argument("--sweep", action="store_true", help="also time candidate configs of our kernels")
    p.add_argument("--json", default=None, metavar="PATH", help="write environment + records as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.shapes = args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    args.dtypes = args.dtypes or ("bf16,fp32" if gpu else "fp32")
    if not gpu and args.sweep:
        args.sweep = False
        print("(--sweep needs a GPU; ignored)")
    env = environment(device)
    if gpu:
        sm = f"sm_{env['capability'].replace('.', '')}"
        print(f"softmax bench | {env['device_name']} ({env['sm_count']} SMs, {sm})"
              f" | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}"
              f" | timing: {'do_bench_cudagraph' if args.cudagraph else 'do_bench'} median")
    else:
        print(f"softmax bench | CPU {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
              f"TRITON_INTERPRET={env['triton_interpret']}\nCPU RUN: tiny shapes, perf_counter timing -- "
              "a smoke check, the numbers mean nothing.")
    print("GB/s = (fwd: 2, bwd: 3) x tensor bytes / median time")
    print(HEADER)
    records = run(args)
    if args.json:
        payload = dict(environment=env, args=vars(args), records=records)
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("error" in r and r["impl"] != "inductor" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
