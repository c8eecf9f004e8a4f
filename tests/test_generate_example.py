"""examples/generate.py: decoding with the static KV cache gives the tokens of full recomputation.

Under the test suite (TRITON_INTERPRET=1 on CPU) the cached path runs the real Triton kernels
(append + split-KV over the cache) in the interpreter, so the model is tiny.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
TINY = ["--batch", "2", "--prompt-len", "8", "--new-tokens", "6", "--layers", "1", "--d-model", "32",
        "--heads", "2", "--kv-heads", "1", "--quiet", "--no-graph"]


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


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
