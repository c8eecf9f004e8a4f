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
