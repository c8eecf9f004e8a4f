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

import contextlib
import os

import torch
from torch import Tensor

from . import reference

#: Modes of the attention ops: ``fa2`` (default), ``fa1`` (FA1's loop order, O/l/m in HBM),
#: ``tiling`` (split-KV: the seed's tiling softmax over key chunks), ``reference`` (PyTorch).
MODES: tuple[str, ...] = ("fa2", "fa1", "tiling", "reference")

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


def check_mode(mode: str) -> None:
    """ValueError naming the valid modes unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (e.g. cuda:1 inputs)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


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
    num_splits: int = 0,
) -> tuple[Tensor, Tensor]:
    check_mode(mode)
    b, sq, h, d = q.shape
    if q.numel() == 0 or k.shape[1] == 0:  # nothing to attend: O = 0, LSE = -inf
        out = torch.zeros((b, sq, h, d), dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=reference.acc_dtype(q.dtype), device=q.device)
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if _use_triton(q, mode):
        with _on_device(q):
            return _triton_forward(q, k, v, softmax_scale, causal, bottom_right, mode, num_splits)
    if mode == "fa1":
        out, lse = reference.fa1_forward(q, k, v, softmax_scale, causal, bottom_right)
    elif mode == "tiling":
        out, lse = reference.split_kv_forward(q, k, v, softmax_scale, causal, bottom_right, num_splits or 4)
    else:
        out, lse = reference.fa2_forward(q, k, v, softmax_scale, causal, bottom_right)
    return out.contiguous(), lse.contiguous()


def _triton_forward(q, k, v, softmax_scale, causal, bottom_right, mode, num_splits):
    """The Triton kernels of ``mode`` (compiled on CUDA, interpreted on CPU)."""
    offset, interpret = _causal_offset(q, k, bottom_right), q.device.type == "cpu"
    if mode == "fa1":
        from .kernels.fa1 import fa1_forward

        return fa1_forward(q, k, v, softmax_scale, causal, offset, interpret=interpret)
    if mode == "tiling":
        from .kernels.split_kv import split_kv_forward

        return split_kv_forward(q, k, v, softmax_scale, causal, offset, num_splits, interpret=interpret)
    from .kernels.fa2_fwd import fa2_forward

    return fa2_forward(q, k, v, softmax_scale, causal, offset, interpret=interpret)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, softmax_scale, causal, bottom_right, mode, num_splits=0):
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d))
    lse = q.new_empty((b, h, sq), dtype=reference.acc_dtype(q.dtype))
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
    check_mode(mode)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    if _use_triton(q, mode):
        with _on_device(q):
            offset, interpret = _causal_offset(q, k, bottom_right), q.device.type == "cpu"
            if mode == "fa1":
                from .kernels.fa1 import fa1_backward

                return fa1_backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, offset,
                                    interpret=interpret)
            # fa2 and tiling share FA2's backward (tiling's merged LSE is the full row's LSE).
            from .kernels.fa2_bwd import fa2_backward

            return fa2_backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, offset,
                                interpret=interpret)
    dq, dk, dv = reference.fa2_backward(dout, q, k, v, out, lse, softmax_scale, causal, bottom_right,
                                        dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, causal, bottom_right, mode, _num_splits = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (softmax_scale, causal, bottom_right, mode)
    ctx.set_materialize_grads(False)  # dlse stays None unless the caller used lse


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


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


# ---------------------------------------------------------------------------------------------
# merge_attention_states: the combine step of split-KV / cascade / ring attention
# ---------------------------------------------------------------------------------------------


def _merge_weights(lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(w_a, w_b, lse) with w = exp(lse_x - lse) in the LSE dtype; rows with no keys -> 0, -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    return torch.exp(lse_a - safe), torch.exp(lse_b - safe), lse


def _bshd_weight(w: Tensor) -> Tensor:
    return w.transpose(1, 2).unsqueeze(-1)  # (B, H, S) -> (B, S, H, 1)


@torch.library.custom_op("flash_module::merge_attention_states", mutates_args=())
def merge_attention_states(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge two partial attentions over disjoint key sets into the attention over their union.

    ``out_*``: (B, S, H, D) normalised partial outputs; ``lse_*``: (B, H, S) their log-sum-exps
    (-inf where a part saw no key).  Returns ``(out, lse)``:
    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.
    """
    w_a, w_b, lse = _merge_weights(lse_a, lse_b)
    out = _bshd_weight(w_a) * out_a.to(w_a.dtype) + _bshd_weight(w_b) * out_b.to(w_b.dtype)
    return out.to(out_a.dtype).contiguous(), lse.contiguous()


@merge_attention_states.register_fake
def _merge_fake(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


def _merge_setup_context(ctx, inputs, output) -> None:
    out_a, lse_a, out_b, lse_b = inputs
    out, _ = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out)


def _merge_backward(ctx, dout, dlse):
    out_a, lse_a, out_b, lse_b, out = ctx.saved_tensors
    w_a, w_b, _ = _merge_weights(lse_a, lse_b)
    acc = w_a.dtype
    dout = torch.zeros_like(out, dtype=acc) if dout is None else dout.to(acc)
    dlse = torch.zeros_like(w_a) if dlse is None else dlse.to(acc)
    # d out / d out_x = w_x;  d out / d lse_x = w_x (out_x - out);  d lse / d lse_x = w_x.
    rows = lambda o: (dout * (o.to(acc) - out.to(acc))).sum(-1).transpose(1, 2)  # (B, H, S)
    d_lse_a = w_a * (dlse + rows(out_a))
    d_lse_b = w_b * (dlse + rows(out_b))
    d_out_a = (_bshd_weight(w_a) * dout).to(out_a.dtype)
    d_out_b = (_bshd_weight(w_b) * dout).to(out_b.dtype)
    return d_out_a, d_lse_a.to(lse_a.dtype), d_out_b, d_lse_b.to(lse_b.dtype)


torch.library.register_autograd("flash_module::merge_attention_states", _merge_backward,
                                setup_context=_merge_setup_context)
