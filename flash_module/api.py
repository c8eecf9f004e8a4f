"""Public attention functions: flash-attn 2.x's family on (B, S, H, D) and torch SDPA's on (B, H, S, D).

Both layouts reach the same op without copies: SDPA-style inputs are transposed views
(B, S, H, D) of the caller's (B, H, S, D) tensors, and the kernels take any strides whose last
dim is contiguous.  Validation looks only at metadata (shapes, dtypes, devices): it never reads
tensor values, so it costs no device sync and is traced away by torch.compile.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

from . import checks, ops, reference
from ._runtime import acc_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _check_tensor(name: str, t: object, layout: str, dim: int = 4) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} (shape {tuple(t.shape)})"
        )


def _check_qkv_bshd(
    q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str], layout: str,
    shown: tuple[Tensor, Tensor, Tensor] | None = None, same_batch: bool = True,
) -> None:
    """Validate (B, S, H, D) views of the three inputs.

    ``names``/``layout`` are the caller's words and ``shown`` the caller's own tensors (for
    SDPA, the (B, H, S, D) originals), so messages show the shapes the caller passed.
    ``same_batch=False``: k and v are a KV cache, whose dim 0 is not q's batch.
    """
    nq, nk, nv = names

    def shapes() -> str:  # built only for a message: this runs on every call
        sq_, sk_, sv_ = (tuple(t.shape) for t in (shown or (q, k, v)))
        return f"{nq}: {sq_}, {nk}: {sk_}, {nv}: {sv_}, each {layout}"

    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{nq}, {nk}, {nv} must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}: {shapes()}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{nq}, {nk}, {nv} must be on the same device, got {q.device}, {k.device}, {v.device}"
        )
    if same_batch and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {shapes()}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{nk} and {nv} must have the same sequence length: {shapes()}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{nk} and {nv} must have the same number of heads: {shapes()}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"head dims differ (all of {nq}, {nk}, {nv} must share one head dim): {shapes()}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported: {shapes()}")
    if (k.shape[2] == 0 and q.shape[2] != 0) or (k.shape[2] != 0 and q.shape[2] % k.shape[2] != 0):
        raise ValueError(
            f"number of query heads ({q.shape[2]}) must be a multiple of key/value heads "
            f"({k.shape[2]}): {shapes()}"
        )


def _autocast(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Behave like SDPA under autocast: floating inputs go to the autocast dtype of their device."""
    device_type = q.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.dtype != torch.float64 else t for t in (q, k, v))
    return q, k, v


def _check_real(name: str, x: object, allow_none: bool = False) -> None:
    """TypeError unless ``x`` is a real number (bool and str are not; torch.compile's symbolic
    floats and ints are), or None where allowed."""
    if type(x) in (float, int) or (x is None and allow_none):
        return
    if isinstance(x, (bool, str)) or not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        kind = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"{name} must be {kind}, got {type(x).__name__} {x!r}")


def _check_scale(name: str, scale: object) -> None:
    _check_real(name, scale, allow_none=True)
    if scale is None or torch.compiler.is_compiling():  # a traced scale may be symbolic
        return
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be finite, got {scale!r}")


def _window_pair(window_size: object) -> tuple[int, int]:
    """``window_size`` as a tuple of two Python ints.  flash-attn takes any pair of integers,
    0-d integer tensors included (its own tests pass ``torch.randint(0, n, (2,))``), so this
    does too; a CUDA tensor costs a host sync here, as it would there."""
    if isinstance(window_size, (tuple, list, Tensor)) and len(window_size) == 2:
        try:
            if not any(isinstance(w, bool) or (isinstance(w, Tensor) and (w.dim() or w.is_floating_point()))
                       for w in window_size):
                return operator.index(window_size[0]), operator.index(window_size[1])
        except TypeError:
            pass
    raise TypeError(f"window_size must be a pair (left, right) of ints (-1 = unbounded), got {window_size!r}")


def _check_variants(dropout_p: object, window_size: object, softcap: object,
                    alibi_slopes: object) -> tuple[int, int]:
    """Malformed values are ValueError/TypeError.  Returns ``window_size`` as two Python ints
    (:func:`_window_pair`)."""
    if (type(dropout_p) in (float, int) and dropout_p == 0 and type(softcap) in (float, int) and softcap == 0
            and alibi_slopes is None and type(window_size) is tuple and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int and window_size == (-1, -1)):
        return window_size  # the defaults (every call today): nothing to check
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    window_size = _window_pair(window_size)
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size}")
    _check_real("softcap", softcap)
    if not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None and not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    return window_size


def _check_alibi(alibi_slopes: Tensor | None, q: Tensor, batch: int, heads: int) -> None:
    """flash-attn's rule: fp32 slopes of shape (nheads,) or (batch, nheads), on q's device."""
    if alibi_slopes is None:
        return
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype} "
                        f"(shape {tuple(alibi_slopes.shape)})")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must be (nheads,) = ({heads},) or (batch, nheads) = ({batch}, "
                         f"{heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")


def _check_sink(learnable_sink: object, q: Tensor, heads: int) -> None:
    """Attention-sink logits: a floating (nheads,) tensor on q's device (any float dtype; the
    kernels read it in fp32 or wider, and its gradient comes back in its dtype)."""
    if learnable_sink is None:
        return
    if not isinstance(learnable_sink, Tensor):
        raise TypeError(f"learnable_sink must be a torch.Tensor or None, got {type(learnable_sink).__name__}")
    if not learnable_sink.is_floating_point() or tuple(learnable_sink.shape) != (heads,):
        raise ValueError(f"learnable_sink must be a floating (nheads,) = ({heads},) tensor, got "
                         f"{learnable_sink.dtype} {tuple(learnable_sink.shape)}")
    if learnable_sink.device != q.device:
        raise ValueError(f"learnable_sink must be on q's device {q.device}, got {learnable_sink.device}")


def _check_no_functorch_grad() -> None:
    """torch.func.grad / jvp (and jacrev, hessian, ...) cannot see through the custom ops' autograd:
    say so instead of torch's internal error (torch.vmap works)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - older torch
        return
    from torch._C._functorch import TransformType

    if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters()):
        raise NotImplementedError(
            "flash_module: torch.func.grad / jvp / jacrev / hessian cannot differentiate through the "
            "attention ops (torch custom ops do not support functorch autograd transforms); use "
            "torch.autograd.grad or .backward() (torch.vmap works)"
        )


def _check_num_splits(num_splits: int) -> None:
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")


def _attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None, causal: bool, bottom_right: bool,
    mode: str, num_splits: int = 0, impl: str = "auto", softcap: float = 0.0,
    alibi_slopes: Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
    learnable_sink: Tensor | None = None, dropout_p: float = 0.0, attn_mask: Tensor | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, float, Tensor | None]:
    """Run the op on validated bshd views. Returns (out, lse, scale, rng): ``rng`` is the dropout
    seed drawn for this call (None without dropout); ``deterministic``: a bitwise reproducible
    backward (flash-attn's argument)."""
    mode, impl = ops.check_mode(mode, impl)  # a mode without a variant raises in its op (ops._no_variants)
    _check_num_splits(num_splits)
    _check_no_functorch_grad()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(max(q.shape[-1], 1))
    q, k, v = _autocast(q, k, v)
    ops.resolve_impl(q, impl)  # impl="triton" where the kernels cannot run: a clear error now
    rng = dropout_seed(q.device) if dropout_p else None
    out, lse = ops.call(ops.attention_fwd, q, k, v, scale, bool(causal), bottom_right, mode, num_splits, impl,
                        float(softcap), alibi_slopes, int(window_size[0]), int(window_size[1]),
                        learnable_sink, float(dropout_p), rng, attn_mask, 0, False, 0, bool(deterministic))
    return out, lse, scale, rng


def dropout_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed, an int64 (1,) tensor drawn from torch's generator on ``device``: no
    host sync, reproducible under ``torch.manual_seed``, and a CUDA-graph replay draws a new one
    (so each replay has a new mask, as SDPA's dropout does)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _get_block_size_n(device: torch.device | str | None, head_dim: int, is_dropout: bool,
                      is_causal: bool) -> int:
    """flash-attn's key-block width for a head dim and GPU (its ``_get_block_size_n``): the
    width by which ``return_attn_probs=True`` with dropout lays out its ``S_dmask`` (see
    :func:`flash_module.reference.attention_probs`); flash-attn's tests normalise it with the
    same function.  Non-CUDA devices use the sm90 (and sm80) rule."""
    major, minor = (torch.cuda.get_device_capability(device) if torch.device(device or "cpu").type == "cuda"
                    else (9, 0))
    sm8x = major == 8 and minor > 0
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        if sm8x:
            return 64 if (not is_dropout and is_causal) else 32
        return 32 if is_dropout else 64
    return 64


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    num_splits: int = 0,
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """flash-attn 2.x's ``flash_attn_func``: softmax(q k^T * scale) v on (B, S, H, D) tensors.

    Args:
        q: (batch, seqlen_q, nheads, headdim), float16/bfloat16/float32/float64.
        k, v: (batch, seqlen_k, nheads_k, headdim); ``nheads % nheads_k == 0`` (GQA/MQA).
            Any strides with a contiguous last dim (e.g. slices of a packed QKV) run without copies.
        softmax_scale: default ``1 / sqrt(headdim)``.
        causal: causal mask aligned to the bottom-right corner of the (Sq, Sk) score matrix,
            as in flash-attn >= 2.1: query ``i`` attends keys ``j <= i + Sk - Sq``.  When
            Sq > Sk the first ``Sq - Sk`` query rows see no key: their output is 0 and their
            LSE is -inf.
        deterministic: a bitwise reproducible backward (running it twice gives the same bits).
            By default the Hopper backward at head dim 64 adds dQ up from its key blocks in no
            fixed order (one pass, TMA reductions into fp32), so dQ may differ in the last bits
            from run to run; ``True`` (or ``torch.use_deterministic_algorithms(True)``) runs the
            two-pass backward there, which has no atomics.  Elsewhere the backward is
            deterministic either way.
        return_attn_probs: also return ``softmax_lse`` (batch, nheads, seqlen_q) float32 and
            the attention probabilities (batch, nheads, seqlen_q, seqlen_k), recomputed from the
            LSE (O(Sq*Sk) memory, for testing; not differentiable; with dropout see below).
        mode: algorithm: ``"fa2"`` (default), ``"fa1"`` (FA1's loop order), ``"tiling"``
            (split-KV: key chunks in parallel, merged like the tiling softmax; fast for decode).
            All return the same result.
        impl: implementation: ``"auto"`` (the Triton kernels on CUDA, or on CPU under
            ``TRITON_INTERPRET=1``; the PyTorch path otherwise), ``"triton"`` (the kernels or a
            ValueError), ``"torch"`` (the PyTorch path on any device).
        num_splits: key chunks for ``mode="tiling"`` (0 = chosen from the GPU and the shapes).
        softcap: > 0 caps the scaled scores, ``s -> softcap * tanh(s / softcap)`` (Gemma 2), in
            the forward and with its exact gradient; 0 (default) is off.  Not in ``mode="fa1"``.
        alibi_slopes: fp32 (nheads,) or (batch, nheads): ALiBi, the bias ``-slope * |i + Sk - Sq
            - j|`` added to the scaled (and capped) score of query i and key j (flash-attn's
            definition; no gradient flows to the slopes).  Not in ``mode="fa1"``.
        window_size: ``(left, right)``, sliding-window (local) attention: query ``i`` attends
            keys ``j`` in ``[i + Sk - Sq - left, i + Sk - Sq + right]``, -1 = unbounded on that
            side (flash-attn's definition, bottom-right aligned like ``causal``; with ``causal``
            the right side is 0).  Key blocks outside every row's window are skipped, so the
            cost grows with the window, not with Sk.  Rows whose window holds no key give 0
            (LSE -inf).  Not in ``mode="fa1"``.
        learnable_sink: (nheads,) floating tensor or None: attention sinks (gpt-oss; FA4's
            argument): head h's logit joins the softmax denominator of every row, in the same
            domain as the scaled (capped, biased) scores, and attends to no value, so each row's
            probabilities sum to less than 1 and ``softmax_lse`` includes it.  Its gradient is
            returned when it requires grad.  Composes with window, softcap, ALiBi, GQA.  Not in
            ``mode="fa1"``.
        dropout_p: dropout probability in [0, 1] applied to the attention probabilities (before
            they meet V; kept ones are scaled by 1 / (1 - p)), whenever > 0, as flash-attn does
            (pass 0 at evaluation).  The mask comes from a Philox generator in the kernels,
            keyed by a seed drawn from torch's generator on the device
            (:func:`dropout_seed`): ``torch.manual_seed`` reproduces it, the backward regenerates
            it, and CUDA-graph replays draw fresh masks.  ``mode="fa2"`` only.
        return_attn_probs with dropout: ``attn_probs`` is then flash-attn's ``S_dmask``: the
            unnormalised probabilities its kernel holds (normalised per key block of
            :func:`_get_block_size_n` columns, see :func:`flash_module.reference.attention_probs`),
            negative where dropped, so ``attn_probs >= 0`` is the keep mask.

    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, or ``(out, softmax_lse, attn_probs)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, "(batch, seqlen, nheads, headdim)")
    _check_qkv_bshd(q, k, v, ("q", "k", "v"), "(batch, seqlen, nheads, headdim)")
    _check_scale("softmax_scale", softmax_scale)
    window_size = _check_variants(dropout_p, window_size, softcap, alibi_slopes)
    _check_alibi(alibi_slopes, q, q.shape[0], q.shape[2])
    _check_sink(learnable_sink, q, q.shape[2])
    out, lse, scale, rng = _attention(q, k, v, softmax_scale, causal, True, mode, num_splits, impl, softcap,
                                      alibi_slopes, tuple(window_size), learnable_sink, float(dropout_p),
                                      deterministic=bool(deterministic))
    if not return_attn_probs:
        return out
    with torch.no_grad():
        dropout = reference.Dropout(float(dropout_p), rng) if rng is not None else None
        probs = reference.attention_probs(q, k, lse, scale, bool(causal), True, float(softcap), alibi_slopes,
                                          tuple(window_size), dropout,
                                          _get_block_size_n(q.device, q.shape[-1], True, bool(causal)))
    # The op's LSE is float64 for fp32 inputs (for the backward); flash-attn returns float32.
    return out, lse.to(acc_dtype(q.dtype)), probs.to(q.dtype)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    num_splits: int = 0,
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``flash_attn_func`` on a packed (batch, seqlen, 3, nheads, headdim) tensor (no copies)."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        shape = tuple(qkv.shape)
        raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {shape}")
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, mode=mode, impl=impl,
                           num_splits=num_splits, learnable_sink=learnable_sink)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    num_splits: int = 0,
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``flash_attn_func`` with a packed (batch, seqlen_k, 2, nheads_k, headdim) K/V (no copies)."""
    if not isinstance(kv, Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        shape = tuple(kv.shape)
        raise ValueError(f"kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {shape}")
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, mode=mode, impl=impl,
                           num_splits=num_splits, learnable_sink=learnable_sink)


# -- varlen: packed variable-length sequences ----------------------------------------------------

_VARLEN_LAYOUT = "(total_tokens, nheads, headdim)"


def _check_index_tensor(name: str, t: object, like: Tensor, shape: str, numel: int | None = None,
                        dim: int = 1) -> None:
    """An int32 metadata tensor of ``dim`` dims on ``like``'s device (values are never read);
    ``numel``: its first dim's required size (None: at least 1 for 1-D tensors)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor {shape}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype} (shape {tuple(t.shape)})")
    size = t.shape[0] if t.dim() else -1
    wrong_size = (dim == 1 and t.numel() < 1) if numel is None else size != numel
    if t.dim() != dim or wrong_size:
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the inputs' device {like.device}, got {t.device}")


def _check_max_seqlen(name: str, x: object) -> None:
    """An int >= 0 (a static bound, never needed: the kernels read the lengths on the device), a
    tensor (never read: no sync) or None.  Not even looked at while torch.compile traces: any
    use of an int argument makes dynamo guard on its value, i.e. recompile when it changes."""
    if torch.compiler.is_compiling() or x is None or isinstance(x, Tensor):
        return
    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, a tensor or None, got {type(x).__name__} {x!r}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")


def _varlen_probs(q: Tensor, k: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor, seqused_k: Tensor | None,
                  block_table: Tensor | None, scale: float, causal: bool, softcap: float = 0.0,
                  alibi_slopes: Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                  dropout_p: float = 0.0, rng: Tensor | None = None) -> Tensor:
    """(B, H, max_len_q, max_len_k) probabilities of each sequence, zero-padded (reads the
    lengths on the host: for testing); with dropout flash-attn's ``S_dmask`` layout
    (:func:`flash_attn_func`)."""
    n_table = block_table.shape[1] * k.shape[1] if block_table is not None else 0
    total_k = (cu_q.numel() - 1) * n_table if block_table is not None else k.shape[0]
    seqs = reference.varlen_sequences(cu_q, cu_k, q.shape[0], total_k, seqused_k)
    if block_table is not None:  # each sequence's pages back to back, from key 0
        seqs = [(qs, lq, 0, min(lk, n_table)) for qs, lq, _, lk in seqs]
    max_q, max_k = (max((s[i] for s in seqs), default=0) for i in (1, 3))
    probs = q.new_zeros((len(seqs), q.shape[1], max_q, max_k), dtype=acc_dtype(q.dtype))
    for b, (qs, lq, ks, lk) in enumerate(seqs):
        keys = k
        if block_table is not None:
            keys = k[block_table[b].long().clamp(0, k.shape[0] - 1)].flatten(0, 1)
        if lq and lk:
            dropout = reference.Dropout(dropout_p, rng, b) if dropout_p else None
            probs[b, :, :lq, :lk] = reference.attention_probs(
                q[None, qs:qs + lq], keys[None, ks:ks + lk], lse[None, :, qs:qs + lq], scale, causal, True,
                softcap, reference.batch_slopes(alibi_slopes, b), window_size, dropout,
                _get_block_size_n(q.device, q.shape[-1], True, causal))[0]
    return probs.to(q.dtype)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | Tensor | None = None,
    max_seqlen_k: int | Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    *,
    seqused_k: Tensor | None = None,
    mode: str = "fa2",
    impl: str = "auto",
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """flash-attn 2.x's ``flash_attn_varlen_func``: attention over B sequences of different
    lengths packed back to back, with no padding.

    Args:
        q: (total_q, nheads, headdim), float16/bfloat16/float32/float64; sequence ``b`` is rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: (total_k, nheads_k, headdim), ``nheads % nheads_k == 0``; sequence ``b`` is rows
            ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.  Any strides with a contiguous last dim.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 on the inputs' device, nondecreasing,
            starting at 0.  Length-0 sequences are allowed.
        max_seqlen_q, max_seqlen_k: accepted for compatibility as an int, a tensor or None.
            Never needed and never read: the kernels take each length from ``cu_seqlens`` on
            the device, so there is no host sync, a CUDA graph replays for any lengths with the
            same totals, and ``torch.compile`` does not recompile when lengths change.
        causal: bottom-right aligned **per sequence**: query ``i`` of sequence ``b`` attends
            keys ``j <= i + len_k[b] - len_q[b]``; rows that see no key give 0 (LSE -inf).
        return_attn_probs: also return ``softmax_lse`` (nheads, total_q) float32 and the
            probabilities (batch, nheads, max_len_q, max_len_k), zero-padded (for testing: it
            reads the lengths on the host).
        block_table: (batch, pages_per_seq) int32 or None: paged K/V.  k and v are then
            caches (num_pages, page_size, nheads_k, headdim), page_size a power of two >= 16;
            key ``j`` of sequence ``b`` is row ``j % page_size`` of page
            ``block_table[b, j // page_size]``, and ``cu_seqlens_k`` gives the key lengths.
            Without gradients the kernels read the pages in place; when an input requires grad,
            each sequence's pages are gathered into a contiguous copy first (O(N) memory) and
            the gradients of k and v arrive in the pages.
        seqused_k: (batch,) int32 or None: sequence ``b`` uses only its first ``seqused_k[b]``
            keys (its K/V rows still start at ``cu_seqlens_k[b]``).
        mode, impl: as in :func:`flash_attn_func`; only ``mode="fa2"`` has a varlen
            implementation.  ``impl="torch"`` (and CPU tensors without the interpreter) run
            the PyTorch path sequence by sequence, which reads the offsets on the host.
        deterministic: accepted; the backward is always deterministic.
        softcap, alibi_slopes, window_size: as in :func:`flash_attn_func` (forward and backward;
            (batch, nheads) slopes per sequence; the window is aligned per sequence, like causal).
        learnable_sink: as in :func:`flash_attn_func` (gradient included).
        dropout_p: as in :func:`flash_attn_func`; sequence b draws the mask that batch row b of
            a dense call with the same seed and heads would draw (rows counted within the sequence).

    Values of ``cu_seqlens_*`` / ``seqused_k`` are not checked (that would need a sync): the
    kernels clamp them to the tensors, so bad values give wrong answers, never out-of-bounds
    memory accesses.  :func:`flash_module.check_values` (or ``FLASH_MODULE_CHECK_VALUES=1``)
    checks them on the host while debugging.

    Returns:
        out (total_q, nheads, headdim) in q's dtype, or ``(out, softmax_lse, attn_probs)``.
    """
    paged = isinstance(block_table, Tensor)
    _check_tensor("q", q, _VARLEN_LAYOUT, dim=3)
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, "(num_pages, page_size, nheads_k, headdim)" if paged else _VARLEN_LAYOUT,
                      dim=4 if paged else 3)
    if block_table is not None and not paged:
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    q4, k4, v4 = q[None], *((t.flatten(0, 1) if paged else t)[None] for t in (k, v))
    _check_qkv_bshd(q4, k4, v4, ("q", "k", "v"), _VARLEN_LAYOUT, shown=(q, k, v))
    if q.shape[-1] == 0:
        raise ValueError(f"head dim must be >= 1 for packed sequences, got q: {tuple(q.shape)}")
    _check_index_tensor("cu_seqlens_q", cu_seqlens_q, q, "(batch + 1,)")
    _check_index_tensor("cu_seqlens_k", cu_seqlens_k, q, "(batch + 1,)", cu_seqlens_q.numel())
    if seqused_k is not None:
        _check_index_tensor("seqused_k", seqused_k, q, "(batch,)", cu_seqlens_q.numel() - 1)
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    _check_scale("softmax_scale", softmax_scale)
    window_size = _check_variants(dropout_p, window_size, softcap, alibi_slopes)
    _check_alibi(alibi_slopes, q, cu_seqlens_q.numel() - 1, q.shape[1])
    _check_sink(learnable_sink, q, q.shape[1])
    if block_table is not None:
        _check_index_tensor("block_table", block_table, q, "(batch, pages_per_seq)", cu_seqlens_q.numel() - 1,
                            dim=2)
        page = k.shape[1]
        if k.dim() != 4 or v.shape != k.shape or page < 16 or page & (page - 1):
            raise ValueError(f"with block_table, k and v must be paged caches (num_pages, page_size, "
                             f"nheads_k, headdim), page_size a power of two >= 16, got k: {tuple(k.shape)}, "
                             f"v: {tuple(v.shape)}")
    if checks.active():  # opt-in: reads the offsets on the host
        k_tokens = block_table.shape[1] * k.shape[1] if paged else k.shape[0]
        checks.varlen(q, k_tokens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                      block_table, k.shape[0])
    if paged and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        k, v, cu_seqlens_k, seqused_k = _unpage(k, v, block_table, cu_seqlens_k, seqused_k)
        block_table = None
    mode, impl = ops.check_varlen_mode(mode, impl)
    _check_no_functorch_grad()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _autocast(q, k, v)
    ops.resolve_impl(q, impl)
    rng = dropout_seed(q.device) if dropout_p else None
    out, lse = ops.call(ops.varlen_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, scale, bool(causal),
                        mode, impl, block_table, float(softcap), alibi_slopes, int(window_size[0]),
                        int(window_size[1]), learnable_sink, float(dropout_p), rng)
    if not return_attn_probs:
        return out
    with torch.no_grad():
        probs = _varlen_probs(q, k, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale,
                              bool(causal), float(softcap), alibi_slopes, tuple(window_size),
                              float(dropout_p), rng)
    return out, lse.to(acc_dtype(q.dtype)), probs


def _unpage(k: Tensor, v: Tensor, block_table: Tensor, cu_seqlens_k: Tensor,
            seqused_k: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Paged K/V with gradients: the kernels read pages only forwards, so each sequence's pages
    are gathered into one contiguous copy, (batch * pages_per_seq * page_size, nheads_k,
    headdim): O(N) memory, the size of the keys the table addresses.  Indexing is
    differentiable, so dK/dV flow back into the pages (summed where pages are shared).
    Sequence ``b`` starts at row ``b * pages_per_seq * page_size`` and uses the key length the
    paged kernels would (``cu_seqlens_k`` clamped as they clamp it, then ``seqused_k``, then the
    table's keys); table entries are clamped into the cache, as the kernels clamp them, so no
    value reads out of bounds."""
    batch, per_seq = block_table.shape
    span = per_seq * k.shape[1]
    pages = block_table.long().clamp(0, k.shape[0] - 1)
    k, v = (t[pages].flatten(0, 2) for t in (k, v))  # (batch * span, nheads_k, headdim)
    cu = cu_seqlens_k.long()
    start = cu[:-1].clamp(0, batch * span)
    used = torch.maximum(cu[1:], start).clamp(max=batch * span) - start
    if seqused_k is not None:
        used = torch.minimum(seqused_k.long().clamp(min=0), used)
    starts = torch.arange(batch + 1, device=block_table.device, dtype=torch.int32) * span
    return k, v, starts, used.clamp(max=span).to(torch.int32)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` (self-attention) on a packed (total, 3, nheads, headdim)
    tensor, without copies."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total_tokens, 3, nheads, headdim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, mode=mode, impl=impl, learnable_sink=learnable_sink)


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | Tensor | None = None,
    max_seqlen_k: int | Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` with K/V packed as (total_k, 2, nheads_k, headdim), without
    copies."""
    if not isinstance(kv, Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_tokens_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, mode=mode, impl=impl, learnable_sink=learnable_sink)


# -- KV cache: decoding -------------------------------------------------------------------------


def _rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first ``2 * cos.shape[1]`` features of ``x`` (B, S, H, D) at ``positions``
    (B, S) (clamped into the table), in fp32, as flash-attn does: pairs ``(i, i + r/2)``, or
    ``(2i, 2i + 1)`` when ``interleaved``."""
    half = cos.shape[1]
    pos = positions.clamp(0, cos.shape[0] - 1)
    c, s = (t[pos][:, :, None, :].float() for t in (cos, sin))  # (B, S, 1, r/2)
    xr = x[..., :2 * half].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _cache_seqlens(cache_seqlens: object, b: int, capacity: int, like: Tensor) -> Tensor:
    """(B,) int32 lengths on ``like``'s device from None (the whole cache), an int or a tensor."""
    if cache_seqlens is None:
        return torch.full((b,), capacity, dtype=torch.int32, device=like.device)
    if isinstance(cache_seqlens, Tensor):
        _check_index_tensor("cache_seqlens", cache_seqlens, like, "(batch,)", b)
        return cache_seqlens
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.SymInt)):
        raise TypeError(f"cache_seqlens must be an int, an int32 tensor (batch,) or None, got "
                        f"{type(cache_seqlens).__name__}")
    return torch.full((b,), cache_seqlens, dtype=torch.int32, device=like.device)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    impl: str = "auto",
    learnable_sink: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """flash-attn 2.x's ``flash_attn_with_kvcache``: decoding attention over a KV cache, with the
    new keys/values appended into the cache **in place** first.  Inference only.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with ``block_table``
            paged: (num_pages, page_size, nheads_k, headdim), page_size a power of two >= 16.
        k, v: (batch, seqlen_new, nheads_k, headdim) or None: written at positions
            ``cache_seqlens[b] + i`` of batch ``b``'s cache (positions past the cache are
            dropped), then attended to.  ``cache_seqlens`` itself is not updated (as flash-attn).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None: rotary embedding of q and the
            new k before the append (only with k, v).  k is rotated at its positions; q at
            ``cache_seqlens[b] + i`` when causal or windowed, else all at ``cache_seqlens[b]``.
            ``rotary_interleaved`` pairs features (2i, 2i+1) instead of (i, i + rotary_dim/2).
        cache_seqlens: int, (batch,) int32 tensor or None (the whole cache): each sequence's
            length before the append.  Batch ``b`` attends to its first
            ``cache_seqlens[b] + seqlen_new`` keys.
        cache_batch_idx: (batch,) int32 or None: batch ``b`` uses cache row
            ``cache_batch_idx[b]`` (contiguous caches only).
        cache_leftpad: (batch,) int32 or None (contiguous caches only, as flash-attn): batch
            ``b``'s keys start at cache position ``cache_leftpad[b]`` (left padding before it
            is ignored).  Positions stay cache positions: new k/v are still written at
            ``cache_seqlens[b] + i`` and rotated there, and the causal mask aligns the last
            query with the last key.
        block_table: (batch, pages_per_seq) int32 or None: paged K/V, read in place (each key
            block maps to its page).
        causal: bottom-right aligned: query ``i`` sees keys ``j <= i + len_k - seqlen_q``.
        num_splits: key chunks of the split-KV kernel (0 = chosen from the GPU and the shapes).
            The attention always runs split-KV, with the query heads of a GQA group packed into
            one tile for decode, so each K/V block is read once per group.
        return_softmax_lse: also return the (batch, nheads, seqlen_q) float32 LSE.
        impl: ``auto`` / ``triton`` / ``torch`` as in :func:`flash_attn_func`.
        softcap, alibi_slopes: as in :func:`flash_attn_func`.
        window_size: ``(left, right)`` as in :func:`flash_attn_func`, aligned to each batch's
            cache length: query ``i`` sees cache keys ``[i + len - Sq - left, i + len - Sq +
            right]``.  The split-KV chunks cover only the window's span, so a long cache with a
            short window reads only the window.
        learnable_sink: (nheads,) attention-sink logits as in :func:`flash_attn_func`
            (inference: it must not require grad here).

    Values of ``cache_seqlens``, ``cache_leftpad``, ``cache_batch_idx`` and ``block_table`` are
    not checked (that needs a sync): the kernels clamp them, so bad values give wrong answers, never
    out-of-bounds memory accesses.  :func:`flash_module.check_values` (or
    ``FLASH_MODULE_CHECK_VALUES=1``) checks them on the host while debugging.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse)``.
    """
    layout = "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, layout)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, layout)
    paged = block_table is not None
    b, sq, h, d = q.shape
    _check_qkv_bshd(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), layout, same_batch=False)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if d == 0:
        raise ValueError(f"head dim must be >= 1, got q: {tuple(q.shape)}")
    if k is not None:
        want = (b, k.shape[1], k_cache.shape[2], d)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must be (batch, seqlen_new, nheads_k, headdim) = (B={b}, S_new, "
                             f"{k_cache.shape[2]}, {d}), got k: {tuple(k.shape)}, v: {tuple(v.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
            raise TypeError(f"k and v must match q's dtype and device ({q.dtype}, {q.device}), got "
                            f"{k.dtype} {k.device} and {v.dtype} {v.device}")
    if paged:
        _check_index_tensor("block_table", block_table, q, f"(batch={b}, pages_per_seq)", b, dim=2)
        page = k_cache.shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"paged k_cache: page size (dim 1) must be a power of two >= 16, got "
                             f"{tuple(k_cache.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (paged caches)")
    if cache_batch_idx is not None:
        _check_index_tensor("cache_batch_idx", cache_batch_idx, q, "(batch,)", b)
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    seqlens = _cache_seqlens(cache_seqlens, b, capacity, q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin apply to q and the new k: pass k and v as well")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape != rotary_cos.shape:
                raise ValueError(f"{name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2) like rotary_cos")
        if not 0 < 2 * rotary_cos.shape[1] <= d:
            raise ValueError(f"rotary_dim (2 x rotary_cos.shape[1] = {2 * rotary_cos.shape[1]}) must be in "
                             f"(0, headdim = {d}]")
    if cache_leftpad is not None:
        _check_index_tensor("cache_leftpad", cache_leftpad, q, "(batch,)", b)
        if paged:
            raise ValueError("cache_leftpad cannot be used with block_table (paged caches), as in flash-attn")
    _check_scale("softmax_scale", softmax_scale)
    window_size = _check_variants(0.0, window_size, softcap, alibi_slopes)
    _check_alibi(alibi_slopes, q, b, h)
    _check_sink(learnable_sink, q, h)
    _check_num_splits(num_splits)
    if checks.active():  # opt-in: reads the lengths and indices on the host
        checks.kvcache(seqlens, k.shape[1] if k is not None else 0, capacity, cache_batch_idx,
                       k_cache.shape[0], block_table, k_cache.shape[0], cache_leftpad)
    _, impl = ops.check_mode("fa2", impl)
    ops.resolve_impl(q, impl)
    tensors = (q, k, v, k_cache, v_cache, learnable_sink)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("flash_attn_with_kvcache is inference only: its inputs must not require grad "
                         "(use torch.no_grad() / torch.inference_mode(), or flash_attn_varlen_func to train)")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    if k is not None:
        if rotary_cos is not None:
            new_pos = seqlens.to(torch.int64)[:, None] + torch.arange(k.shape[1], device=q.device)
            # causal or local (flash-attn's rule): query i at position len + i; else all at len
            local = tuple(window_size) != (-1, -1)
            steps = torch.arange(sq, device=q.device) * int(bool(causal) or local)
            q_pos = seqlens.to(torch.int64)[:, None] + steps
            q = _rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
            k = _rotary(k, rotary_cos, rotary_sin, new_pos, rotary_interleaved)
        ops.call(ops.kvcache_append, k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, impl)
    # The attention sees the new keys too: the kernel adds their count to each length.
    out, lse = ops.call(ops.kvcache_fwd, q, k_cache, v_cache, seqlens, cache_batch_idx, block_table, scale,
                        bool(causal), num_splits, impl, cache_leftpad, float(softcap), alibi_slopes,
                        int(window_size[0]), int(window_size[1]), learnable_sink,
                        k.shape[1] if k is not None else 0)
    if return_softmax_lse:
        return out, lse.to(acc_dtype(q.dtype))
    return out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mode: str = "fa2",
    impl: str = "auto",
    num_splits: int = 0,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    learnable_sink: Tensor | None = None,
) -> Tensor:
    """torch's ``scaled_dot_product_attention`` on (B, H, S, D) tensors.

    Args:
        query: (batch, nheads, seqlen_q, headdim); key, value: (batch, nheads_kv, seqlen_k, headdim).
        is_causal: causal mask aligned to the top-left corner, as torch does: query ``i``
            attends keys ``j <= i`` (whatever Sq and Sk are).
        scale: default ``1 / sqrt(headdim)``.
        enable_gqa: allow ``nheads_kv < nheads`` (``nheads % nheads_kv == 0``), as in torch.
        mode, impl: algorithm (``flash_module.MODES``) and implementation
            (``flash_module.IMPLS``), as in :func:`flash_attn_func`.
        num_splits: key chunks for ``mode="tiling"`` (0 = automatic).
        softcap: an extension (torch has none): scores -> ``softcap * tanh(s / softcap)`` as in
            :func:`flash_attn_func`; 0 (default) is off.
        window_size: an extension: ``(left, right)`` sliding window as in :func:`flash_attn_func`
            but aligned top-left like ``is_causal`` here: query ``i`` sees keys ``[i - left,
            i + right]``.
        learnable_sink: an extension: (nheads,) attention-sink logits as in
            :func:`flash_attn_func`.
        dropout_p: dropout on the attention probabilities whenever > 0, as torch's SDPA does
            (pass 0 at evaluation); the kernels' Philox mask, as in :func:`flash_attn_func`.
        attn_mask: torch's mask, broadcastable to (batch, nheads, seqlen_q, seqlen_k): boolean
            (True = take part in attention) or float (added to the scaled scores; -inf hides a
            key), any float dtype.  It is read in place by tiles (broadcast dims cost nothing,
            no (Sq, Sk) tensor is made beyond it), forward and backward; a float mask that
            requires grad gets its gradient (dS, summed over broadcast dims).  Rows it hides
            entirely give 0 and zero gradients (torch's math backend gives NaN).  Not with
            ``is_causal`` (as in torch); ``mode="fa2"`` only.

    Returns:
        (batch, nheads, seqlen_q, headdim) in query's dtype: a transposed view of a contiguous
        (batch, seqlen_q, nheads, headdim) buffer, like torch's flash backend returns.
    """
    layout = "(batch, nheads, seqlen, headdim)"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, layout)
    _check_scale("scale", scale)
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    _check_qkv_bshd(q, k, v, ("query", "key", "value"), layout, shown=(query, key, value))
    attn_mask = _check_attn_mask(attn_mask, is_causal, q, k)
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise ValueError(
            f"query has {q.shape[2]} heads but key/value have {k.shape[2]}: pass enable_gqa=True for GQA/MQA"
        )
    window_size = _check_variants(0.0, window_size, softcap, None)
    _check_sink(learnable_sink, q, q.shape[2])
    out = _attention(q, k, v, scale, is_causal, False, mode, num_splits, impl, softcap, None,
                     tuple(window_size), learnable_sink, float(dropout_p), attn_mask)[0]
    return out.transpose(1, 2)


def _check_attn_mask(attn_mask: object, is_causal: bool, q: Tensor, k: Tensor) -> Tensor | None:
    """SDPA's ``attn_mask``: a bool or floating tensor broadcastable to (B, H, Sq, Sk), on q's
    device, not together with ``is_causal`` (torch's rule).  Returned as a 4-D view."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined (as in torch): put the causal "
                         "mask into attn_mask")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
    b, sq, h, _ = q.shape
    target = (b, h, sq, k.shape[1])
    try:
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask must be broadcastable to (batch, nheads, seqlen_q, seqlen_k) = "
                         f"{target}, got {tuple(attn_mask.shape)}") from None
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on the query's device {q.device}, got {attn_mask.device}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def merge_attention_states(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine two attention results over disjoint key sets (cascade / ring attention).

    Args:
        out_a, out_b: (batch, seqlen_q, nheads, headdim) outputs, each normalised over its own
            keys (as returned by ``flash_attn_func``).
        lse_a, lse_b: (batch, nheads, seqlen_q) their log-sum-exps (``return_attn_probs=True``
            gives them), -inf for rows that saw no key.

    Returns:
        ``(out, lse)``: the attention over the union of the two key sets, exactly (up to
        rounding) what one call over all keys returns.  Differentiable in all four inputs.
    """
    for name, t, rank in (("out_a", out_a, 4), ("lse_a", lse_a, 3), ("out_b", out_b, 4), ("lse_b", lse_b, 3)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank or not t.is_floating_point():
            raise ValueError(f"{name} must be a {rank}-D floating tensor, got {t.dtype} {tuple(t.shape)}")
    shapes = f"out_a: {tuple(out_a.shape)}, lse_a: {tuple(lse_a.shape)}, out_b: {tuple(out_b.shape)}, " \
             f"lse_b: {tuple(lse_b.shape)}"
    b, s, h, _ = out_a.shape
    if out_b.shape != out_a.shape or lse_a.shape != (b, h, s) or lse_b.shape != (b, h, s):
        raise ValueError(f"expected out_* (B, S, H, D) and lse_* (B, H, S) of matching sizes: {shapes}")
    if out_a.dtype != out_b.dtype or lse_a.dtype != lse_b.dtype:
        raise TypeError(f"out_a/out_b and lse_a/lse_b must share dtypes: {shapes}")
    if len({t.device for t in (out_a, lse_a, out_b, lse_b)}) != 1:
        raise ValueError(f"all inputs must be on one device: {shapes}")
    return ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
