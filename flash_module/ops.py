"""The torch.library contract: ``flash_module::attention_fwd`` and ``flash_module::attention_bwd``.

Both ops work on the *bshd* layout with any strides whose last dim is contiguous:

``attention_fwd(q, k, v, softmax_scale, causal, bottom_right, mode) -> (out, lse)``
    q (B, Sq, H, D); k, v (B, Sk, H_kv, D), H % H_kv == 0.  ``out`` is a new contiguous
    (B, Sq, H, D) tensor in q's dtype; ``lse`` a contiguous (B, H, Sq) float32 tensor (float64
    for float64 inputs), natural log.  ``causal`` with ``bottom_right`` masks keys
    ``j > i + Sk - Sq`` (flash-attn); without it, keys ``j > i`` (torch SDPA).

``attention_bwd(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode)
-> (dq, dk, dv)``
    Recomputes P from ``lse``; ``dlse`` (optional) is a gradient flowing into ``lse``.  Returns
    new contiguous tensors shaped like q, k, v.

Which implementation runs: CUDA tensors run the compiled Triton kernels; CPU tensors run the
same kernels under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before import,
and the vectorised PyTorch path (:mod:`flash_module.reference`) otherwise.  ``mode="reference"``
forces the PyTorch path on any device.  Autograd is registered on the forward (it saves q, k,
v, out and lse, never P); the backward op itself is not differentiable (double backward raises).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference

#: Modes of the attention ops.  ``fa2`` is the default Triton path; ``reference`` the PyTorch one.
MODES: tuple[str, ...] = ("fa2", "reference")

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when this process runs Triton kernels under the interpreter (CPU tensors)."""
    return _INTERPRET


def _use_triton(t: Tensor, mode: str) -> bool:
    if mode == "reference":
        return False
    if t.device.type == "cuda":
        return True
    return _INTERPRET and t.device.type == "cpu"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _causal_offset(q: Tensor, k: Tensor, bottom_right: bool) -> int:
    return k.shape[1] - q.shape[1] if bottom_right else 0


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("flash_module::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    mode: str,
) -> tuple[Tensor, Tensor]:
    _check_mode(mode)
    b, sq, h, d = q.shape
    if q.numel() == 0 or k.shape[1] == 0:  # nothing to attend: O = 0, LSE = -inf
        out = torch.zeros((b, sq, h, d), dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if _use_triton(q, mode):
        from .kernels.fa2_fwd import fa2_forward

        return fa2_forward(q, k, v, softmax_scale, causal, _causal_offset(q, k, bottom_right),
                           interpret=q.device.type == "cpu")
    out, lse = reference.fa2_forward(q, k, v, softmax_scale, causal, bottom_right)
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, softmax_scale, causal, bottom_right, mode):
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d))
    lse = q.new_empty((b, h, sq), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flash_module::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_mode(mode)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    if _use_triton(q, mode):
        from .kernels.fa2_bwd import fa2_backward

        return fa2_backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal,
                            _causal_offset(q, k, bottom_right), interpret=q.device.type == "cpu")
    dq, dk, dv = reference.fa2_backward(dout, q, k, v, out, lse, softmax_scale, causal, bottom_right,
                                        dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, causal, bottom_right, mode = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (softmax_scale, causal, bottom_right, mode)
    ctx.set_materialize_grads(False)  # dlse stays None unless the caller used lse


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, *ctx.args)
    return dq, dk, dv, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "flash_module: double backward (gradients of gradients) through attention is not "
        "supported; the flash kernels only implement the first derivative."
    )


def _bwd_setup_context(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("flash_module::attention_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("flash_module::attention_bwd", _no_double_backward,
                                setup_context=_bwd_setup_context)
