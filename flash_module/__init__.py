"""flash_module: FlashAttention in Python + Triton, as torch.library custom ops.

Public entry points:

* :func:`flash_attn_func` (and the qkv/kv-packed variants): flash-attn 2.x's API on (B, S, H, D).
* :func:`flash_attn_varlen_func` (and its packed variants): sequences of different lengths packed
  back to back, (total_tokens, H, D) with ``cu_seqlens``; no host sync.
* :func:`flash_attn_with_kvcache`: decoding over a KV cache (contiguous or paged), appending the
  new keys/values in place (inference only).
* :func:`scaled_dot_product_attention`: torch's SDPA signature on (B, H, S, D).
* :class:`FlashAttention`, :class:`MultiheadFlashAttention`: nn.Module layers.
* :func:`ring_attention`: context parallelism over ``torch.distributed`` (:mod:`.distributed`);
  :func:`ring_attention_varlen` for packed documents.
* :func:`softmax`: the online softmax (one streaming pass) and the tiling softmax (row chunks in
  parallel, then merged) as Triton ops (:mod:`.softmax` holds the ops).
* ``torch.ops.flash_module.attention_fwd`` / ``attention_bwd`` / ``varlen_fwd`` / ``varlen_bwd``:
  the ops themselves (:mod:`.ops`).
* :mod:`.reference`: the float64 oracle and the blocked algorithms (online softmax, FA1, FA2) in
  PyTorch, which are also the CPU path.
* :func:`which_implementation`: what a call on given tensors runs (compiled Triton kernels, the
  Triton interpreter, or the PyTorch path).
* :func:`sdpa_override` / :func:`enable_sdpa_override`: route ``torch.nn.functional.
  scaled_dot_product_attention`` to flash_module where it can run the call (:mod:`.integrations`).

``mode=`` picks the algorithm (:data:`MODES`: ``fa2``, ``fa1``, ``tiling``) and ``impl=`` the
implementation (:data:`IMPLS`: ``auto``, ``triton``, ``torch``) in every entry point.
"""

from . import checks, ops, reference
from .api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    merge_attention_states,
    scaled_dot_product_attention,
)
from .checks import check_values, set_check_values
from .distributed import ring_attention, ring_attention_varlen
from .integrations import disable_sdpa_override, enable_sdpa_override, sdpa_override, sdpa_override_enabled
from .module import FlashAttention, MultiheadFlashAttention, RotaryEmbedding
from .ops import IMPLS, MODES, which_implementation

# The function shadows its module's name on the package: ``flash_module.softmax(x)`` is the call;
# ``from flash_module.softmax import ALGORITHMS`` still reaches the module.
from .softmax import softmax  # noqa: E402  (after the submodules it depends on)

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "MODES",
    "FlashAttention",
    "MultiheadFlashAttention",
    "RotaryEmbedding",
    "check_values",
    "checks",
    "disable_sdpa_override",
    "enable_sdpa_override",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "merge_attention_states",
    "ops",
    "reference",
    "ring_attention",
    "ring_attention_varlen",
    "scaled_dot_product_attention",
    "sdpa_override",
    "sdpa_override_enabled",
    "set_check_values",
    "softmax",
    "which_implementation",
]
