"""Decode tuning: the split-KV cache kernel under launch configs and split counts.

Usage: PYTHONPATH=$PWD python benchmarks/tune_decode.py [--shapes 1x65536,64x2048] [--page 0]
       [--page-order random|sorted|local]
       [--configs N128_w4_s3,N64_w4_s4] [--splits 0,16,32,64]

For each (B, Nk) (GQA 32/8, D=128, bf16, one query token) and each config x split count, prints
the K+V bytes read per second of ``ops.kvcache_fwd`` timed three ways: ``call`` (do_bench, the
Python call included), ``graph`` (CUDA-graph replay: the GPU time alone) and the per-kernel
split of the default config (profiler: partial kernel vs combine kernel), next to a copy of
the same bytes.  A tuning aid, not a test: the defaults live in ``flash_module/configs.py``.
"""

from __future__ import annotations

import argparse

import torch
import triton

from benchmarks.kernel_times import profile_ms
from flash_module import ops
from flash_module.configs import KernelConfig, override


def _cfg(name: str) -> KernelConfig:
    parts = dict((p[0], int(p[1:])) for p in name.split("_"))
    return KernelConfig(16, parts["N"], parts.get("w", 4), parts.get("s", 2))


def page_table(b: int, per: int, order: str, page_bytes: int, dev: str) -> torch.Tensor:
    """(b, per) int32 block table over ``b * per`` pages: ``random`` (a permutation of the whole
    pool, the worst case for locality), ``sorted`` (page j of sequence b at b * per + j, as a
    fresh allocator hands them out) or ``local`` (shuffled only within 2 MiB groups of pages:
    scattered at the granularity of DRAM rows but not of the GPU's large pages)."""
    n = b * per
    if order == "sorted":
        flat = torch.arange(n, device=dev)
    elif order == "local":
        group = max(1, (2 << 20) // page_bytes)
        flat = torch.cat([s + torch.randperm(min(group, n - s), device=dev) for s in range(0, n, group)])
    else:
        flat = torch.randperm(n, device=dev)
    return flat.view(b, per).to(torch.int32)


def tune_shape(b: int, nk: int, page: int, configs: list[str | None], splits: list[int],
               order: str = "random") -> None:
    """Print one line per (config, split count) for one decode shape."""
    dev, dt, h, h_kv, d = "cuda", torch.bfloat16, 32, 8, 128
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    k = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    lens = torch.full((b,), nk, dtype=torch.int32, device=dev)
    table = None
    if page:  # sequence b's page j lives at table[b, j]
        per = nk // page
        table = page_table(b, per, order, page * h_kv * d * k.element_size(), dev)
        inverse = torch.argsort(table.flatten().long())
        k, v = (t.view(b * per, page, h_kv, d)[inverse] for t in (k, v))
    nbytes = 2 * k.numel() * k.element_size()
    flat = torch.cat([k.flatten(), v.flatten()])
    dst = torch.empty_like(flat)
    copy = triton.testing.do_bench_cudagraph(lambda: dst.copy_(flat))
    layout = f"page {page}, {order}" if page else "contiguous"
    print(f"\nB={b} Nk={nk} ({layout}): copy {2 * nbytes / copy / 1e9:.2f} TB/s (read+write)")
    ref = None
    for cname in configs:
        for n in splits:
            def fn(n=n):
                return ops.kvcache_fwd(q, k, v, lens, None, table, d**-0.5, False, n, "triton")[0]

            with override(split_kv=_cfg(cname)) if cname else override():
                try:
                    out = fn().float()
                    ref = out if ref is None else ref
                    err = (out - ref).abs().max().item()
                    call = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    graph = triton.testing.do_bench_cudagraph(fn)
                    kt = profile_ms(fn, 20, warmup=1) if cname is None and n == 0 else {}
                except Exception as e:  # noqa: BLE001 - a config that does not fit
                    print(f"  {cname or 'default':14} splits={n:4}: {type(e).__name__} {str(e)[:80]}")
                    continue
            ks = "  ".join(f"{name[:40]}: {t * 1e3:.1f}us" for name, t in kt.items())
            print(f"  {cname or 'default':14} splits={n:4}: call {nbytes / call / 1e9:5.2f}  graph "
                  f"{nbytes / graph / 1e9:5.2f} TB/s  err {err:.1e}  {ks}", flush=True)


def _host_us(fn, calls: int) -> float:
    """Host time of one call of ``fn`` in us: ``calls`` calls after a warm-up, the GPU drained
    before and after (so its queue never throttles the host)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return dt * 1e6


def host_overhead(b: int = 1, nk: int = 65536, calls: int = 200, profile: bool = False) -> None:
    """Host time per call (us) of each decode entry point: the Python work that must stay below
    the kernel time, or the GPU waits for the CPU.  With ``profile``, where that time goes
    (cProfile, the functions with the most time of their own)."""
    import cProfile
    import pstats

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_module as fm
    from flash_module.kernels.split_kv import split_kv_cache_forward

    dev, dt, h, h_kv, d = "cuda", torch.bfloat16, 32, 8, 128
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    k = torch.randn(b, nk, h_kv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    lens = torch.full((b,), nk, dtype=torch.int32, device=dev)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    k1, v1 = (torch.randn(b, 1, h_kv, d, device=dev, dtype=dt) for _ in range(2))
    kc, vc = k.clone(), v.clone()
    fns = {
        "flash_attn_with_kvcache": lambda: fm.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens),
        "  with k, v appended": lambda: fm.flash_attn_with_kvcache(q, kc, vc, k1, v1, cache_seqlens=lens - 1),
        "flash_attn_func (routed)": lambda: fm.flash_attn_func(q, k, v),
        "ops.kvcache_fwd": lambda: ops.kvcache_fwd(q, k, v, lens, None, None, d**-0.5, False, 0, "triton"),
        "split_kv_cache_forward": lambda: split_kv_cache_forward(q, k, v, lens, None, None, d**-0.5, False),
        "sdpa cudnn": sdpa,
    }
    print(f"\nhost time per call, B={b} Nk={nk} (the GPU time of one call: see the TB/s above)")
    for name, fn in fns.items():
        print(f"  {name:26} {_host_us(fn, calls):7.1f} us", flush=True)
    launch_floor(q, k, v, lens, calls)
    if profile:
        for name in ("flash_attn_with_kvcache", "flash_attn_func (routed)"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fns[name]()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n{name}: {calls} calls, top functions by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def launch_floor(q, k, v, lens, calls: int) -> None:
    """Host time of one launch of the split-KV kernel three ways: ``kernel[grid](...)`` (Triton's
    ``JITFunction.run``: argument binding, specialisation, cache key, launch), the binding alone,
    and the compiled kernel's C launcher alone (the floor any launch path pays).  Triton 3.x
    internals; prints why when they differ."""

    from flash_module.kernels import split_kv as sk

    jit = sk._split_kv_fwd_kernel
    seen = {}
    run = jit.run

    def spy(*args, grid, warmup, **kwargs):
        seen.setdefault("call", (args, grid, kwargs))
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    jit.run = spy
    try:
        sk.split_kv_cache_forward(q, k, v, lens, None, None, q.shape[-1] ** -0.5, False)
    finally:
        jit.run = run
    args, grid, kwargs = seen["call"]
    torch.cuda.synchronize()

    def per_call(fn) -> float:
        return _host_us(fn, calls)

    print(f"\none launch of {jit.__name__} ({len(args) + len(kwargs)} arguments), host us per call")
    print(f"  kernel[grid](...)          {per_call(lambda: jit[grid](*args, **kwargs)):7.1f}")
    try:
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.jit import compute_cache_key

        dev = driver.active.get_current_device()
        kernel_cache, key_cache, _target, _backend, binder = jit.device_caches[dev]
        kwargs = dict(kwargs, debug=bool(jit.debug or knobs.runtime.debug),
                      instrumentation_mode=knobs.compilation.instrumentation_mode)  # as run() adds them
        bound, spec, opts = binder(*args, **dict(kwargs))
        compiled = kernel_cache[compute_cache_key(key_cache, spec, opts)]
        vals = tuple(bound.values())
        stream = driver.active.get_current_stream(dev)
        g = tuple(grid) + (1,) * (3 - len(grid))
        fn_, meta = compiled.function, compiled.packed_metadata
        steps = {
            "binder only": lambda: binder(*args, **dict(kwargs)),
            "cache key only": lambda: compute_cache_key(key_cache, spec, opts),
            "C launcher only": lambda: compiled.run(*g, stream, fn_, meta, None, None, None, *vals),
            "get_current_stream": lambda: driver.active.get_current_stream(dev),
        }
        for name, fn in steps.items():
            print(f"  {name:26} {per_call(fn):7.1f}")
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            jit[grid](*args, **seen["call"][2])
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    except Exception as e:  # noqa: BLE001 - internals of another Triton version
        print(f"  (internals differ: {type(e).__name__}: {str(e)[:120]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x65536,8x16384,32x8192,64x2048")
    ap.add_argument("--page", type=int, default=0, help="page size (0: contiguous cache)")
    ap.add_argument("--page-order", default="random", help="random | sorted | local (see page_table)")
    ap.add_argument("--configs", default="", help="besides the default, e.g. N128_w4_s3,N64_w4_s4")
    ap.add_argument("--splits", default="0", help="num_splits values (0 = automatic)")
    ap.add_argument("--overhead", action="store_true", help="also the host time per call")
    ap.add_argument("--profile", action="store_true", help="with --overhead: where the host time goes")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    configs = [None] + [c for c in args.configs.split(",") if c]  # the default first
    for shape in args.shapes.split(","):
        b, nk = (int(x) for x in shape.split("x"))
        tune_shape(b, nk, args.page, configs, [int(s) for s in args.splits.split(",")], args.page_order)
    if args.overhead:
        host_overhead(profile=args.profile)


if __name__ == "__main__":
    main()
