"""Run flash-attn's own test suite (``tests/test_flash_attn.py`` of a flash-attention checkout)
against flash_module, unchanged: a user's test suite for flash-attn is how issue #13 says the
variants are checked.  GPU only (the suite is written for CUDA).

    python scripts/upstream_tests.py --checkout .upstream/flash-attention [--sample 600] [--seed 0]
        [--junit out/upstream.xml] [--keep-internal] [-- extra pytest args, e.g. -k kvcache]

What it builds, in a temporary directory (nothing of flash-attention is committed here):

* a ``flash_attn`` package whose public functions are flash_module's (``flash_attn_func`` and
  the packed forms, the varlen functions, ``flash_attn_with_kvcache``), whose
  ``flash_attn_interface`` holds ``_get_block_size_n`` (flash_module's, the one its
  ``return_attn_probs`` layout follows) and ``USE_TRITON_ROCM = False``, and whose helper
  modules the tests import (``bert_padding``, ``layers.rotary`` with its Triton kernel) are
  the checkout's own files, copied;
* the test file, copied, with a ``conftest.py`` that keeps a random sample of ``--sample`` cases
  (``--seed``; 0 = all of them: the full matrix is tens of thousands) and deselects the tests of
  flash-attn's private entry points (``flash_attn_gpu``, ``_flash_attn_varlen_forward``) unless
  ``--keep-internal``.

``--checkout`` needs only these files of a flash-attention tree: ``tests/test_flash_attn.py``,
``flash_attn/bert_padding.py``, ``flash_attn/layers/rotary.py``,
``flash_attn/ops/triton/rotary.py``.  ``--populate-from GIT_DIR`` copies them out of a git
directory (e.g. a mirror) into ``--checkout`` first; ``.upstream/`` is ignored by git, so pass
it in the device call's ``carry``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The files of a flash-attention tree the suite needs (its helpers and the test file).
NEEDED = ("tests/test_flash_attn.py", "flash_attn/bert_padding.py", "flash_attn/layers/rotary.py",
          "flash_attn/ops/triton/rotary.py")
#: Tests of flash-attn's private entry points (the C++ extension module and its raw forward):
#: no public function of flash_module stands behind them.
INTERNAL = ("test_flash_attn_varlen_paged_kv_num_splits", "test_flash_attn_generator_arg_must_be_none")

#: flash-attn's public functions the suite imports; the shim serves flash_module's.
PUBLIC = ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
          "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
          "flash_attn_with_kvcache")
SHIM_INIT = ('"""flash_attn\'s public API, served by flash_module (scripts/upstream_tests.py)."""\n'
             f"from flash_module import {', '.join(PUBLIC)}  # noqa: F401\n")
SHIM_INTERFACE = '''from flash_module import *  # noqa: F401,F403
from flash_module.api import _get_block_size_n  # noqa: F401

USE_TRITON_ROCM = False
'''
#: ``--cpu``: the suite's rotary helper in torch ops (theirs launches a Triton kernel on the
#: current CUDA device): rows at positions ``seqlen_offsets + i``, the first ``2 * cos.shape[-1]``
#: features rotated, pairs (2i, 2i + 1) when interleaved, else (i, i + rotary_dim / 2).
CPU_ROTARY = '''import torch


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    assert cu_seqlens is None, "the CPU stand-in takes (batch, seqlen, nheads, headdim) only"
    b, s = x.shape[:2]
    rd = 2 * cos.shape[-1]
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).reshape(-1, 1)
    pos = (offsets + torch.arange(s, device=x.device)).expand(b, s)
    c, n = cos[pos][:, :, None].float(), sin[pos][:, :, None].float()  # (b, s, 1, rd / 2)
    rot = x[..., :rd].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * n, x1 * n + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, -1)
        out = torch.cat([x1 * c - x2 * n, x1 * n + x2 * c], -1)
    out = torch.cat([out.to(x.dtype), x[..., rd:]], -1)
    if inplace:
        x.copy_(out)
        return x
    return out
'''
CONFTEST = '''import random

import pytest

SAMPLE, SEED, INTERNAL = {sample}, {seed}, {internal!r}


@pytest.hookimpl(trylast=True)  # after -k / -m: the sample is drawn from what they keep
def pytest_collection_modifyitems(config, items):
    dropped = [it for it in items if it.originalname in INTERNAL]
    kept = [it for it in items if it.originalname not in INTERNAL]
    if SAMPLE and len(kept) > SAMPLE:
        chosen = set(random.Random(SEED).sample(range(len(kept)), SAMPLE))
        dropped += [it for i, it in enumerate(kept) if i not in chosen]
        kept = [it for i, it in enumerate(kept) if i in chosen]
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)
'''


def populate(git_dir: str, checkout: Path) -> None:
    """Copy :data:`NEEDED` out of the git directory ``git_dir`` (its HEAD) into ``checkout``."""
    for rel in NEEDED:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{rel}"], check=True,
                              capture_output=True).stdout
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_bytes(text)


def cpu_variant(text: str) -> str:
    """The suite with its CUDA device strings on the CPU and the GPU queries answered as an
    80 GB sm_90 card would (``--cpu``: an API dry run on flash_module's CPU path)."""
    text = text.replace('torch.cuda.get_device_capability("cuda")', "(9, 0)")
    text = text.replace('torch.cuda.get_device_properties("cuda").total_memory', "(80 * 2**30)")
    return text.replace('"cuda"', '"cpu"')


def build(checkout: Path, root: Path, sample: int, seed: int, internal: bool, cpu: bool = False) -> Path:
    """The shim package and the copied suite under ``root``; returns the test file's path."""
    missing = [rel for rel in NEEDED if not (checkout / rel).is_file()]
    if missing:
        raise SystemExit(f"--checkout {checkout}: missing {', '.join(missing)} (see --populate-from)")
    pkg = root / "flash_attn"
    for sub in ("", "layers", "ops", "ops/triton"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").touch()
    (pkg / "__init__.py").write_text(SHIM_INIT)
    (pkg / "flash_attn_interface.py").write_text(SHIM_INTERFACE)
    for rel in NEEDED[1:]:
        shutil.copy(checkout / rel, root / rel)
    if cpu:
        (pkg / "layers" / "rotary.py").write_text(CPU_ROTARY)
    tests = root / "tests"
    tests.mkdir()
    text = (checkout / NEEDED[0]).read_text()
    (tests / "test_flash_attn.py").write_text(cpu_variant(text) if cpu else text)
    skipped = () if internal else INTERNAL
    (tests / "conftest.py").write_text(CONFTEST.format(sample=sample, seed=seed, internal=skipped))
    return tests / "test_flash_attn.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, default=REPO / ".upstream" / "flash-attention")
    ap.add_argument("--populate-from", default=None,
                    help="a flash-attention git directory to copy the files from")
    ap.add_argument("--sample", type=int, default=600, help="random cases to keep (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--junit", default=None, help="write pytest's JUnit XML here")
    ap.add_argument("--keep-internal", action="store_true",
                    help="also run the tests of flash-attn's private API")
    ap.add_argument("--cpu", action="store_true",
                    help="an API dry run on flash_module's CPU path (the suite's device strings "
                         "rewritten, its rotary helper in torch ops)")
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.populate_from:
        populate(args.populate_from, args.checkout)
    with tempfile.TemporaryDirectory(prefix="fa_upstream_") as tmp:
        test_file = build(args.checkout, Path(tmp), args.sample, args.seed, args.keep_internal, args.cpu)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, str(REPO), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
               "--rootdir", tmp, *(["--junitxml", args.junit] if args.junit else []), *extra]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    raise SystemExit(main())
