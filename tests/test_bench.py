"""Tests of the benchmark harness (benchmarks/bench.py, and the ``python -m flash_module.bench`` shim).

CPU smoke tests of ``run_benchmark`` and the CLI on tiny shapes (fast, also under TRITON_INTERPRET=1).
The timed pytest-benchmark suite lives apart from the tests, in ``benchmarks/test_speed.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench import ALL_IMPLS, OURS_IMPLS, BenchConfig, attention_flops, main, run_benchmark
from flash_module.ops import MODES


def test_attention_flops() -> None:
    fwd = attention_flops(2, 16, 1024, 1024, 128, causal=False)
    assert fwd == 4 * 2 * 16 * 1024 * 1024 * 128
    assert attention_flops(2, 16, 1024, 1024, 128, causal=True) == fwd / 2
    assert attention_flops(2, 16, 1024, 1024, 128, causal=False, pass_="bwd") == 2.5 * fwd
    with pytest.raises(ValueError):
        attention_flops(1, 1, 1, 1, 1, causal=False, pass_="both")


@pytest.mark.slow  # ~12 s
def test_run_benchmark_cpu_smoke() -> None:
    config = BenchConfig(
        device="cpu",
        head_dims=(64,),
        seqlens=(128,),
        batch=1,
        heads=2,
        causal=(True,),
        dtypes=("fp32",),
        passes=("fwd", "bwd"),
        impls=("ours", "math"),
        cpu_reps=2,
        progress=False,
    )
    rows = run_benchmark(config)
    assert {(r["impl"], r["pass"]) for r in rows} == {
        ("ours", "fwd"),
        ("ours", "bwd"),
        ("math", "fwd"),
        ("math", "bwd"),
    }
    for r in rows:
        assert r["error"] is None, r
        assert (r["D"], r["N"], r["B"], r["H"], r["H_kv"], r["causal"]) == (64, 128, 1, 2, 2, True)
        assert r["ms"] is not None and math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["tflops"] is not None and math.isfinite(r["tflops"]) and r["tflops"] > 0, r
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)


def test_attention_flops_causal_sq_ne_sk() -> None:
    """Sq != Sk causal counts the visible pairs of the top-left mask exactly."""
    # Sq=3, Sk=5: rows see 1, 2, 3 keys.  Sq=5, Sk=3: rows see 1, 2, 3, 3, 3 keys.
    assert attention_flops(1, 1, 3, 5, 1, causal=True) == 4 * 6
    assert attention_flops(1, 1, 5, 3, 1, causal=True) == 4 * 12


@pytest.mark.slow  # ~30 s on 2 cores (the CPU timing budget of every cell)
def test_run_benchmark_cpu_sq_ne_sk(capsys) -> None:
    """--seqlen-k: ours (top-left causal through the SDPA-style API) next to SDPA math, same FLOPs."""
    argv = ["--device", "cpu", "--impls", "ours,math", "-d", "32", "-n", "48", "--seqlen-k", "80",
            "--passes", "fwd,bwd", "--cpu-reps", "1", "--plain"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "48x80" in out.out
    cfg = BenchConfig(device="cpu", head_dims=(32,), seqlens=(48,), seqlen_k=80, batch=1, heads=2,
                      causal=(True,), dtypes=("fp32",), impls=("ours", "math"), cpu_reps=1, progress=False)
    rows = run_benchmark(cfg)
    for r in rows:
        assert r["error"] is None, r
        assert r["N_k"] == 80
        assert r["flops"] == attention_flops(1, 2, 48, 80, 32, True, r["pass"])


def test_main_cpu_table_json_and_na(tmp_path, capsys) -> None:
    """The CLI prints a header and a table, writes JSON, and shows an unavailable backend as n/a."""
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--impls", "math,cudnn", "-d", "32", "-n", "64", "--causal", "no"]
    argv += ["--passes", "fwd", "--cpu-reps", "1", "--quiet", "--plain", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "CPU run: 'ours' is flash_module's PyTorch path" in text and "torch" in text
    assert "n/a reasons:" in text  # cuDNN has no CPU kernel
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"] == torch.__version__
    by_impl = {r["impl"]: r for r in payload["results"]}
    assert by_impl["math"]["tflops"] > 0 and by_impl["math"]["error"] is None
    assert by_impl["cudnn"]["tflops"] is None and by_impl["cudnn"]["error"]


def test_ours_impls_follow_library_modes() -> None:
    """ours = fa2, ours_<mode> for every other library mode, ours_torch for the PyTorch path."""
    assert (OURS_IMPLS["ours"], OURS_IMPLS["ours_fa1"], OURS_IMPLS["ours_tiling"]) == ("fa2", "fa1", "tiling")
    assert OURS_IMPLS["ours_torch"] == "torch" and "ours_reference" not in OURS_IMPLS
    assert set(OURS_IMPLS.values()) == {m for m in MODES if m != "reference"} | {"torch"}
    assert {"ours", "ours_fa1", "ours_tiling", "ours_torch"} <= set(ALL_IMPLS)
    cfg = BenchConfig(device="cpu", head_dims=(16,), seqlens=(32,), batch=1, heads=2, causal=(True,),
                      dtypes=("fp32",), passes=("fwd",), impls=("ours_torch",), cpu_reps=1, progress=False)
    [row] = run_benchmark(cfg)
    assert row["error"] is None and row["tflops"] > 0, row


def test_module_shim_help() -> None:
    """``python -m flash_module.bench`` still runs the CLI (found in benchmarks/ of the checkout)."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "flash_module.bench", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "usage: python benchmarks/bench.py" in res.stdout and "--impls" in res.stdout
    # Device-dependent defaults are spelled out ([GPU: ..; CPU: ..]), never "(default: None)".
    assert "default: None" not in res.stdout and "512,1024]" in res.stdout
