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
