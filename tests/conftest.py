"""Test setup: run the real Triton kernels on CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before flash_module is
imported, so it happens here, at collection time.  On a CUDA machine the kernels are compiled
and the same tests run on the GPU.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def restore_deterministic_algorithms():
    """Restores ``torch.use_deterministic_algorithms`` after a test that changes it."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.fixture
def deterministic_algorithms(restore_deterministic_algorithms):
    """``torch.use_deterministic_algorithms(True)`` (warnings only) for one test: a bitwise
    reproducible backward, also where the default one adds dQ up by atomics (the Hopper
    one-pass backward at D=64)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Give cached CUDA memory back after each test: under pytest-xdist several workers share
    one GPU, and memory one worker's allocator keeps cached is memory another cannot get (the
    driver also needs room for the spill stacks of kernel launches)."""
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()
