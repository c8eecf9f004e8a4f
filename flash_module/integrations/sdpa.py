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

(Recent torch releases also have ``torch.nn.attention.register_flash_attention_impl``, which
swaps the kernels behind SDPA's own flash backend on CUDA; plugging in there is future work: it
cannot be tested without a GPU, and it only covers the inputs torch's flash backend accepts.)
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
