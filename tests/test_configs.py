"""Every launch config the tuner can pick (``configs.TUNING_SPACE``) computes the right answer on
ragged shapes: partial query and key tiles, causal diagonal tiles, GQA, padded and unpadded head dims.

* CPU (CI): the Triton interpreter runs each distinct tile shape (warps and stages do not exist
  there, so configs that differ only in those are one case).
* GPU (marker ``gpu``): every config as compiled for the device, warps and stages included.

A config is forced with ``configs.override`` for one kernel (fwd, dkdv or dq); the other kernels
keep their table config.  Causal cases use the bucket's full head dim (the unmasked-load path);
non-causal cases a smaller, non-power-of-two one (masked head-dim loads).
"""

from __future__ import annotations

import pytest
import torch

from flash_module import configs, ops

from .helpers import assert_matches_reference, make_qkv

# bucket -> (head dim for the causal case, head dim for the non-causal case)
HEAD_DIMS = {64: (64, 40), 128: (128, 96), 256: (256, 200)}


def _cases(distinct_tiles: bool) -> list:
    """One case per config (or per distinct tile).  Under the interpreter only the first tile of
    each (kind, bucket) of head dims <= 128 is in the default run; the others are marked ``slow``."""
    cases, seen = [], set()
    for kind, per_bucket in configs.TUNING_SPACE.items():
        for bucket, cands in per_bucket.items():
            for i, cfg in enumerate(cands):
                key = (kind, bucket, cfg.block_m, cfg.block_n) if distinct_tiles else (kind, bucket, cfg)
                if key in seen:
                    continue
                seen.add(key)
                tile = f"M{cfg.block_m}_N{cfg.block_n}" if distinct_tiles else str(cfg)
                # default run: the first tile of D=128 (D=64 runs the same tile shapes)
                marks = pytest.mark.slow if distinct_tiles and (i > 0 or bucket != 128) else ()
                cases.append(pytest.param(kind, bucket, cfg, id=f"{kind}-D{bucket}-{tile}", marks=marks))
    return cases


def _check_config(kind, bucket, cfg, causal, device, sq, sk, dtype):
    d = HEAD_DIMS[bucket][0 if causal else 1]
    q, k, v = make_qkv(1, sq, sk, 2, 1, d, dtype, device, "bshd")
    dout = torch.randn(1, sq, 2, d, dtype=dtype, device=device)
    with configs.override(**{kind: cfg}):
        out, lse = ops.attention_fwd(q, k, v, d**-0.5, causal, True, "fa2")
        ours = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    assert_matches_reference(ours[:2] if kind == "fwd" else ours, q, k, v, dout, causal, True, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind,bucket,cfg", _cases(distinct_tiles=True))
def test_tuning_space_tiles_interpreted(kind, bucket, cfg, causal):
    """Each tile shape of the tuning space under the interpreter: one full and one partial tile per dim."""
    if torch.cuda.is_available():
        pytest.skip("the GPU version of this test covers it")
    _check_config(kind, bucket, cfg, causal, "cpu", 150, 203, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind,bucket,cfg", _cases(distinct_tiles=False))
def test_tuning_space_compiled(kind, bucket, cfg, causal):
    """Each config of the tuning space, compiled with its warps and stages, on ragged shapes."""
    _check_config(kind, bucket, cfg, causal, "cuda", 203, 317, torch.bfloat16)
