"""flash_module: FlashAttention in Python + Triton, as torch.library custom ops.

Public entry points:

* :func:`flash_attn_func` (and the qkv/kv-packed variants): flash-attn 2.x's API on (B, S, H, D).
* :func:`scaled_dot_product_attention`: torch's SDPA signature on (B, H, S, D).
* :class:`FlashAttention`, :class:`MultiheadFlashAttention`: nn.Module layers.
* ``torch.ops.flash_module.attention_fwd`` / ``attention_bwd``: the ops themselves (:mod:`.ops`).
* :mod:`.reference`: the float64 oracle and the seed's algorithms in PyTorch.
* :func:`softmax.softmax`: the seed's online / tiling softmax as Triton ops.
"""

from . import ops, reference, softmax
from .api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    merge_attention_states,
    scaled_dot_product_attention,
)
from .module import FlashAttention, MultiheadFlashAttention, RotaryEmbedding
from .ops import MODES

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "FlashAttention",
    "MultiheadFlashAttention",
    "RotaryEmbedding",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "merge_attention_states",
    "ops",
    "reference",
    "scaled_dot_product_attention",
    "softmax",
]
