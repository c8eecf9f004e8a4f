"""Softmax over one dim, backed by Triton kernels registered as ``torch.library`` custom ops.

The online and tiling softmax as a usable op: :func:`softmax` takes any tensor and any dim, like
``torch.softmax``, with two algorithms (see :mod:`flash_module.kernels.softmax`):

* ``"online"``: one program per row (or per block of short rows); a row that fits in one
  block is read once; a longer one is read twice (a streaming pass keeping a running max
  and sum, then the normalising pass) and written once;
* ``"tiling"``: each row is split into ``num_splits`` chunks handled by different programs
  (local max and sum per chunk, merged through a small workspace), for rows too long for a
  single program; ``num_splits=None`` picks the count from the shape and the SM count.

The ops, on contiguous (rows, n) matrices, reducing over the last dim:

``flash_module::softmax_fwd(x, algorithm, num_splits) -> y``
    ``y`` is a new contiguous tensor of x's dtype and shape.  Autograd is registered on it
    (it saves ``y``) and calls the backward op.
``flash_module::softmax_bwd(y, dy) -> dx``
    ``dx = y * (dy - sum(y * dy))``, a new contiguous tensor.  Its own autograd formula is
    written with torch ops, so double backward works too.

Dispatch (as in :mod:`flash_module.ops`): CUDA tensors run the compiled Triton kernels; CPU
tensors run them under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
import, and otherwise the PyTorch versions of the same algorithms in
:mod:`flash_module.reference` (the backward formula in torch ops).  Other devices take the
PyTorch path.  Validation reads metadata only: no host syncs, no graph breaks.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from . import reference
from ._runtime import acc_dtype, device_guard, use_triton

__all__ = ["ALGORITHMS", "DTYPES", "softmax", "softmax_bwd", "softmax_fwd"]

#: Algorithms of :func:`softmax`.
ALGORITHMS: tuple[str, ...] = ("online", "tiling")
#: Floating dtypes the kernels take (fp64 accumulates in fp64, the others in fp32).
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Chunk of the PyTorch online path (CPU without the interpreter) and its default split count.
_CPU_BLOCK = 1024
_CPU_SPLITS = 4


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"softmax: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def _check_num_splits(num_splits: int | None) -> None:
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"softmax: num_splits must be an int or None, got {type(num_splits).__name__}")
    if num_splits < 1:
        raise ValueError(f"softmax: num_splits must be >= 1, got {num_splits}")


def _check_op_args(x: Tensor, algorithm: str, num_splits: int | None) -> None:
    _check_algorithm(algorithm)
    _check_num_splits(num_splits)
    if x.dim() != 2:
        raise ValueError(f"softmax_fwd takes a 2-D (rows, n) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"softmax_fwd: dtype must be one of {DTYPES}, got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flash_module::softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, algorithm: str, num_splits: int | None) -> Tensor:
    """Softmax over the last dim of a (rows, n) tensor; returns a new contiguous tensor."""
    _check_op_args(x, algorithm, num_splits)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    if use_triton(x):
        from .kernels.softmax import softmax_forward

        with device_guard(x):
            return softmax_forward(x, algorithm, num_splits)
    if algorithm == "online":
        return reference.online_softmax(x, block=_CPU_BLOCK).contiguous()
    return reference.tiling_softmax(x, num_splits or _CPU_SPLITS).contiguous()


@softmax_fwd.register_fake
def _softmax_fwd_fake(x, algorithm, num_splits):
    _check_op_args(x, algorithm, num_splits)
    return x.new_empty(x.shape)  # contiguous, like the real output


def _check_bwd_args(y: Tensor, dy: Tensor) -> None:
    if y.dim() != 2 or y.shape != dy.shape or y.dtype != dy.dtype:
        raise ValueError(f"softmax_bwd takes y and dy of one 2-D shape and dtype, got {tuple(y.shape)} "
                         f"{y.dtype} and {tuple(dy.shape)} {dy.dtype}")
    if y.dtype not in DTYPES:
        raise TypeError(f"softmax_bwd: dtype must be one of {DTYPES}, got {y.dtype}")


@torch.library.custom_op("flash_module::softmax_bwd", mutates_args=())
def softmax_bwd(y: Tensor, dy: Tensor) -> Tensor:
    """``dx = y * (dy - sum(y * dy, -1))`` for (rows, n) tensors; a new contiguous tensor."""
    _check_bwd_args(y, dy)
    if y.numel() == 0:
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    y, dy = y.contiguous(), dy.contiguous()
    if use_triton(y):
        from .kernels.softmax import softmax_backward

        with device_guard(y):
            return softmax_backward(y, dy)
    acc = acc_dtype(y.dtype)
    yf, dyf = y.to(acc), dy.to(acc)
    return (yf * (dyf - (yf * dyf).sum(-1, keepdim=True))).to(y.dtype).contiguous()


@softmax_bwd.register_fake
def _softmax_bwd_fake(y, dy):
    _check_bwd_args(y, dy)
    return y.new_empty(y.shape)


def _fwd_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)  # the backward needs y only


def _fwd_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_bwd(y, dy), None, None


def _bwd_setup_context(ctx, inputs, output) -> None:
    y, dy = inputs
    ctx.save_for_backward(y, dy)


def _bwd_backward(ctx, g):
    """Gradients of dx = y * (dy - <y, dy>) for a gradient g of dx.

    d/d dy = y * (g - <g, y>), the backward op again; d/dy = g * (dy - <y, dy>) - dy * <g, y>.
    """
    y, dy = ctx.saved_tensors
    acc = acc_dtype(y.dtype)
    yf, dyf, gf = y.to(acc), dy.to(acc), g.to(acc)
    dot_y_dy = (yf * dyf).sum(-1, keepdim=True)
    dot_g_y = (gf * yf).sum(-1, keepdim=True)
    grad_y = (gf * (dyf - dot_y_dy) - dyf * dot_g_y).to(y.dtype)
    return grad_y, softmax_bwd(y, g)


torch.library.register_autograd("flash_module::softmax_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("flash_module::softmax_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def softmax(x: Tensor, dim: int = -1, algorithm: str = "online", num_splits: int | None = None) -> Tensor:
    """Softmax of ``x`` along ``dim``: same values, shape and dtype as ``torch.softmax(x, dim)``.

    Args:
        x: a floating tensor (fp16, bf16, fp32 or fp64), any shape and strides.
        dim: the dim to normalise over (negative counts from the end).
        algorithm: ``"online"`` (one program per row, two reads and one write for long rows,
            one read for rows that fit in one block) or ``"tiling"`` (each row split over
            ``num_splits`` programs, merged through a small workspace: for very long rows).
        num_splits: ``"tiling"`` only: chunks per row, ``None`` for an automatic choice from
            the shape and the GPU's SM count.

    The kernels reduce over a contiguous last dim: ``dim`` is moved there and the tensor viewed
    as (rows, n), which copies only when that view does not exist.  For ``dim`` other than the
    last, the result is returned as a permuted view of a contiguous buffer (its strides differ
    from ``torch.softmax``'s; the values do not).  A slice that is entirely -inf gives NaN, as
    in torch; +inf or NaN entries make their slice NaN.  Differentiable (twice).

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype is not a supported floating dtype, or
            ``dim`` / ``num_splits`` have the wrong type.
        ValueError: unknown ``algorithm``; ``num_splits < 1``; ``num_splits`` with ``"online"``.
        IndexError: ``dim`` out of range (as torch).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"softmax: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"softmax: x must have one of the dtypes {DTYPES}, got {x.dtype}")
    _check_algorithm(algorithm)
    _check_num_splits(num_splits)
    if algorithm == "online" and num_splits is not None:
        raise ValueError("softmax: num_splits applies to algorithm='tiling' only")
    if isinstance(dim, bool):
        raise TypeError("softmax: dim must be an int, got bool")
    try:
        dim = operator.index(dim)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"softmax: dim must be an int, got {type(dim).__name__}") from None
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
                         f"but got {dim})")
    if x.dim() == 0:
        return softmax_fwd(x.reshape(1, 1), algorithm, num_splits).reshape(())
    dim = dim % x.dim()
    last = dim == x.dim() - 1
    xt = x if last else x.movedim(dim, -1)
    n = xt.shape[-1]
    y2d = softmax_fwd(xt.reshape(math.prod(xt.shape[:-1]), n), algorithm, num_splits)
    y = y2d.view(xt.shape)
    return y if last else y.movedim(-1, dim)


# ``flash_module.softmax`` (the package attribute) is this function, so ``fm.softmax(x)`` works.
# Code written against 0.1 reached the module through that name (``flash_module.softmax.softmax(x)``,
# ``import flash_module.softmax as fsm; fsm.ALGORITHMS``): the function carries the module's public
# names, so that code keeps working.
for _name in __all__:
    setattr(softmax, _name, globals()[_name])
del _name
