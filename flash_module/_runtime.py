"""The runtime room: where code runs, decided in one place.

* :data:`INTERPRET`: this process runs Triton kernels under the interpreter (``TRITON_INTERPRET=1``
  set before import; a process is either interpreted or compiled, never both).
* :func:`use_triton`: whether a tensor's device runs the Triton kernels (CUDA always; CPU only
  under the interpreter) or the PyTorch path.
* :func:`acc_dtype`: the accumulator / statistics dtype of an input dtype.
* :func:`sm_count`: streaming multiprocessors of a device, with one stand-in for CPU tensors.
* :func:`device_guard`: Triton launches on the *current* CUDA device; make it the tensor's.

Nothing here reads tensor values, so nothing here syncs the host.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

#: True when this process runs Triton kernels under the interpreter (CPU tensors).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: SM count assumed for CPU tensors (interpreter and PyTorch path): keeps every automatic choice
#: that scales with the GPU (split counts, program groups) deterministic off a GPU.
CPU_SM_COUNT = 8


def interpreting() -> bool:
    """True when this process runs Triton kernels under the interpreter (CPU tensors)."""
    return INTERPRET


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t``'s device runs the Triton kernels: CUDA, or CPU under the interpreter."""
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code.  (``triton.cdiv`` is a constexpr function in recent Triton,
    a few microseconds per call: launches are host-bound at decode sizes.)"""
    return -(a // -b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see :func:`cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the LSE the attention ops save for the backward: float32 for fp16/bf16 inputs,
    float64 for fp32/fp64 inputs.

    The backward recomputes ``P = exp(S - lse)``; an fp32 LSE of a row whose logits are ~1e3
    is off by half an ulp (~3e-5), a relative error on every P of the row that torch's own fp32
    math never makes (it keeps P).  With a float64 LSE, fp32 attention's dV stays within
    torch's fp32 error at any logit size.  (The public functions still return float32 for fp32.)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; :data:`CPU_SM_COUNT` for any other device."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_SM_COUNT


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current while kernels launch (e.g. for cuda:1 inputs); nothing
    to do (and no device switch to pay for, twice per op) when it is current already."""
    if not t.is_cuda:
        return _NO_GUARD
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(index)
