"""Process groups on one machine for the tests, the benchmarks and the examples.

:func:`spawn` runs a function on ``world`` local ranks (``torch.multiprocessing.spawn``) and ends
each rank that returned with ``os._exit(0)``, skipping the interpreter's teardown.  Why: a gloo
process group, even after ``destroy_process_group``, can leave C++ worker threads whose last
objects are released while the interpreter shuts down; that release aborts the process
("terminate called without an active exception", SIGABRT with no Python frame).  Measured on
the CI machine: ``benchmarks/bench_ring.py`` with 2 gloo ranks aborted in 4 of 40 runs.  A rank
that raised still goes through ``torch.multiprocessing``'s own error path, so its traceback
reaches the parent.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch.multiprocessing as mp

#: NVLink multicast stays off in NCCL and torch's symmetric memory (the GPU machines' rule);
#: harmless elsewhere.  Set before ``init_process_group`` (spawned ranks inherit it).
SAFE_NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, args: tuple) -> None:
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: see the module's docstring


def spawn(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, *args)`` on ranks ``0 .. world - 1`` in fresh processes and wait for them.

    ``fn`` must be a module-level function (it is pickled by name).  Raises what
    ``torch.multiprocessing.spawn`` raises when a rank fails (``ProcessRaisedException`` with
    the rank's traceback, ``ProcessExitedException`` when it died of a signal).  A rank that
    returns exits at once: whatever it must leave behind (files, a manager's list) it writes
    before returning, and it should have called ``destroy_process_group``.
    """
    mp.spawn(_rank_main, args=(fn, args), nprocs=world, join=True)
