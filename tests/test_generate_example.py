"""examples/generate.py: decoding with the static KV cache gives the tokens of full recomputation.

Under the test suite (TRITON_INTERPRET=1 on CPU) the cached path runs the real Triton kernels
(append + split-KV over the cache) in the interpreter, so the model is tiny.
"""

from __future__ import annotations

import pytest

from .helpers import example_module

TINY = ["--batch", "2", "--prompt-len", "8", "--new-tokens", "6", "--layers", "1", "--d-model", "32",
        "--heads", "2", "--kv-heads", "1", "--quiet", "--no-graph"]


@pytest.fixture(scope="module")
def generate():
    with example_module("generate") as module:
        yield module


@pytest.mark.parametrize("extra", [[], ["--rotary", "--temperature", "0"]],
                         ids=["learned-pos", "rope-greedy"])
def test_cached_generation_matches_recompute(generate, extra, device):
    result = generate.main([*TINY, "--device", device, *extra])
    assert result["match"]["cache"], result["tokens"]
    assert result["match"]["sdpa"], result["tokens"]
    assert len(result["tokens"]["cache"][0]) == 6
    if device == "cuda":  # and the decode step captured in a CUDA graph
        result = generate.main([*TINY[:-1], "--device", device, *extra])
        assert result["match"]["cache+graph"], result["tokens"]
