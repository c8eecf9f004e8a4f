"""Attention benchmark: flash_module against PyTorch's attention kernels.

Run it from the repository root as ``python benchmarks/bench.py`` (``--help`` lists the options);
``python -m flash_module.bench`` runs the same CLI from a source checkout.  The pytest-benchmark suite
(``benchmarks/test_speed.py``) imports the runners from here as ``benchmarks.bench``.

On a CUDA GPU it compares, in one run and on the same random inputs:

* ``ours``      -- ``flash_module.flash_attn_func`` on (B, S, H, D) tensors (``mode="fa2"``),
* ``flash``     -- ``torch.nn.functional.scaled_dot_product_attention`` with the flash backend (FA2),
* ``cudnn``     -- SDPA with the cuDNN backend,
* ``efficient`` -- SDPA with the memory-efficient backend,
* ``flex``      -- FlexAttention compiled with ``torch.compile`` (causal through a block mask),

and optionally ``ours_<mode>`` for each other mode of ``flash_module.ops.MODES`` (``ours_fa1``,
``ours_tiling``), ``ours_torch`` (our PyTorch path), ``ours_sdpa``
(``flash_module.scaled_dot_product_attention`` on (B, H, S, D)), ``math`` (SDPA math backend) and ``sdpa``
(SDPA with PyTorch's own backend choice). Peers get contiguous (B, H, S, D) inputs, their native layout;
``ours``, ``ours_<mode>`` and ``ours_torch`` get contiguous (B, S, H, D) inputs.

Timing uses ``triton.testing.do_bench`` (median, L2 flushed between runs). The forward pass is timed under
``torch.no_grad()``; the backward pass builds the graph once and times only
``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``.

FLOPs: forward = 4 * B * H * Sq * Sk * D (halved when causal), backward = 2.5 x forward.

``--seqlen-k`` sets a key length different from the query length.  Causal masking with Sq != Sk is
aligned top-left for every implementation (SDPA's ``is_causal`` semantics: query i sees keys j <= i);
``ours`` then goes through ``flash_module.scaled_dot_product_attention`` on (B, S, H, D) storage, and
the FLOPs count exactly the visible (query, key) pairs.

Without CUDA it runs small float32 shapes on the CPU: ``ours`` is then the PyTorch path
(``impl="torch"``), next to torch SDPA on CPU (``sdpa``, what a CPU user would call, and its ``math``
backend), timed with ``time.perf_counter`` (fastest of up to 30 calls after three warm-ups).  Those
numbers say nothing about GPU speed.

An implementation that is unavailable or raises for a shape is reported as ``n/a`` (the reason is printed once
at the end); it never stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__":  # ``python benchmarks/bench.py`` from a checkout without ``pip install -e .``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_module.ops import MODES  # noqa: E402

__all__ = [
    "ALL_IMPLS",
    "OURS_IMPLS",
    "BenchConfig",
    "Shape",
    "attention_flops",
    "collect_environment",
    "format_header",
    "format_table",
    "main",
    "make_inputs",
    "make_runner",
    "resolve_config",
    "run_benchmark",
]

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Our implementations on (B, S, H, D) inputs -> what they run: ``ours`` is the default mode (fa2), each other
#: library mode is ``ours_<mode>``, and ``ours_torch`` is the PyTorch path (see :func:`_ours_kwargs`).
OURS_IMPLS: dict[str, str] = {
    **{("ours" if mode == "fa2" else f"ours_{mode}"): mode for mode in MODES if mode != "reference"},
    "ours_torch": "torch",
}
ALL_IMPLS: tuple[str, ...] = (*OURS_IMPLS, "ours_sdpa", "flash", "cudnn", "efficient", "flex", "math", "sdpa")
GPU_DEFAULT_IMPLS: tuple[str, ...] = ("ours", "flash", "cudnn", "efficient", "flex")
CPU_DEFAULT_IMPLS: tuple[str, ...] = ("ours", "sdpa", "math")
PASSES: tuple[str, ...] = ("fwd", "bwd")
BWD_FLOP_FACTOR = 2.5
RATIO_PEERS: tuple[str, ...] = ("flash", "cudnn", "sdpa")  # "sdpa": the CPU peer

# Device-dependent defaults (used when the config leaves a field as None).
GPU_DEFAULTS: dict[str, Any] = {
    "head_dims": (64, 128),
    "seqlens": (1024, 4096, 16384),
    "tokens": 65536,
    "dtypes": ("bf16",),
    "impls": GPU_DEFAULT_IMPLS,
}
CPU_DEFAULTS: dict[str, Any] = {
    "head_dims": (64,),
    "seqlens": (512, 1024),
    "batch": 1,
    "heads": 8,
    "dtypes": ("fp32",),
    "impls": CPU_DEFAULT_IMPLS,
}
HIDDEN = 2048  # H = HIDDEN // D unless heads is given


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to benchmark. Fields left as ``None`` take device-dependent defaults (see :func:`resolve_config`).

    Attributes:
        head_dims: head dimensions D.
        seqlens: sequence lengths N (the query length; also the key length unless ``seqlen_k`` is set).
        seqlen_k: key/value length for every shape (default: N).
        tokens: B * N; the batch is ``tokens // N`` unless ``batch`` is given.
        batch: fixed batch size (overrides ``tokens``).
        heads: number of query heads H (default ``2048 // D`` on GPU, 4 on CPU).
        kv_heads: number of key/value heads for GQA (default: H).
        causal: which masking modes to run.
        dtypes: dtype names among ``bf16``, ``fp16``, ``fp32``.
        passes: ``fwd`` and/or ``bwd``.
        impls: implementation names (see :data:`ALL_IMPLS`).
        device: ``cuda``, ``cpu`` or ``None`` (CUDA when available).
        warmup: GPU warm-up time in ms (``do_bench``'s ``warmup``).
        rep: GPU measuring time in ms (``do_bench``'s ``rep``).
        cpu_reps: timed calls per measurement on CPU (after three warm-up calls), fewer only when
            ``cpu_budget_s`` runs out first (at least three are timed).
        cpu_budget_s: time budget of one CPU measurement in seconds.
        seed: seed of the random inputs.
        progress: show progress on stderr (a rich progress bar on a terminal, else one line per step).
    """

    head_dims: tuple[int, ...] | None = None
    seqlens: tuple[int, ...] | None = None
    seqlen_k: int | None = None
    tokens: int | None = None
    batch: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    causal: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] | None = None
    passes: tuple[str, ...] = PASSES
    impls: tuple[str, ...] | None = None
    device: str | None = None
    warmup: int = 25
    rep: int = 100
    cpu_reps: int = 30
    cpu_budget_s: float = 2.0
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem: (B, H, N, D) attention, with ``kv_heads`` key/value heads."""

    dtype: str
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    kv_heads: int
    causal: bool
    seqlen_k: int | None = None  # None: same as seqlen

    @property
    def kv_len(self) -> int:
        return self.seqlen if self.seqlen_k is None else self.seqlen_k

    def label(self) -> str:
        """A short human-readable description."""
        heads = f"{self.heads}" if self.kv_heads == self.heads else f"{self.heads}/{self.kv_heads}"
        return (
            f"{self.dtype} D={self.head_dim} N={_fmt_n(self.seqlen, self.kv_len)} B={self.batch} H={heads} "
            f"causal={'yes' if self.causal else 'no'}"
        )


def _fmt_n(n: int, n_k: int) -> str:
    return str(n) if n == n_k else f"{n}x{n_k}"


def resolve_config(config: BenchConfig) -> BenchConfig:
    """Return a copy of ``config`` with the device and every device-dependent default filled in."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    values: dict[str, Any] = {"device": device}
    for name, default in defaults.items():
        if getattr(config, name) is None:
            values[name] = default
    cfg = replace(config, **values)
    unknown = [i for i in cfg.impls or () if i not in ALL_IMPLS]
    if unknown:
        raise ValueError(f"unknown impls {unknown}; choose from {list(ALL_IMPLS)}")
    bad_dtypes = [d for d in cfg.dtypes or () if d not in DTYPES]
    if bad_dtypes:
        raise ValueError(f"unknown dtypes {bad_dtypes}; choose from {list(DTYPES)}")
    bad_passes = [p for p in cfg.passes if p not in PASSES]
    if bad_passes:
        raise ValueError(f"unknown passes {bad_passes}; choose from {list(PASSES)}")
    return cfg


def iter_shapes(cfg: BenchConfig) -> Iterator[tuple[str, int, int, int, int, int]]:
    """Yield (dtype, D, N, B, H, H_kv) for a resolved config (causal is looped over separately)."""
    assert cfg.dtypes is not None and cfg.head_dims is not None and cfg.seqlens is not None
    for dtype in cfg.dtypes:
        for d in cfg.head_dims:
            for n in cfg.seqlens:
                b = cfg.batch if cfg.batch is not None else max(1, (cfg.tokens or n) // n)
                h = cfg.heads if cfg.heads is not None else max(1, HIDDEN // d)
                hkv = cfg.kv_heads if cfg.kv_heads is not None else h
                if hkv <= 0 or h % hkv != 0:
                    raise ValueError(f"heads={h} is not a multiple of kv_heads={hkv}")
                yield dtype, d, n, b, h, hkv


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool, pass_: str = "fwd"
) -> float:
    """FLOPs of one attention call: fwd = 4*B*H*Sq*Sk*D (two matmuls), halved if causal; bwd = 2.5 x fwd.

    ``heads`` is the number of query heads (GQA does not change the count). Halving for causal is the usual
    convention (exact for Sq == Sk up to the diagonal); with Sq != Sk the causal count is exact for the
    top-left alignment the benchmark uses (query i sees keys 0..i).
    """
    if causal and seqlen_q != seqlen_k:
        m = min(seqlen_q, seqlen_k)
        pairs = m * (m + 1) / 2 + (seqlen_q - m) * seqlen_k  # rows past Sk see every key
        flops = 4.0 * batch * heads * pairs * head_dim
    else:
        flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
        if causal:
            flops /= 2.0
    if pass_ == "bwd":
        flops *= BWD_FLOP_FACTOR
    elif pass_ != "fwd":
        raise ValueError(f"unknown pass {pass_!r}")
    return flops


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def _do_bench_median_ms(fn: Callable[[], Any], warmup: int, rep: int) -> float:
    """Median runtime in ms with ``triton.testing.do_bench`` (works from triton 3.2 to 3.9).

    Uses ``return_mode="median"`` when the installed triton accepts it, else ``quantiles=[0.5]``. Without
    triton it falls back to CUDA events.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events_median_ms(fn, warmup, rep)
    try:
        params = inspect.signature(do_bench).parameters
    except (TypeError, ValueError):
        params = {}
    if "return_mode" in params:
        result: Any = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    else:
        result = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
    if isinstance(result, (list, tuple)):
        result = result[0]
    return float(result)


def _cuda_events_median_ms(fn: Callable[[], Any], warmup: int, rep: int) -> float:
    """Fallback GPU timer: median of CUDA-event timings (no L2 flush)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    times = []
    for _ in range(max(1, int(rep / estimate))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def _cpu_median_ms(fn: Callable[[], Any], reps: int, budget_s: float) -> float:
    """Fastest wall time in ms of ``reps`` calls after three warm-up calls; stops early once
    ``budget_s`` seconds have been spent, but times at least three calls (CPU ops are synchronous).

    The minimum, not the median: on a shared CPU the slow calls are other processes' noise, and
    the fastest call is what repeats from run to run (the median of 30 still moved by 25%)."""
    for _ in range(3):  # warm-up: allocator, thread pools, caches
        fn()
    times: list[float] = []
    spent = 0.0
    for i in range(max(3, reps)):
        if i >= 3 and spent >= budget_s:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return min(times)


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """A ready-to-call attention implementation for one shape.

    ``fn(q, k, v)`` takes tensors in ``layout`` ("bshd" or "bhsd") and returns the output in the same layout;
    ``context`` is entered around every call (e.g. ``sdpa_kernel``).
    """

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    layout: str
    context: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)


_COMPILED_FLEX: Callable[..., Any] | None = None


def _compiled_flex() -> Callable[..., Any]:
    """``torch.compile(flex_attention)``, created once; recompile limit raised (one graph per shape)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        dynamo_config = torch._dynamo.config
        for name, limit in (
            ("recompile_limit", 512),
            ("cache_size_limit", 512),
            ("accumulated_recompile_limit", 4096),
            ("accumulated_cache_size_limit", 4096),
        ):
            if hasattr(dynamo_config, name):
                with contextlib.suppress(Exception):
                    setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), limit))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _causal_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def _ours_kwargs(fn: Callable[..., Any], what: str) -> dict[str, Any]:
    """Keyword arguments that make our ``fn`` run ``what`` (a value of :data:`OURS_IMPLS`).

    A library mode is ``mode=...``; ``"torch"`` (the PyTorch path) is ``impl="torch"`` where ``fn`` takes an
    ``impl`` keyword, else ``mode="reference"`` (the older API).
    """
    if what != "torch":
        return {"mode": what}
    try:
        takes_impl = "impl" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_impl = False
    return {"impl": "torch"} if takes_impl else {"mode": "reference"}


def make_runner(name: str, shape: Shape, device: torch.device) -> Runner:
    """Build the runner for implementation ``name`` (raises if it is unavailable)."""
    causal = shape.causal
    gqa = shape.kv_heads != shape.heads
    gqa_kwargs: dict[str, Any] = {"enable_gqa": True} if gqa else {}

    if name in OURS_IMPLS:
        import flash_module

        if causal and shape.kv_len != shape.seqlen:
            # Top-left causal like the peers: the SDPA-style API on (B, S, H, D) storage, no copies.
            sdpa_ours = flash_module.scaled_dot_product_attention
            sdpa_kwargs = _ours_kwargs(sdpa_ours, OURS_IMPLS[name])

            def top_left(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                t = (x.transpose(1, 2) for x in (q, k, v))
                return sdpa_ours(*t, is_causal=True, enable_gqa=gqa, **sdpa_kwargs).transpose(1, 2)

            return Runner(top_left, "bshd")
        flash_attn_func = flash_module.flash_attn_func
        kwargs = _ours_kwargs(flash_attn_func, OURS_IMPLS[name])
        return Runner(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, **kwargs), "bshd")

    if name == "ours_sdpa":
        import flash_module

        sdpa = flash_module.scaled_dot_product_attention
        return Runner(lambda q, k, v: sdpa(q, k, v, is_causal=causal, enable_gqa=gqa), "bhsd")

    if name in ("flash", "cudnn", "efficient", "math", "sdpa"):
        import torch.nn.functional as F

        def sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa_kwargs)

        if name == "sdpa":
            return Runner(sdpa_fn, "bhsd")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[name]
        return Runner(sdpa_fn, "bhsd", lambda: sdpa_kernel(backend))

    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _compiled_flex()
        block_mask = None
        if causal:  # created once per shape
            block_mask = create_block_mask(
                _causal_mask_mod, B=None, H=None, Q_LEN=shape.seqlen, KV_LEN=shape.kv_len, device=device
            )
        return Runner(lambda q, k, v: flex(q, k, v, block_mask=block_mask, **gqa_kwargs), "bhsd")

    raise ValueError(f"unknown impl {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------


def _short_error(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One-line reason for an ``n/a``: exception type and first line, plus relevant warnings."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "CUDA out of memory"
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    hints: list[str] = []
    for w in caught:  # SDPA explains why a backend was refused through warnings
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
        text = " ".join(text.split())
        if text.endswith(":"):  # "... kernel not used because:" -- the reason follows in the next warning
            continue
        if text and text not in hints and any(s in text.lower() for s in ("sdp", "attention", "kernel")):
            hints.append(text)
    if hints:
        msg += " (" + "; ".join(hints[:3]) + ")"
    return msg[:500]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_ms(
    runner: Runner,
    pass_: str,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: BenchConfig,
    device: torch.device,
) -> float:
    """Time one pass of ``runner`` on ``tensors`` = (q, k, v, dout) in the runner's layout; return ms."""
    q, k, v, dout = tensors

    def timer(fn: Callable[[], Any], check: Callable[[Any], None]) -> float:
        check(fn())  # first call: compilation / autotuning; errors surface here
        _sync(device)
        if device.type == "cuda":
            return _do_bench_median_ms(fn, cfg.warmup, cfg.rep)
        return _cpu_median_ms(fn, cfg.cpu_reps, cfg.cpu_budget_s)

    def check_out(out: Any) -> None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(f"output {got} != query shape {tuple(q.shape)}")

    with runner.context():
        if pass_ == "fwd":
            with torch.no_grad():
                return timer(lambda: runner.fn(q, k, v), check_out)

        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            out = runner.fn(qg, kg, vg)
        check_out(out)
        if not out.requires_grad:
            raise RuntimeError("output does not require grad (no backward)")
        grad_out = torch.empty_like(out).copy_(dout)  # same strides as out, as in a real training step
        return timer(
            lambda: torch.autograd.grad(out, (qg, kg, vg), grad_out, retain_graph=True), lambda _: None
        )


def make_inputs(
    batch: int,
    heads: int,
    kv_heads: int,
    seqlen: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    layouts: set[str],
    seqlen_k: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random normal (q, k, v, dout), contiguous in each requested layout ("bshd" and/or "bhsd")."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    n_k = seqlen if seqlen_k is None else seqlen_k

    def randn(s: int, h: int) -> torch.Tensor:
        return torch.randn(batch, s, h, head_dim, generator=gen, device=device, dtype=dtype)

    bshd = (randn(seqlen, heads), randn(n_k, kv_heads), randn(n_k, kv_heads), randn(seqlen, heads))
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if "bhsd" in layouts:
        q, k, v, do = (t.transpose(1, 2).contiguous() for t in bshd)
        out["bhsd"] = (q, k, v, do)
    if "bshd" in layouts:
        out["bshd"] = bshd
    return out


_LAYOUT_OF: dict[str, str] = dict.fromkeys(OURS_IMPLS, "bshd")  # others: bhsd


class _Progress:
    """Progress on stderr: a rich progress bar on a terminal, one plain line per step otherwise (logs, CI)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar, self.task = total, enabled, None, None
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task("benchmark", total=total)
        self.bar.start()

    def step(self, step: int, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(line, highlight=False)
            self.bar.update(self.task, advance=1)
        else:
            print(f"[{step}/{self.total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_benchmark(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the benchmark described by ``config`` and return one record per (shape, pass, impl).

    Each record has the keys ``impl, dtype, D, N, B, H, H_kv, causal, pass, flops, ms, tflops, error``;
    ``ms``/``tflops`` are ``None`` and ``error`` holds the reason when the implementation was not available or
    raised for that shape. Progress goes to stderr when ``config.progress`` is true.
    """
    cfg = resolve_config(config)
    assert cfg.impls is not None and cfg.device is not None
    device = torch.device(cfg.device)
    shapes = list(iter_shapes(cfg))
    total = len(shapes) * len(cfg.causal) * len(cfg.passes)
    records: list[dict[str, Any]] = []
    step = 0
    progress = _Progress(total, cfg.progress)
    layouts = {_LAYOUT_OF.get(i, "bhsd") for i in cfg.impls}

    for dtype_name, d, n, b, h, hkv in shapes:
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        input_error: str | None = None
        try:
            inputs = make_inputs(
                b, h, hkv, n, d, DTYPES[dtype_name], device, cfg.seed, layouts, cfg.seqlen_k
            )
        except Exception as exc:  # typically CUDA OOM: the whole shape is n/a
            input_error = "inputs: " + _short_error(exc)
            inputs = {}
            _free_memory()

        for causal in cfg.causal:
            shape = Shape(dtype_name, d, n, b, h, hkv, causal, cfg.seqlen_k)
            runners: dict[str, Runner | str] = {}
            for impl in cfg.impls:
                if input_error is not None:
                    runners[impl] = input_error
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        runners[impl] = make_runner(impl, shape, device)
                    except Exception as exc:
                        runners[impl] = _short_error(exc, caught)

            for pass_ in cfg.passes:
                step += 1
                flops = attention_flops(b, h, n, shape.kv_len, d, causal, pass_)
                summary: list[str] = []
                for impl in cfg.impls:
                    runner = runners[impl]
                    ms: float | None = None
                    error: str | None = runner if isinstance(runner, str) else None
                    if isinstance(runner, Runner):
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            try:
                                ms = _measure_ms(runner, pass_, inputs[runner.layout], cfg, device)
                            except Exception as exc:  # a failing impl is "n/a"
                                error = _short_error(exc, caught)
                        _free_memory()
                    tflops = flops / (ms * 1e-3) / 1e12 if ms is not None and ms > 0 else None
                    if tflops is None and error is None:
                        error = f"non-positive time ({ms} ms)"
                    records.append(
                        {
                            "impl": impl,
                            "dtype": dtype_name,
                            "D": d,
                            "N": n,
                            "N_k": shape.kv_len,
                            "B": b,
                            "H": h,
                            "H_kv": hkv,
                            "causal": causal,
                            "pass": pass_,
                            "flops": flops,
                            "ms": ms,
                            "tflops": tflops,
                            "error": error,
                        }
                    )
                    summary.append(f"{impl} {_fmt_tflops(tflops)}")
                progress.step(step, f"{shape.label()} {pass_}: " + "  ".join(summary))
            del runners
        del inputs
        _free_memory()
    progress.close()
    return records


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def _cudnn_version_str(version: int | None) -> str:
    if not version:
        return "none"
    if version >= 10000:  # cuDNN 9+: major*10000 + minor*100 + patch
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    # cuDNN 8: major*1000 + minor*100 + patch
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def collect_environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions and device facts that go into the header and the JSON file."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    try:
        cudnn_version = torch.backends.cudnn.version()
    except Exception:
        cudnn_version = None
    env: dict[str, Any] = {
        "device_type": dev.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn_version,
        "cudnn_str": _cudnn_version_str(cudnn_version),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        env.update(
            device_name=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads()
        )
    return env


def format_header(env: dict[str, Any]) -> str:
    """One header line (more on CPU: what runs there and what the numbers mean)."""
    if env["device_type"] == "cuda":
        dev = f"{env['device_name']} ({env['sm_count']} SMs, sm_{env['capability'].replace('.', '')})"
    else:
        dev = f"CPU {env['device_name']} ({env['cpu_threads']} threads)"
    line = (
        f"flash_module bench | {dev} | torch {env['torch']} | triton {env['triton']} | "
        f"CUDA {env['cuda']} | cuDNN {env['cudnn_str']} | commit {env['git_commit']}"
    )
    if env["device_type"] != "cuda":
        line += (
            "\nCPU run: 'ours' is flash_module's PyTorch path (impl='torch'; the Triton kernels need a"
            "\nGPU, or TRITON_INTERPRET=1 for the slow interpreter), next to torch SDPA on CPU ('sdpa':"
            "\nwhat a CPU user calls; 'math': its reference backend). Fastest of up to 30 calls after 3"
            "\nwarm-ups; these numbers say nothing about GPU speed."
        )
    return line


def _fmt_tflops(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _ratio_peers(impls: Sequence[str]) -> list[str]:
    peers = [p for p in RATIO_PEERS if p in impls]
    if not peers:
        peers = [p for p in impls if p not in ("ours", "ours_sdpa")][:1]
    return peers if "ours" in impls else []


def _table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], set[int]]:
    """Pivot records into (header, rows, right-aligned column indices)."""
    impls: list[str] = []
    for r in records:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    dtypes = {r["dtype"] for r in records}
    keys: dict[tuple[Any, ...], dict[str, float | None]] = {}
    for r in records:
        n_label = _fmt_n(r["N"], r.get("N_k", r["N"]))
        key = (r["dtype"], r["D"], n_label, r["B"], r["H"], r["H_kv"], r["causal"], r["pass"])
        keys.setdefault(key, {})[r["impl"]] = r["tflops"]
    peers = _ratio_peers(impls)
    header = (["dtype"] if len(dtypes) > 1 else []) + ["D", "N", "B", "H", "causal", "pass"]
    header += impls + [f"ours/{p}" for p in peers]
    rows: list[list[str]] = []
    for (dtype, d, n, b, h, hkv, causal, pass_), vals in keys.items():
        row = ([dtype] if len(dtypes) > 1 else []) + [
            str(d),
            str(n),
            str(b),
            str(h) if h == hkv else f"{h}/{hkv}",
            "yes" if causal else "no",
            pass_,
        ]
        row += [_fmt_tflops(vals.get(i)) for i in impls]
        for p in peers:
            ours, peer = vals.get("ours"), vals.get(p)
            row.append(_fmt_ratio(ours / peer) if ours and peer else "n/a")
        rows.append(row)
    n_left = (1 if len(dtypes) > 1 else 0) + 6
    right = {i for i in range(len(header)) if i < n_left - 2 or i >= n_left}
    return header, rows, right


def format_table(records: list[dict[str, Any]]) -> str:
    """Plain-text aligned table: rows = (D, N, B, H, causal, pass), columns = TFLOP/s per impl + ratios."""
    if not records:
        return "(no results)"
    header, rows, right = _table_rows(records)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines = ["TFLOP/s (higher is better)", fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _print_table(records: list[dict[str, Any]], plain: bool) -> None:
    if not plain and sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            header, rows, right = _table_rows(records)
            table = Table(title="TFLOP/s (higher is better)")
            for i, name in enumerate(header):
                table.add_column(name, justify="right" if i in right else "left")
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            return
    print(format_table(records))


def format_errors(records: list[dict[str, Any]]) -> str:
    """The reasons for each ``n/a``, once per (impl, reason), with the number of affected measurements."""
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        if r["error"]:
            counts[(r["impl"], r["error"])] = counts.get((r["impl"], r["error"]), 0) + 1
    if not counts:
        return ""
    lines = ["n/a reasons:"]
    lines += [f"  {impl} ({count}x): {err}" for (impl, err), count in counts.items()]
    return "\n".join(lines)


def write_json(
    path: str | Path, records: list[dict[str, Any]], config: BenchConfig, env: dict[str, Any]
) -> None:
    """Write environment, resolved config and raw results (ms and TFLOP/s per impl and shape) as JSON."""
    payload = {"environment": env, "config": asdict(config), "results": records}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def write_plot(path: str | Path, records: list[dict[str, Any]], title: str = "") -> bool:
    """TFLOP/s vs N, one line per impl, one subplot per (dtype, D, causal, pass). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        panels.setdefault((r["dtype"], r["D"], r["causal"], r["pass"], r["H"], r["H_kv"], r.get("N_k")
                           if r.get("N_k") != r["N"] else None), []).append(r)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, ((dtype, d, causal, pass_, h, hkv, n_k), rs) in zip(axes.flat, panels.items()):
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        for impl in impls:
            pts = sorted((r["N"], r["tflops"]) for r in rs if r["impl"] == impl and r["tflops"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        heads = f"H={h}" if h == hkv else f"H={h}/{hkv}"
        keys = f" Sk={n_k}" if n_k else ""
        mask = "causal" if causal else "non-causal"
        ax.set_title(f"{dtype} D={d} {heads}{keys} {mask} {pass_}", fontsize=9)
        ax.set_xscale("log", base=2)
        seqlens = sorted({r["N"] for r in rs})
        ax.set_xticks(seqlens)
        ax.set_xticklabels([str(n) for n in seqlens])
        ax.minorticks_off()
        ax.set_xlabel("N (query length)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for fixed defaults; device-dependent ones say ``[GPU: ..; CPU: ..]``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python benchmarks/bench.py`` (also ``python -m flash_module.bench``)."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Benchmark flash_module against SDPA (flash, cuDNN, efficient) and FlexAttention.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--head-dims",
        "-d",
        type=_int_list,
        default=None,
        help="head dims D, comma-separated [GPU: 64,128; CPU: 64]",
    )
    p.add_argument(
        "--seqlens",
        "-n",
        type=_int_list,
        default=None,
        help="sequence lengths N [GPU: 1024,4096,16384; CPU: 512,1024]",
    )
    p.add_argument("--seqlen-k", type=int, default=None, help="key/value length for every shape [N]")
    p.add_argument("--tokens", type=int, default=None, help="B*N; batch = tokens // N [GPU: 65536]")
    p.add_argument(
        "--batch", "-b", type=int, default=None, help="fixed batch size (overrides --tokens) [CPU: 1]"
    )
    p.add_argument("--heads", type=int, default=None, help="query heads H [GPU: 2048 // D; CPU: 8]")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads for GQA [H]")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="causal masking")
    p.add_argument(
        "--dtype",
        type=_str_list,
        default=None,
        help="comma-separated among bf16,fp16,fp32 [GPU: bf16; CPU: fp32]",
    )
    p.add_argument("--passes", type=_str_list, default=PASSES, help="fwd and/or bwd")
    p.add_argument(
        "--impls",
        type=_str_list,
        default=None,
        help=f"comma-separated among {','.join(ALL_IMPLS)} or 'all' "
        f"[GPU: {','.join(GPU_DEFAULT_IMPLS)}; CPU: {','.join(CPU_DEFAULT_IMPLS)}]",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA if present")
    p.add_argument("--warmup", type=int, default=25, help="GPU warm-up time per measurement (ms)")
    p.add_argument("--rep", type=int, default=100, help="GPU measuring time per measurement (ms)")
    p.add_argument("--cpu-reps", type=int, default=30, help="timed CPU calls per measurement (in 2 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", dest="json_path", default=None, help="write raw results + environment here")
    p.add_argument(
        "--plot", dest="plot_path", default=None, help="write a TFLOP/s-vs-N plot here (matplotlib)"
    )
    p.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-shape progress lines on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Turn parsed CLI arguments into a :class:`BenchConfig`."""
    impls = args.impls
    if impls is not None and "all" in impls:
        impls = ALL_IMPLS
    return BenchConfig(
        head_dims=args.head_dims,
        seqlens=args.seqlens,
        seqlen_k=args.seqlen_k,
        tokens=args.tokens,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        causal={"both": (False, True), "yes": (True,), "no": (False,)}[args.causal],
        dtypes=args.dtype,
        passes=tuple(args.passes),
        impls=impls,
        device=None if args.device == "auto" else args.device,
        warmup=args.warmup,
        rep=args.rep,
        cpu_reps=args.cpu_reps,
        seed=args.seed,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the header, run, print the table and the n/a reasons, write JSON/plot."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(config_from_args(args))
        list(iter_shapes(cfg))  # validate heads / kv_heads early
    except ValueError as exc:
        parser.error(str(exc))
    env = collect_environment(cfg.device)
    header = format_header(env)
    print(header, flush=True)
    records = run_benchmark(cfg)
    print()
    _print_table(records, args.plain)
    errors = format_errors(records)
    if errors:
        print()
        print(errors)
    if args.json_path:
        write_json(args.json_path, records, cfg, env)
        print(f"\nwrote {args.json_path}")
    if args.plot_path:
        if write_plot(args.plot_path, records, title=header.splitlines()[0]):
            print(f"wrote {args.plot_path}")
        else:
            print("matplotlib not importable: no plot written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
