"""examples/train_gpt.py: a tiny GPT trains, and flash_module matches torch SDPA step by step.

Under the test suite (TRITON_INTERPRET=1 on CPU) the flash side runs the real Triton kernels in
the interpreter, so the sizes are tiny.
"""

from __future__ import annotations

import math

import pytest

from .helpers import example_module

# A model small enough for the Triton interpreter: ~0.3 s per training step of both runs.
TINY = ["--device", "cpu", "--seq-len", "16", "--batch-size", "2", "--layers", "1", "--d-model", "32",
        "--heads", "2", "--corpus-chars", "5000", "--eval-batches", "1", "--sample-chars", "0",
        "--quiet", "--no-compile"]


@pytest.fixture(scope="module")
def train_gpt():
    with example_module("train_gpt") as module:
        yield module


def _assert_runs_agree(result: dict, rel: float = 1e-4) -> None:
    flash, sdpa = result["losses"]["flash"], result["losses"]["sdpa"]
    assert len(flash) == len(sdpa) == result["args"]["steps"]
    for step, (a, b) in enumerate(zip(flash, sdpa)):
        assert math.isfinite(a) and math.isfinite(b), f"step {step}: losses {a}, {b}"
        assert a == pytest.approx(b, rel=rel), f"step {step}: flash {a} vs sdpa {b}"
    assert result["max_rel_loss_diff"] <= rel
    for name in ("flash", "sdpa"):
        assert math.isfinite(result["val_loss"][name])


def test_corpus_is_deterministic(train_gpt):
    a, b = train_gpt.make_corpus(2000, seed=3), train_gpt.make_corpus(2000, seed=3)
    assert a == b and len(a) >= 2000
    assert a != train_gpt.make_corpus(2000, seed=4)
    assert train_gpt.number_words(42) == "forty two" and train_gpt.number_words(13) == "thirteen"


@pytest.mark.parametrize("extra", [[], pytest.param(["--no-tie-weights", "--heads", "4", "--kv-heads", "2"],
                                               marks=pytest.mark.slow)], ids=["tied", "untied-gqa"])
def test_five_steps_match_sdpa(train_gpt, extra):
    result = train_gpt.main([*TINY, "--steps", "5", *extra])
    _assert_runs_agree(result)


@pytest.mark.slow
def test_loss_decreases_with_rotary_mqa(train_gpt):
    result = train_gpt.main([*TINY, "--steps", "20", "--seq-len", "32", "--batch-size", "4",
                             "--kv-heads", "1", "--rotary", "--lr", "1e-2"])
    _assert_runs_agree(result)
    losses = result["losses"]["flash"]
    # Uniform guessing over the ~25-character vocabulary is ln(25) = 3.2; 20 steps learn the
    # character frequencies at least.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses


def test_text_file_and_single_run(train_gpt, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("abcabcabd " * 50, encoding="utf-8")
    result = train_gpt.main([*TINY, "--steps", "3", "--attn", "sdpa", "--text", str(text),
                             "--sample-chars", "5"])
    assert set(result["losses"]) == {"sdpa"}
    assert all(math.isfinite(x) for x in result["losses"]["sdpa"])
    assert "max_abs_loss_diff" not in result
    assert result["sample"].startswith(text.read_text()[:16])


@pytest.mark.slow  # ~20 s of compiling on CPU; test_ops covers compile in the default run
def test_compiled_matches_eager(train_gpt):
    """torch.compile(fullgraph=True) on both runs: same losses as eager, flash still == SDPA."""
    args = [*TINY, "--steps", "3", "--rotary"]
    eager = train_gpt.main(args)
    compiled = train_gpt.main([*args, "--compile"])
    _assert_runs_agree(compiled)
    for name in ("flash", "sdpa"):
        assert compiled["losses"][name] == pytest.approx(eager["losses"][name], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [(2, "zigzag"), (4, "contiguous")])
def test_context_parallel_training_matches_one_device(world, layout):
    """examples/train_gpt_cp.py: the GPT trained with its sequence sharded over gloo ranks (ring
    attention in every block) has the one-device run's loss at every step."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_gpt_cp.py"
    argv = ["--world", str(world), "--layout", layout, "--steps", "4", "--seq-len", "32", "--batch-size", "2",
            "--layers", "1", "--d-model", "32", "--heads", "2", "--kv-heads", "1", "--corpus-chars", "5000"]
    res = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = re.findall(r"loss \d+ ranks ([\d.]+)\s+one device ([\d.]+)", res.stdout)
    assert len(steps) == 4, res.stdout
    for sharded, single in steps:
        assert float(sharded) == pytest.approx(float(single), rel=1e-4, abs=1e-5)
    assert "largest |loss difference|" in res.stdout
