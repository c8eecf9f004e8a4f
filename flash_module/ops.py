"""The torch.library contract and the one table from algorithm to implementation.

Both attention ops work on the *bshd* layout with any strides whose last dim is contiguous:

``attention_fwd(q, k, v, softmax_scale, causal, bottom_right, mode, num_splits=0, impl="auto")
-> (out, lse)``
    q (B, Sq, H, D); k, v (B, Sk, H_kv, D), H % H_kv == 0.  ``out`` is a new contiguous
    (B, Sq, H, D) tensor in q's dtype; ``lse`` a contiguous (B, H, Sq) tensor, natural log,
    float32 for fp16/bf16 inputs and float64 for fp32/fp64 inputs (``_runtime.lse_dtype``: the
    backward recomputes P from it, and an fp32 LSE would cost fp32 attention's dV precision at
    large logits; the public functions return it as float32 for fp32 inputs).  ``causal`` with
    ``bottom_right`` masks keys ``j > i + Sk - Sq`` (flash-attn); without it, keys ``j > i``
    (torch SDPA).  A query row that sees no key gets out = 0 and lse = -inf.  ``num_splits``
    is the key-chunk count of ``mode="tiling"`` (0 = automatic; ignored by the other modes).

``attention_bwd(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode,
impl="auto") -> (dq, dk, dv)``
    Recomputes P from ``lse`` (the saved tensors of every mode are the same: q, k, v, out,
    lse); ``dlse`` (optional) is a gradient flowing into ``lse``.  Returns new contiguous tensors
    shaped like q, k, v.

Trailing arguments, all with defaults, carry the variants (:class:`AttentionArgs`): ``softcap``,
``alibi_slopes``, ``window_left`` / ``window_right``, ``sink`` (forward only: the LSE includes
it), ``dropout_p`` and ``rng`` (the dropout seed, an int64 (1,) tensor the public functions draw
from torch's generator; the backward gets the same seed and regenerates the mask) and
``attn_mask`` (SDPA's mask, 4-D and broadcastable to (B, H, Sq, Sk); for a float mask that
requires grad, autograd calls ``attention_bwd_mask``, the same backward that also returns the
mask's gradient) and
``shift`` (an int, default 0: query ``i``'s diagonal key moves from ``i + Sk - Sq`` / ``i`` to
that plus ``shift``, and with it the causal mask, the window and ALiBi's distances; ring
attention passes how far behind the query chunk the key chunk sits in the sequence), then
``acc_out`` (forward: O in the accumulator dtype, before its rounding), ``drop_offset``
(dropout: query row i and key j draw the mask bits of row ``i + drop_offset`` and key ``j +
drop_offset - shift`` of a longer sequence; multiples of 16) and ``deterministic`` (the
backward must be bitwise reproducible: no path whose sums are atomics; the forward op only
passes it to its backward).

``mode`` names the algorithm (:data:`MODES`): ``fa2`` (default), ``fa1`` (FA1's loop order,
O/l/m in HBM) or ``tiling`` (split-KV: key chunks in parallel, merged like the tiling softmax).
``impl`` names the implementation (:data:`IMPLS`): ``auto`` runs the Triton kernels where they
can run (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import) and
the PyTorch path (:mod:`flash_module.reference`) elsewhere; ``triton`` insists on the kernels;
``torch`` forces the PyTorch path on any device.  :data:`ALGORITHMS` maps each (mode, impl) to
its forward and backward; nothing else in the package branches on modes.

Autograd is registered on the forward (it saves q, k, v, out and lse, never P); the backward
op itself is not differentiable (double backward raises).

The public functions call the hot ops through :func:`call`: in plain eager code it runs the op's
Python body directly (the dispatcher costs tens of microseconds per call, as much as a decode
step's kernels), and under compile, tracing, export, dispatch modes or autograd it goes through
the registered op.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference
from ._runtime import acc_dtype, device_guard, interpreting, lse_dtype, use_triton

__all__ = ["ALGORITHMS", "IMPLS", "MODES", "VARLEN_ALGORITHMS", "AttentionArgs", "Implementation",
           "VarlenImplementation", "attention_bwd", "attention_bwd_mask", "attention_fwd", "check_mode",
           "check_varlen_mode",
           "interpreting", "kvcache_append", "kvcache_fwd", "merge_attention_states", "resolve_impl",
           "routes_to_split_kv", "varlen_bwd", "varlen_fwd"]


@dataclass(frozen=True)
class AttentionArgs:
    """The non-tensor arguments of one attention call, as every implementation receives them.

    This is where new variants add their parameters (window, softcap, ALiBi, ...): the table's
    functions all take the same object, so no call site changes when one is added.
    """

    softmax_scale: float
    causal: bool
    causal_offset: int  # query i sees key j <= i + causal_offset (Sk - Sq bottom-right, 0 top-left; + shift)
    num_splits: int = 0  # tiling: key chunks (0 = automatic)
    softcap: float = 0.0  # > 0: scores -> softcap * tanh(scores / softcap) (flash-attn's softcap)
    alibi_slopes: Tensor | None = None  # fp32 (H,) or (B, H): bias -slope * |i + Sk - Sq - j|
    window: tuple[int, int] = (-1, -1)  # (left, right): keys [i + offset - left, i + offset + right]
    sink: Tensor | None = None  # fp32 (H,): attention-sink logits, in every row's denominator
    dropout_p: float = 0.0  # probability of dropping each attention probability (Philox, in the kernels)
    rng: Tensor | None = None  # int64 (1,) seed of the dropout mask, drawn from torch's generator
    attn_mask: Tensor | None = None  # SDPA's mask: bool (True = attend) or additive float, 4-D, broadcastable
    shift: int = 0  # the part of causal_offset beyond the alignment (ring attention's chunk distance)
    mask_grad: bool = False  # backward: also return the float attn_mask's gradient (fa2 only)
    out_dtype: torch.dtype | None = None  # forward: O's dtype (None: q's; the ring merges fp32 partials)
    drop_offset: int = 0  # dropout: query row 0 is row drop_offset of a longer sequence's mask (ring chunks)
    deterministic: bool = False  # backward: bitwise reproducible (no atomic sums; flash-attn's argument)

    @property
    def drop_offsets(self) -> tuple[int, int]:
        """Where this call's query rows and keys sit in the dropout mask: ``(drop_offset,
        drop_offset - shift)`` (a ring step's query chunk and key chunk starts)."""
        return self.drop_offset, self.drop_offset - self.shift

    def dropout(self) -> reference.Dropout | None:
        """The PyTorch path's dropout (dense row counters), or None."""
        if not self.dropout_p:
            return None
        rows, cols = self.drop_offsets
        return reference.Dropout(self.dropout_p, self.rng, row0=rows, col0=cols)

    @property
    def bottom_right(self) -> bool:
        """The PyTorch path's flag: its offset is Sk - Sq when set, else 0 (equal when Sq == Sk),
        plus ``shift``."""
        return self.causal_offset - self.shift != 0


@dataclass(frozen=True)
class Implementation:
    """One implementation of an algorithm: ``forward(q, k, v, args) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, dlse, args) -> (dq, dk, dv)``."""

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


# -- Triton (compiled on CUDA, interpreted on CPU); imported on first use ----------------------


#: Decode routing: FA2's grid has cdiv(Sq, BLOCK_M) programs per (batch, head), so with a few
#: query tokens it leaves most of the GPU idle (measured on an H200, bf16, GQA 32/8, D=128:
#: 0.25-1.0 TB/s of K/V read for Sq = 1 and 8, against 1.9-4.1 for split-KV).  Queries up to
#: this long over at least DECODE_MIN_KEYS keys run the split-KV kernel instead.
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS = 256


def routes_to_split_kv(q: Tensor, k: Tensor) -> bool:
    """Whether ``mode="fa2"`` on the Triton path runs the split-KV kernel for (B, Sq, H, D) ``q``
    and (B, Sk, H_kv, D) ``k``: decode-like shapes (a few queries, many keys).  Shapes only, so
    the choice compiles and captures; the result is the same attention (same LSE, same
    backward), only the parallelisation differs."""
    return q.shape[1] <= DECODE_MAX_QUERIES and k.shape[1] >= DECODE_MIN_KEYS


def _fa2_fwd_triton(q, k, v, a: AttentionArgs):
    if routes_to_split_kv(q, k) and not a.dropout_p:
        from .kernels.split_kv import split_kv_forward

        return split_kv_forward(q, k, v, a.softmax_scale, a.causal, a.causal_offset, 0, a.softcap,
                                a.alibi_slopes, a.window, a.sink, a.attn_mask,  # (masks too; not dropout)
                                out_dtype=a.out_dtype)
    from .kernels.fa2_fwd import fa2_forward

    return fa2_forward(q, k, v, a.softmax_scale, a.causal, a.causal_offset, softcap=a.softcap,
                       alibi_slopes=a.alibi_slopes, window_size=a.window, sink=a.sink, dropout_p=a.dropout_p,
                       rng=a.rng, attn_mask=a.attn_mask, out_dtype=a.out_dtype, drop_offsets=a.drop_offsets)


def _fa2_bwd_triton(dout, q, k, v, out, lse, dlse, a: AttentionArgs):
    from .kernels.fa2_bwd import fa2_backward

    return fa2_backward(dout, q, k, v, out, lse, dlse, a.softmax_scale, a.causal, a.causal_offset,
                        softcap=a.softcap, alibi_slopes=a.alibi_slopes, window_size=a.window,
                        dropout_p=a.dropout_p, rng=a.rng, attn_mask=a.attn_mask, mask_grad=a.mask_grad,
                        drop_offsets=a.drop_offsets, deterministic=a.deterministic)


def _no_variants(mode: str, a: AttentionArgs) -> None:
    """NotImplementedError naming the mode and the variant it lacks."""
    for name, used in (("softcap", bool(a.softcap)), ("alibi_slopes", a.alibi_slopes is not None),
                       ("window_size", a.window != (-1, -1)), ("learnable_sink", a.sink is not None)):
        if used:
            raise NotImplementedError(f"mode={mode!r} does not support {name} (use mode='fa2' or 'tiling')")
    _fa2_only(mode, a)


def _fa2_only(mode: str, a: AttentionArgs) -> None:
    """NotImplementedError for the variants only FA2 has (dropout, an attention mask) in ``mode``."""
    if a.dropout_p:
        raise NotImplementedError(f"mode={mode!r} does not support dropout_p > 0 (use mode='fa2')")
    if a.attn_mask is not None:
        raise NotImplementedError(f"mode={mode!r} does not support attn_mask (use mode='fa2')")


def _fa1_fwd_triton(q, k, v, a: AttentionArgs):
    from .kernels.fa1 import fa1_forward

    _no_variants("fa1", a)
    return fa1_forward(q, k, v, a.softmax_scale, a.causal, a.causal_offset, a.out_dtype)


def _fa1_bwd_triton(dout, q, k, v, out, lse, dlse, a: AttentionArgs):
    from .kernels.fa1 import fa1_backward

    _no_variants("fa1", a)
    return fa1_backward(dout, q, k, v, out, lse, dlse, a.softmax_scale, a.causal, a.causal_offset)


def _tiling_fwd_triton(q, k, v, a: AttentionArgs):
    from .kernels.split_kv import split_kv_forward

    _fa2_only("tiling", a)
    return split_kv_forward(q, k, v, a.softmax_scale, a.causal, a.causal_offset, a.num_splits, a.softcap,
                            a.alibi_slopes, a.window, a.sink, out_dtype=a.out_dtype)


# -- PyTorch (any device) -----------------------------------------------------------------------


def _fa2_fwd_torch(q, k, v, a: AttentionArgs):
    return reference.fa2_forward(q, k, v, a.softmax_scale, a.causal, a.bottom_right, softcap=a.softcap,
                                 alibi_slopes=a.alibi_slopes, window_size=a.window, sink=a.sink,
                                 dropout=a.dropout(), attn_mask=a.attn_mask, shift=a.shift,
                                 out_dtype=a.out_dtype)


def _fa1_fwd_torch(q, k, v, a: AttentionArgs):
    _no_variants("fa1", a)
    return reference.fa1_forward(q, k, v, a.softmax_scale, a.causal, a.bottom_right, shift=a.shift,
                                 out_dtype=a.out_dtype)


def _tiling_fwd_torch(q, k, v, a: AttentionArgs):
    _fa2_only("tiling", a)
    return reference.split_kv_forward(q, k, v, a.softmax_scale, a.causal, a.bottom_right, a.num_splits or 4,
                                      softcap=a.softcap, alibi_slopes=a.alibi_slopes, window_size=a.window,
                                      sink=a.sink, shift=a.shift, out_dtype=a.out_dtype)


def _fa2_bwd_torch(dout, q, k, v, out, lse, dlse, a: AttentionArgs):
    return reference.fa2_backward(dout, q, k, v, out, lse, a.softmax_scale, a.causal, a.bottom_right,
                                  dlse=dlse, softcap=a.softcap, alibi_slopes=a.alibi_slopes,
                                  window_size=a.window, dropout=a.dropout(), attn_mask=a.attn_mask,
                                  mask_grad=a.mask_grad, shift=a.shift)


#: algorithm -> implementation -> (forward, backward).  The split-KV forward's merged LSE is the
#: full row's LSE, so ``tiling`` shares FA2's backward; so does FA1 on the PyTorch path.
ALGORITHMS: dict[str, dict[str, Implementation]] = {
    "fa2": {
        "triton": Implementation(_fa2_fwd_triton, _fa2_bwd_triton),
        "torch": Implementation(_fa2_fwd_torch, _fa2_bwd_torch),
    },
    "fa1": {
        "triton": Implementation(_fa1_fwd_triton, _fa1_bwd_triton),
        "torch": Implementation(_fa1_fwd_torch, _fa2_bwd_torch),
    },
    "tiling": {
        "triton": Implementation(_tiling_fwd_triton, _fa2_bwd_triton),
        "torch": Implementation(_tiling_fwd_torch, _fa2_bwd_torch),
    },
}

#: Algorithms of the attention ops (docs/algorithms.md).
MODES: tuple[str, ...] = tuple(ALGORITHMS)
#: Implementations: ``auto`` (Triton where it can run, else PyTorch), ``triton``, ``torch``.
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")


def _first_frame_outside_package() -> int:
    """The ``stacklevel`` of the caller's code: the first frame outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def check_mode(mode: str, impl: str = "auto") -> tuple[str, str]:
    """Validate a (mode, impl) pair; returns it, with the deprecated ``mode="reference"``
    translated to ``("fa2", "torch")``.  ValueError naming the valid values otherwise."""
    if mode == "reference":
        warnings.warn('mode="reference" is deprecated: the PyTorch path is an implementation, '
                      'select it with impl="torch" (mode names the algorithm)', DeprecationWarning,
                      stacklevel=_first_frame_outside_package())
        mode, impl = "fa2", "torch"
    if mode not in ALGORITHMS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return mode, impl


def resolve_impl(t: Tensor, impl: str) -> str:
    """The implementation that runs for tensors like ``t``: ``"triton"`` or ``"torch"``."""
    if impl == "torch":
        return "torch"
    if use_triton(t):
        return "triton"
    if impl == "triton":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"import; got a {t.device.type} tensor (use impl='auto' or 'torch')"
        )
    return "torch"


def which_implementation(t: Tensor, impl: str = "auto") -> str:
    """In words, what an attention call on tensors like ``t`` runs with ``impl``: the Triton
    kernels compiled for the GPU, the Triton kernels under the interpreter, or the PyTorch path.

    >>> which_implementation(torch.zeros(1))  # a CPU tensor without TRITON_INTERPRET=1
    'PyTorch path (flash_module/reference.py)'
    """
    if resolve_impl(t, check_mode("fa2", impl)[1]) == "torch":
        return "PyTorch path (flash_module/reference.py)"
    if t.device.type == "cuda":
        return f"Triton kernels compiled for {torch.cuda.get_device_name(t.device)}"
    return "Triton kernels under the interpreter (TRITON_INTERPRET=1: exact but slow, for testing)"


def _implementation(mode: str, impl: str, t: Tensor) -> Implementation:
    mode, impl = check_mode(mode, impl)
    return ALGORITHMS[mode][resolve_impl(t, impl)]


def _args(q: Tensor, k: Tensor, softmax_scale: float, causal: bool, bottom_right: bool,
          num_splits: int = 0, softcap: float = 0.0, alibi_slopes: Tensor | None = None,
          window: tuple[int, int] = (-1, -1), sink: Tensor | None = None, dropout_p: float = 0.0,
          rng: Tensor | None = None, attn_mask: Tensor | None = None, shift: int = 0,
          mask_grad: bool = False, out_dtype: torch.dtype | None = None,
          drop_offset: int = 0, deterministic: bool = False) -> AttentionArgs:
    offset = (k.shape[1] - q.shape[1] if bottom_right else 0) + int(shift)
    return AttentionArgs(float(softmax_scale), bool(causal), offset, int(num_splits), float(softcap),
                         alibi_slopes, (int(window[0]), int(window[1])), sink, float(dropout_p), rng,
                         attn_mask, int(shift), bool(mask_grad), out_dtype, int(drop_offset),
                         bool(deterministic))


def _lse_without_work(q: Tensor, k: Tensor, causal: bool, bottom_right: bool,
                      window: tuple[int, int] = (-1, -1), shift: int = 0) -> Tensor:
    """The (B, H, Sq) LSE when there is nothing to compute: -inf without keys; with head dim 0
    every score is 0, so the LSE is log(number of visible keys) (shapes only, no sync)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    acc = lse_dtype(q.dtype)
    if d != 0 or sk == 0:
        return torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    left, right = window
    right = 0 if causal else right
    diag = torch.arange(sq, device=q.device, dtype=acc) + (sk - sq if bottom_right else 0) + shift
    first = (diag - left).clamp(min=0) if left >= 0 else torch.zeros_like(diag)
    end = (diag + right + 1).clamp(max=sk) if right >= 0 else torch.full_like(diag, sk)
    seen = (end - first).clamp(min=0)
    return seen.log().expand(b, h, sq).contiguous()


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


#: Python bodies of the ops :func:`call` may run directly, keyed by op.
_BODIES: dict[object, Callable] = {}


def _op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable:
    """``torch.library.custom_op("flash_module::<name>")``, remembering the body for :func:`call`."""
    def register(fn: Callable):
        op = torch.library.custom_op(f"flash_module::{name}", mutates_args=mutates_args)(fn)
        _BODIES[op] = fn
        return op
    return register


def _plain_eager(args: tuple) -> bool:
    """Whether a call with ``args`` is plain eager code, where the dispatcher would only forward
    to the body: no torch.compile / jit trace / export, no dispatch or function mode (fake or
    functional tensors, make_fx, opcheck), no functorch transform, plain tensors only and none
    that autograd must track."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) is not Tensor or (grad and a.requires_grad)):
            return False
    return True


def call(op, *args):
    """Run the flash_module op ``op`` on ``args``: its body directly in plain eager code (see
    :func:`_plain_eager`), through the dispatcher otherwise.  The results are the same; an op
    that mutates its inputs bumps their version counters either way."""
    body = _BODIES.get(op)
    if body is None or not _plain_eager(args):
        return op(*args)
    result = body(*args)
    for i in _MUTATED.get(op, ()):
        torch.autograd.graph.increment_version(args[i])
    return result


def _sink_grad_torch(sink: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dlse: Tensor | None) -> Tensor:
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # (B, H, Sq): lse's layout
    if dlse is not None:
        delta = delta - dlse.to(acc)
    p_sink = torch.where(torch.isinf(lse), 0.0, torch.exp(sink.to(acc).view(1, -1, 1) - lse))
    return -(p_sink * delta).sum((0, 2)).to(sink.dtype)


@_op("sink_grad")
def sink_grad_op(sink: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dlse: Tensor | None) -> Tensor:
    """The attention sinks' gradient (:func:`sink_grad`) on the dense layout: ``out``/``dout``
    (B, Sq, H, D), ``lse``/``dlse`` (B, H, Sq)."""
    if use_triton(out):
        from .kernels._common import sink_grad as kernel

        with device_guard(out):
            return kernel(sink, _last_dim_contiguous(out), _last_dim_contiguous(dout), lse.contiguous(),
                          dlse.contiguous() if dlse is not None else None)
    return _sink_grad_torch(sink, out, dout, lse, dlse)


@sink_grad_op.register_fake
def _sink_grad_fake(sink, out, dout, lse, dlse):
    return sink.new_empty(sink.shape)


def sink_grad(sink: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dlse: Tensor | None,
              head_dim: int = 1) -> Tensor:
    """The attention sinks' gradient: ``dsink_h = -sum over rows of P_sink * delta``, with
    ``P_sink = exp(sink_h - lse)`` (the sink's share of the row) and ``delta = rowsum(dO * O) -
    dlse`` (a sink's logit moves every P of its row by ``-P_sink``).  ``lse`` has its heads on
    ``head_dim`` ((B, H, Sq): 1; varlen's (H, Tq): 0, handled as one sequence of Tq rows); rows
    with LSE -inf (in no sequence) contribute 0.  One pass over O and dO in a kernel (the
    ``sink_grad`` op), torch ops on the PyTorch path; no sync."""
    if head_dim == 0:  # varlen: (Tq, H, D) and (H, Tq) are one batch of Tq rows
        out, dout, lse = out[None], dout[None], lse[None]
        dlse = dlse[None] if dlse is not None else None
    return call(sink_grad_op, sink, out, dout, lse, dlse)


@_op("attention_fwd")
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    mode: str,
    num_splits: int = 0,
    impl: str = "auto",
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sink: Tensor | None = None,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    attn_mask: Tensor | None = None,
    shift: int = 0,
    acc_out: bool = False,
    drop_offset: int = 0,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    fn = _implementation(mode, impl, q).forward
    out_dtype = acc_dtype(q.dtype) if acc_out else None
    _check_rng(dropout_p, rng)
    _check_drop_offset(dropout_p, drop_offset, shift)
    b, sq, h, d = q.shape
    window = (window_left, window_right)
    if q.numel() == 0 or k.shape[1] == 0:  # nothing to compute: an empty output or no key
        out = torch.zeros((b, sq, h, d), dtype=out_dtype or q.dtype, device=q.device)
        lse = _lse_without_work(q, k, causal, bottom_right, window, shift)
        if attn_mask is not None and k.shape[1]:  # head dim 0: scores 0, the mask alone decides
            mask = reference.additive_mask(attn_mask, lse.dtype).expand(b, h, sq, k.shape[1])
            lse = torch.logsumexp(mask, -1)
        if sink is not None:
            lse = torch.logaddexp(lse, sink.to(lse.dtype).view(1, -1, 1))
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    with device_guard(q):
        args = _args(q, k, softmax_scale, causal, bottom_right, num_splits, softcap, alibi_slopes, window,
                     sink, dropout_p, rng, attn_mask, shift, out_dtype=out_dtype, drop_offset=drop_offset)
        out, lse = fn(q, k, v, args)
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, softmax_scale, causal, bottom_right, mode, num_splits=0, impl="auto",
                        softcap=0.0, alibi_slopes=None, window_left=-1, window_right=-1, sink=None,
                        dropout_p=0.0, rng=None, attn_mask=None, shift=0, acc_out=False, drop_offset=0,
                        deterministic=False):
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d), dtype=acc_dtype(q.dtype) if acc_out else q.dtype)
    lse = q.new_empty((b, h, sq), dtype=lse_dtype(q.dtype))
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
    impl: str = "auto",
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    attn_mask: Tensor | None = None,
    shift: int = 0,
    drop_offset: int = 0,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode, impl, softcap,
                     alibi_slopes, (window_left, window_right), dropout_p, rng, attn_mask, shift,
                     drop_offset=drop_offset, deterministic=deterministic)


def _backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode, impl, softcap,
              alibi_slopes, window, dropout_p, rng, attn_mask, shift, mask_grad: bool = False,
              drop_offset: int = 0, deterministic: bool = False) -> tuple:
    """The body of both backward ops: ``(dq, dk, dv)``, and with ``mask_grad`` the float mask's
    gradient too (shaped and typed like the mask), from the algorithm table's backward."""
    _check_rng(dropout_p, rng)
    _check_drop_offset(dropout_p, drop_offset, shift)
    if q.numel() == 0 or k.numel() == 0:
        masks = (attn_mask,) if mask_grad else ()
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, *masks))
    fn = _implementation(mode, impl, q).backward
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    with device_guard(q):
        args = _args(q, k, softmax_scale, causal, bottom_right, softcap=softcap, alibi_slopes=alibi_slopes,
                     window=window, dropout_p=dropout_p, rng=rng, attn_mask=attn_mask, shift=shift,
                     mask_grad=mask_grad, drop_offset=drop_offset, deterministic=deterministic)
        grads = fn(dout, q, k, v, out, lse, dlse, args)
    if mask_grad:
        grads = (*grads[:3], grads[3].to(attn_mask.dtype))
    return tuple(g.contiguous() for g in grads)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode,
                        impl="auto", softcap=0.0, alibi_slopes=None, window_left=-1, window_right=-1,
                        dropout_p=0.0, rng=None, attn_mask=None, shift=0, drop_offset=0, deterministic=False):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@_op("attention_bwd_mask")
def attention_bwd_mask(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    attn_mask: Tensor,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    mode: str,
    impl: str = "auto",
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    shift: int = 0,
    drop_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`attention_bwd` for a float ``attn_mask`` that requires grad: also returns the mask's
    gradient, shaped and typed like the mask (dS w.r.t. the scaled scores, summed over the dims
    it broadcasts).  The Triton path adds it up in the dQ kernel (atomics where the mask
    broadcasts, so those sums are not bitwise reproducible: under
    ``torch.use_deterministic_algorithms(True)`` such masks take the PyTorch path)."""
    if check_mode(mode, impl)[0] != "fa2":
        raise NotImplementedError(f"mode={mode!r} does not support attn_mask (use mode='fa2')")
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (B, H, Sq, Sk)
    broadcast = any(m == 1 < n for m, n in zip(attn_mask.shape, shape))
    if broadcast and torch.are_deterministic_algorithms_enabled():
        impl = "torch"  # the kernels' atomic sums over broadcast dims are not bitwise reproducible
    return _backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right, mode, impl, softcap,
                     alibi_slopes, (window_left, window_right), dropout_p, rng, attn_mask, shift,
                     mask_grad=True, drop_offset=drop_offset)


@attention_bwd_mask.register_fake
def _attention_bwd_mask_fake(dout, q, k, v, out, lse, dlse, attn_mask, softmax_scale, causal, bottom_right,
                             mode, impl="auto", softcap=0.0, alibi_slopes=None, window_left=-1,
                             window_right=-1, dropout_p=0.0, rng=None, shift=0, drop_offset=0):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            attn_mask.new_empty(attn_mask.shape))


def _fwd_setup_context(ctx, inputs, output) -> None:
    (q, k, v, softmax_scale, causal, bottom_right, mode, _num_splits, impl, softcap, alibi_slopes,
     window_left, window_right, sink, dropout_p, rng, attn_mask, shift, _acc_out, drop_offset,
     deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, sink, rng, attn_mask)
    ctx.drop_offset = drop_offset
    ctx.deterministic = deterministic
    ctx.mask_grad = attn_mask is not None and attn_mask.requires_grad
    ctx.args = (softmax_scale, causal, bottom_right, mode, impl, softcap)
    ctx.window = (window_left, window_right)
    ctx.dropout_p = dropout_p
    ctx.shift = shift
    # (needs_input_grad covers only the arguments the caller passed: ask the sink itself)
    ctx.sink_grad = sink is not None and sink.requires_grad
    ctx.set_materialize_grads(False)  # dlse stays None unless the caller used lse


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, sink, rng, attn_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    out, dout = out.to(q.dtype), dout.to(q.dtype)  # (acc_out: the kernels take q's dtype)
    dmask = None
    if ctx.mask_grad:  # one backward that also sums dS into the mask's gradient
        dq, dk, dv, dmask = attention_bwd_mask(dout, q, k, v, out, lse, dlse, attn_mask.detach(), *ctx.args,
                                               alibi_slopes, *ctx.window, ctx.dropout_p, rng, ctx.shift,
                                               ctx.drop_offset)
    else:
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, *ctx.args, alibi_slopes, *ctx.window,
                                   ctx.dropout_p, rng, attn_mask, ctx.shift, ctx.drop_offset,
                                   ctx.deterministic)
    dsink = sink_grad(sink, out, dout, lse, dlse) if ctx.sink_grad else None
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, dsink, None, None, dmask,
            None, None, None, None)


def _check_drop_offset(dropout_p: float, drop_offset: int, shift: int) -> None:
    """Dropout's mask comes in 16 x 16 tiles (:func:`.kernels._common.dropout_keep`): a call placed
    inside a longer sequence's mask must start its rows and keys on tile boundaries."""
    if dropout_p and (drop_offset % 16 or (drop_offset - shift) % 16):
        raise ValueError(f"dropout with drop_offset={drop_offset}, shift={shift}: the rows' and keys' places "
                         f"in the mask ({drop_offset}, {drop_offset - shift}) must be multiples of 16")


def _check_rng(dropout_p: float, rng: Tensor | None) -> None:
    """Dropout needs its seed: an int64 tensor with one element (the public functions draw it)."""
    if dropout_p and (rng is None or rng.dtype != torch.int64 or rng.numel() != 1):
        raise ValueError(f"dropout_p={dropout_p} needs rng, an int64 tensor of one element (the seed), got "
                         f"{None if rng is None else (rng.dtype, tuple(rng.shape))}")


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
torch.library.register_autograd("flash_module::attention_bwd_mask", _no_double_backward,
                                setup_context=_bwd_setup_context)


# ---------------------------------------------------------------------------------------------
# varlen: packed variable-length sequences (flash-attn's varlen layout)
# ---------------------------------------------------------------------------------------------
#
# ``varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale, causal, mode, impl)
# -> (out, lse)``: q (Tq, H, D), k/v (Tk, H_kv, D) hold B sequences back to back, sequence b at
# rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (k/v: cu_seqlens_k); cu_seqlens_* int32 (B + 1),
# seqused_k int32 (B) or None (sequence b uses only its first seqused_k[b] keys).  ``out`` is a
# new contiguous (Tq, H, D) tensor, ``lse`` a contiguous (H, Tq) one in ``lse_dtype``.  Causal is
# bottom-right per sequence.  Rows in no sequence get out = 0, lse = -inf.  No host sync on the
# Triton path: grids come from shapes; offsets are clamped in the kernels.
# ``varlen_bwd(dout, q, k, v, out, lse, dlse, <same metadata>) -> (dq, dk, dv)``.


@dataclass(frozen=True)
class VarlenImplementation:
    """``forward(q, k, v, cu_q, cu_k, seqused_k, scale, causal, block_table) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, scale, causal) -> (dq, dk, dv)``."""

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _varlen_fwd_triton(q, k, v, cu_q, cu_k, seqused_k, scale, causal, block_table=None, softcap=0.0,
                       alibi_slopes=None, window=(-1, -1), sink=None, dropout_p=0.0, rng=None,
                       out_dtype=None):
    from .kernels.varlen import varlen_forward

    return varlen_forward(q, k, v, cu_q, cu_k, scale, causal, seqused_k, block_table, softcap, alibi_slopes,
                          window, sink, dropout_p, rng, out_dtype)


def _varlen_bwd_triton(dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, scale, causal, softcap=0.0,
                       alibi_slopes=None, window=(-1, -1), dropout_p=0.0, rng=None):
    from .kernels.varlen import varlen_backward

    return varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, seqused_k, dlse, softcap,
                           alibi_slopes, window, dropout_p, rng)


def _varlen_fwd_torch(q, k, v, cu_q, cu_k, seqused_k, scale, causal, block_table=None, softcap=0.0,
                      alibi_slopes=None, window=(-1, -1), sink=None, dropout_p=0.0, rng=None, out_dtype=None):
    return reference.varlen_forward(q, k, v, cu_q, cu_k, scale, causal, seqused_k, block_table, softcap,
                                    alibi_slopes, window, sink, dropout_p, rng, out_dtype)


def _varlen_bwd_torch(dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, scale, causal, softcap=0.0,
                      alibi_slopes=None, window=(-1, -1), dropout_p=0.0, rng=None):
    return reference.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, seqused_k, dlse,
                                     softcap, alibi_slopes, window, dropout_p, rng)


#: The varlen table: algorithm -> implementation.  Only FA2 has varlen kernels; the other modes
#: raise NotImplementedError (:func:`check_varlen_mode`).
VARLEN_ALGORITHMS: dict[str, dict[str, VarlenImplementation]] = {
    "fa2": {
        "triton": VarlenImplementation(_varlen_fwd_triton, _varlen_bwd_triton),
        "torch": VarlenImplementation(_varlen_fwd_torch, _varlen_bwd_torch),
    },
}


def check_varlen_mode(mode: str, impl: str = "auto") -> tuple[str, str]:
    """:func:`check_mode`, plus NotImplementedError for modes without a varlen implementation."""
    mode, impl = check_mode(mode, impl)
    if mode not in VARLEN_ALGORITHMS:
        raise NotImplementedError(
            f"mode={mode!r} has no varlen implementation (packed sequences run with mode in "
            f"{tuple(VARLEN_ALGORITHMS)})"
        )
    return mode, impl


def _varlen_implementation(mode: str, impl: str, t: Tensor) -> VarlenImplementation:
    mode, impl = check_varlen_mode(mode, impl)
    return VARLEN_ALGORITHMS[mode][resolve_impl(t, impl)]


@_op("varlen_fwd")
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    seqused_k: Tensor | None,
    softmax_scale: float,
    causal: bool,
    mode: str = "fa2",
    impl: str = "auto",
    block_table: Tensor | None = None,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sink: Tensor | None = None,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    acc_out: bool = False,
) -> tuple[Tensor, Tensor]:
    fn = _varlen_implementation(mode, impl, q).forward
    _check_rng(dropout_p, rng)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    with device_guard(q):
        out, lse = fn(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, float(softmax_scale), bool(causal),
                      block_table, float(softcap), alibi_slopes, (int(window_left), int(window_right)), sink,
                      float(dropout_p), rng, acc_dtype(q.dtype) if acc_out else None)
    return out.contiguous(), lse.contiguous()


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale, causal, mode="fa2",
                     impl="auto", block_table=None, softcap=0.0, alibi_slopes=None, window_left=-1,
                     window_right=-1, sink=None, dropout_p=0.0, rng=None, acc_out=False):
    tq, h, d = q.shape
    out = q.new_empty((tq, h, d), dtype=acc_dtype(q.dtype) if acc_out else q.dtype)
    return out, q.new_empty((h, tq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flash_module::varlen_bwd", mutates_args=())
def varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    seqused_k: Tensor | None,
    softmax_scale: float,
    causal: bool,
    mode: str = "fa2",
    impl: str = "auto",
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _varlen_implementation(mode, impl, q).backward
    _check_rng(dropout_p, rng)
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    with device_guard(q):
        dq, dk, dv = fn(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                        float(softmax_scale), bool(causal), float(softcap), alibi_slopes,
                        (int(window_left), int(window_right)), float(dropout_p), rng)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale,
                     causal, mode="fa2", impl="auto", softcap=0.0, alibi_slopes=None, window_left=-1,
                     window_right=-1, dropout_p=0.0, rng=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _varlen_setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, seqused_k, softmax_scale, causal, mode, impl, block_table, softcap, alibi,
     window_left, window_right, sink, dropout_p, rng, _acc_out) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seqused_k, alibi, sink, rng)
    ctx.dropout_p = dropout_p
    ctx.sink_grad = sink is not None and sink.requires_grad
    ctx.args = (softmax_scale, causal, mode, impl, softcap)
    ctx.window = (window_left, window_right)
    ctx.paged = block_table is not None
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, dout, dlse):
    if ctx.paged:
        raise NotImplementedError("flash_module: the varlen backward does not support paged K/V "
                                  "(block_table); paged caches are for inference")
    q, k, v, out, lse, cu_q, cu_k, seqused_k, alibi_slopes, sink, rng = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    out, dout = out.to(q.dtype), dout.to(q.dtype)  # (acc_out: the kernels take q's dtype)
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, *ctx.args, alibi_slopes,
                            *ctx.window, ctx.dropout_p, rng)
    dsink = sink_grad(sink, out, dout, lse, dlse, head_dim=0) if ctx.sink_grad else None
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, dsink, None,
            None, None)


torch.library.register_autograd("flash_module::varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)
torch.library.register_autograd("flash_module::varlen_bwd", _no_double_backward,
                                setup_context=_bwd_setup_context)


# ---------------------------------------------------------------------------------------------
# KV cache (decoding, inference only): append in place, attend over the cache
# ---------------------------------------------------------------------------------------------
#
# ``kvcache_append(k_cache!, v_cache!, k_new, v_new, cache_seqlens, cache_batch_idx, block_table,
# impl) -> ()`` writes k_new/v_new (B, S_new, H_kv, D) at positions cache_seqlens[b] + i of each
# batch's cache (contiguous (B_cache, S_cache, H_kv, D), row cache_batch_idx[b]; or paged
# (num_pages, page, H_kv, D) through block_table (B, pages_per_seq)).
# ``kvcache_fwd(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
# causal, num_splits, impl, ..., new_tokens) -> (out (B, Sq, H, D), lse (B, H, Sq))``: batch b
# attends to its first cache_seqlens[b] + new_tokens keys (the split-KV kernel, GQA heads packed
# for decode; num_splits 0 = auto).
# No autograd (inference only).  No host sync on the Triton path.


@_op("kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    impl: str = "auto",
) -> None:
    if resolve_impl(k_cache, check_mode("fa2", impl)[1]) == "triton":
        from .kernels.kvcache import kvcache_append as append

        with device_guard(k_cache):
            append(k_cache, v_cache, _last_dim_contiguous(k_new), _last_dim_contiguous(v_new), cache_seqlens,
                   cache_batch_idx, block_table)
    else:
        reference.kvcache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table)


@kvcache_append.register_fake
def _kvcache_append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table,
                         impl="auto"):
    return None


#: Positions of the arguments each op mutates (for :func:`call`'s version bumps).
_MUTATED: dict[object, tuple[int, ...]] = {kvcache_append: (0, 1)}


@_op("kvcache_fwd")
def kvcache_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    softmax_scale: float,
    causal: bool,
    num_splits: int = 0,
    impl: str = "auto",
    cache_leftpad: Tensor | None = None,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sink: Tensor | None = None,
    new_tokens: int = 0,
) -> tuple[Tensor, Tensor]:
    b, sq, h, d = q.shape
    window = (int(window_left), int(window_right))
    if cache_leftpad is not None and block_table is not None:
        raise ValueError("cache_leftpad cannot be used with block_table (paged caches), as in flash-attn")
    no_keys = k_cache.shape[0] == 0 or k_cache.shape[1] == 0
    no_keys = no_keys or (block_table is not None and block_table.shape[1] == 0)
    if q.numel() == 0 or no_keys:
        lse = torch.full((b, h, sq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        if sink is not None:
            lse = torch.logaddexp(lse, sink.to(lse.dtype).view(1, -1, 1))
        return torch.zeros((b, sq, h, d), dtype=q.dtype, device=q.device), lse
    if resolve_impl(q, check_mode("fa2", impl)[1]) == "triton":
        from .kernels.split_kv import split_kv_cache_forward

        with device_guard(q):
            out, lse = split_kv_cache_forward(
                _last_dim_contiguous(q), _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache),
                cache_seqlens, cache_batch_idx, block_table, float(softmax_scale), bool(causal),
                int(num_splits), cache_leftpad, float(softcap), alibi_slopes, window, sink, int(new_tokens))
    else:
        if new_tokens:
            cache_seqlens = cache_seqlens + new_tokens
        out, lse = reference.kvcache_forward(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table,
                                             float(softmax_scale), bool(causal), cache_leftpad,
                                             float(softcap), alibi_slopes, window, sink)
    return out.contiguous(), lse.contiguous()


@kvcache_fwd.register_fake
def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, softmax_scale, causal,
                      num_splits=0, impl="auto", cache_leftpad=None, softcap=0.0, alibi_slopes=None,
                      window_left=-1, window_right=-1, sink=None, new_tokens=0):
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=lse_dtype(q.dtype))


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
