"""An SDPA drop-in: ``torch.nn.functional.scaled_dot_product_attention`` calls routed to
flash_module's kernels where the arguments are supported, to torch's own SDPA otherwise.

    with flash_module.sdpa_override():
        model(x)  # every F.scaled_dot_product_attention inside runs flash_module's attention

    flash_module.enable_sdpa_override()   # process-wide, until disable_sdpa_override()

How: while enabled, the attribute ``torch.nn.functional.scaled_dot_product_attention`` is a
Python function (:func:`routed_sdpa`) that checks the arguments on shapes and dtypes only (no
tensor values, no host sync) and calls :func:`flash_module.scaled_dot_product_attention` or
the original.  Code that looks the function up at call time (``F.scaled_dot_product_attention``,
``torch.nn.functional.scaled_dot_product_attention``: transformers, torch's own
``nn.MultiheadAttention``... do) is routed; a reference taken before enabling
(``from torch.nn.functional import scaled_dot_product_attention``) is not.  Under
``torch.compile`` the router is traced like any Python function: no graph break
(``fullgraph=True`` works), and the choice is made at trace time from shapes and dtypes.

Routed: 4-D (B, H, S, D) query / key / value on a device that runs the Triton kernels (CUDA, or
CPU under the interpreter) with one floating dtype, equal head dims, ``key.shape[1]`` dividing
``query.shape[1]`` (equal unless ``enable_gqa``), no ``attn_mask`` together with ``is_causal``,
and no autograd transform (functorch) active.  Everything else goes to torch's SDPA unchanged,
errors included.

torch's own hook, where the installed torch has it (``torch.nn.attention.
register_flash_attention_impl``): :func:`register_torch_flash_impl` registers flash_module as a
provider of the kernels behind SDPA's **flash backend** on CUDA; the user then opts in with
``torch.nn.attention.activate_flash_attention_impl("flash_module")`` (providers must not
activate themselves) and ``restore_flash_attention_impl()`` undoes it.  SDPA's dispatcher still
decides when its flash backend runs (fp16/bf16, no mask), so that path covers less than the
router above, which is the fallback for older torch and for masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .._runtime import use_triton

_ORIGINAL = torch.nn.functional.scaled_dot_product_attention
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Eager calls routed to flash_module so far (under torch.compile: traces, not runs).  For tests
#: and for checking that a model really calls our kernels.
routed_calls = 0


def routes(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
           is_causal: bool = False, enable_gqa: bool = False) -> bool:
    """Whether :func:`routed_sdpa` runs flash_module's attention for these arguments (shapes,
    dtypes and devices only)."""
    ts = (query, key, value)
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in ts):
        return False
    if query.dtype not in _DTYPES or any(t.dtype != query.dtype or t.device != query.device for t in ts):
        return False
    if not use_triton(query) or torch._C._are_functorch_transforms_active():
        return False
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d or d == 0:
        return False
    b, h, _, _ = query.shape
    if key.shape[0] != b or value.shape[:3] != key.shape[:3] or key.shape[1] == 0:
        return False
    if h % key.shape[1] or (key.shape[1] != h and not enable_gqa):
        return False
    if attn_mask is not None and (is_causal or not isinstance(attn_mask, Tensor) or attn_mask.dim() > 4):
        return False
    return True


def routed_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
    """torch's ``scaled_dot_product_attention`` signature: flash_module's attention where
    :func:`routes` says so, torch's own SDPA otherwise."""
    if routes(query, key, value, attn_mask, is_causal, enable_gqa):
        from ..api import scaled_dot_product_attention

        global routed_calls
        if not torch.compiler.is_compiling():  # (a changing global would recompile every call)
            routed_calls += 1
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa)
    return _ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)


def enable_sdpa_override() -> None:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to flash_module from now on."""
    torch.nn.functional.scaled_dot_product_attention = routed_sdpa


def disable_sdpa_override() -> None:
    """Restore torch's own ``scaled_dot_product_attention``."""
    torch.nn.functional.scaled_dot_product_attention = _ORIGINAL


def sdpa_override_enabled() -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` is routed now."""
    return torch.nn.functional.scaled_dot_product_attention is routed_sdpa


@contextlib.contextmanager
def sdpa_override(enabled: bool = True) -> Iterator[None]:
    """Within the block, route ``torch.nn.functional.scaled_dot_product_attention`` to
    flash_module (``enabled=False``: to torch's own); the previous state is restored after."""
    before = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = routed_sdpa if enabled else _ORIGINAL
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = before


# -- torch's flash-attention provider hook ------------------------------------------------------

TORCH_IMPL_NAME = "flash_module"

#: Eager forward calls of SDPA's flash backend that ran flash_module's kernels (for tests).
torch_impl_calls = 0


def register_torch_flash_impl() -> bool:
    """Register flash_module with ``torch.nn.attention``'s flash-attention registry under
    ``"flash_module"``; False (nothing registered) where the installed torch has no registry.
    Then ``torch.nn.attention.activate_flash_attention_impl("flash_module")`` makes SDPA's flash
    backend on CUDA run our kernels, forward and backward (dropout included: our seed travels in
    the ``rng_state`` output, which torch hands back to the backward)."""
    try:
        from torch.nn.attention import register_flash_attention_impl
    except ImportError:
        return False
    register_flash_attention_impl(TORCH_IMPL_NAME, register_fn=_register_aten_kernels)
    return True


class _Handle:
    """What torch's registry keeps while our kernels are active; ``remove`` drops them."""

    def __init__(self, library: torch.library.Library) -> None:
        self.library: torch.library.Library | None = library

    def remove(self) -> None:
        if self.library is not None:
            getattr(self.library, "_destroy", lambda: None)()  # (else the registrations go with the object)
            self.library = None


def _register_aten_kernels() -> _Handle:
    lib = torch.library.Library("aten", "IMPL", "CUDA")
    lib.impl("_scaled_dot_product_flash_attention", _aten_flash_fwd, "CUDA")
    lib.impl("_scaled_dot_product_flash_attention_backward", _aten_flash_bwd, "CUDA")
    return _Handle(lib)


def _like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``like``'s strides (what torch's meta functions promise: ``empty_like``)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _aten_flash_fwd(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0,
                    is_causal: bool = False, return_debug_mask: bool = False, *, scale: float | None = None):
    """``aten::_scaled_dot_product_flash_attention`` on (B, H, S, D) tensors (causal top-left,
    as torch's flash backend)."""
    from .. import ops
    from ..api import dropout_seed

    if return_debug_mask:
        raise RuntimeError("flash_module's SDPA flash backend does not return the debug attention mask")
    global torch_impl_calls
    if not torch.compiler.is_compiling():
        torch_impl_calls += 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    sm = float(scale) if scale is not None else query.shape[-1] ** -0.5
    rng = dropout_seed(query.device) if dropout_p > 0 else None
    out, lse = ops.call(ops.attention_fwd, q, k, v, sm, bool(is_causal), False, "fa2", 0, "triton", 0.0, None,
                        -1, -1, None, float(dropout_p), rng, None, 0)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)
    if rng is not None:
        rng_state.view(torch.int64)[:1] = rng
    unused = torch.empty((), dtype=torch.uint64, device=query.device)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return (_like(out.transpose(1, 2), query), lse.float(), None, None, query.shape[2], key.shape[2],
            rng_state, unused, debug)


def _aten_flash_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                    logsumexp: Tensor, cum_seq_q, cum_seq_k, max_q: int, max_k: int, dropout_p: float,
                    is_causal: bool, philox_seed: Tensor, philox_offset: Tensor, *,
                    scale: float | None = None):
    """``aten::_scaled_dot_product_flash_attention_backward``: (dq, dk, dv), each laid out like
    its input."""
    from .. import ops

    q, k, v, o, do = (t.transpose(1, 2) for t in (query, key, value, out, grad_out))
    sm = float(scale) if scale is not None else query.shape[-1] ** -0.5
    rng = philox_seed.view(torch.int64)[:1] if dropout_p > 0 else None
    dq, dk, dv = ops.call(ops.attention_bwd, do, q, k, v, o, logsumexp, None, sm, bool(is_causal), False,
                          "fa2", "triton", 0.0, None, -1, -1, float(dropout_p), rng, None, 0)
    return tuple(_like(g.transpose(1, 2), t) for g, t in ((dq, query), (dk, key), (dv, value)))
