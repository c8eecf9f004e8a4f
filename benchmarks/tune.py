"""Sweep launch configs of the FA2 kernels on the GPU; print the best per (pass, D, causal).

Usage (on a CUDA machine):  python benchmarks/tune.py --out tune.jsonl [--seqlen 4096] [--budget 400]

The candidates are ``flash_module.configs.TUNING_SPACE``. Each one is compiled, checked against
the current table config's output (a config that computes garbage is reported, not chosen) and
timed with triton.testing.do_bench (median).
Results go to the JSONL file as they come, so a run cut short still leaves data.  The chosen
configs are copied by hand into flash_module/configs.py (with the numbers in docs/).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import time

import torch
import triton

from flash_module import configs
from flash_module.kernels.fa2_bwd import fa2_backward
from flash_module.kernels.fa2_fwd import fa2_forward

FWD, DKDV, DQ = (configs.TUNING_SPACE[k] for k in ("fwd", "dkdv", "dq"))


LOCK: str | None = None


def bench(fn) -> float:
    """Median time in ms; with --lock, timing is exclusive across tuning processes (compiles are not)."""
    if LOCK is None:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune.jsonl")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--passes", default="fwd,bwd", help="among fwd, bwd (= dkdv and dq), dkdv, dq")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; stop starting new work after")
    ap.add_argument("--lock", default=None, help="file lock shared by parallel tuning processes")
    ap.add_argument("--configs", default=None, help="only these candidates, e.g. M64_N32_w8_s2,M32_N32_w8_s2")
    args = ap.parse_args()
    global LOCK
    LOCK = args.lock
    t0 = time.time()
    n = args.seqlen
    b = max(1, args.tokens // n)
    dt = torch.bfloat16
    log = open(args.out, "a")
    summary = []
    for d in [int(x) for x in args.dims.split(",")]:
        h = 2048 // d
        q = torch.randn(b, n, h, d, device="cuda", dtype=dt)
        k = torch.randn(b, n, h, d, device="cuda", dtype=dt)
        v = torch.randn(b, n, h, d, device="cuda", dtype=dt)
        dout = torch.randn_like(q)
        scale = d**-0.5
        for causal in (False, True):
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            out_ref, lse_ref = fa2_forward(q, k, v, scale, causal, 0)
            grads_ref = fa2_backward(dout, q, k, v, out_ref, lse_ref, None, scale, causal, 0)
            jobs = []
            if "fwd" in args.passes:
                jobs += [("fwd", c) for c in FWD[d]]
            if "bwd" in args.passes or "dkdv" in args.passes:
                jobs += [("dkdv", c) for c in DKDV[d]]
            if "bwd" in args.passes or "dq" in args.passes:
                jobs += [("dq", c) for c in DQ[d]]
            if args.configs:
                wanted = set(args.configs.split(","))
                jobs = [(kind, c) for kind, c in jobs if str(c) in wanted]
            best: dict[str, tuple[float, configs.KernelConfig]] = {}
            for kind, cfg in jobs:
                if time.time() - t0 > args.budget:
                    break
                rec = dict(kind=kind, d=d, causal=causal, n=n, b=b, h=h, cfg=str(cfg))
                try:
                    if kind == "fwd":
                        fn = lambda: fa2_forward(q, k, v, scale, causal, 0, config=cfg)  # noqa: B023
                        out, _ = fn()
                        err = (out.float() - out_ref.float()).abs().max().item()
                        ms = bench(fn)
                        rec["tflops"] = flops / ms / 1e9
                    else:
                        # Time the whole backward with one kernel's config swapped in.
                        other = configs.bwd_configs(dt, d, q.device)
                        pair = (cfg, other[1]) if kind == "dkdv" else (other[0], cfg)
                        fn = lambda: fa2_backward(dout, q, k, v, out_ref, lse_ref, None, scale,  # noqa: B023
                                                  causal, 0, configs=pair)  # noqa: B023
                        g = fn()
                        err = max((a.float() - r.float()).abs().max().item() for a, r in zip(g, grads_ref))
                        ms = bench(fn)
                        rec["tflops_bwd_total"] = 2.5 * flops / ms / 1e9
                    rec.update(ms=ms, err=err, ok=bool(math.isfinite(err) and err < 5e-2))
                    if rec["ok"] and (kind not in best or ms < best[kind][0]):
                        best[kind] = (ms, cfg)
                except Exception as e:  # out of resources, compile failures
                    rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(json.dumps(rec), flush=True)
            for kind, (ms, cfg) in best.items():
                line = f"BEST {kind:5s} d={d:3d} causal={int(causal)}: {cfg}  {ms:.3f} ms"
                summary.append(line)
        q = k = v = dout = None  # free this head dim's inputs before the next
        torch.cuda.empty_cache()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
