"""A Hugging Face transformers attention backend (issue #14, first version).

    import flash_module.integrations.transformers as fm_hf
    fm_hf.register()                                   # once; returns the name, "fm_triton"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fm_triton")
    model.set_attn_implementation("fm_triton")        # or switch an existing model

The name: transformers treats any implementation name containing "flash" as a request for its
own flash-attention kernels (and tries to load them from its hub), so ours is ``"fm_triton"``.

What :func:`register` registers:

* the attention function (:func:`attention_forward`) with ``AttentionInterface``: it runs
  :func:`flash_module.scaled_dot_product_attention` on the (B, H, S, D) query/key/value the model
  hands over, with GQA (no key/value repetition), the model's ``scaling``, ``dropout`` in
  training, ``softcap`` (Gemma 2), and ``s_aux`` (gpt-oss's attention sinks) as our
  ``learnable_sink``;
* a mask function with ``AttentionMaskInterface``: transformers' SDPA mask builder, so padding,
  causality, sliding windows (Mistral, Gemma 2/3, Qwen 2) and packed sequences (``position_ids``
  that restart) reach us as SDPA's boolean 4-D mask, or as ``None`` where plain causal attention
  is exact (then ``is_causal``).  Registering the attention function alone would make
  transformers pass ``attention_mask=None`` and silently drop padding.

This first version takes the mask as a tensor, read tile by tile by the kernels (O(mask) memory,
as transformers' own SDPA path); unpadding to the varlen kernels (no mask at all) and a
static-cache decode path through ``flash_attn_with_kvcache`` are the next steps (docs/
integrations.md).  transformers is an optional dependency (``pip install flash_module[hf]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "fm_triton"

#: Eager calls of :func:`attention_forward` so far (for tests: the model really runs our kernels).
calls = 0


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, Sq, D), key/value (B, H_kv, Sk, D),
    ``attention_mask`` from the registered mask function (4-D boolean, True = attend, or None);
    returns ``(attn_output (B, Sq, H, D), None)`` (no attention weights)."""
    from ..api import scaled_dot_product_attention

    global calls
    calls += 1
    if kwargs.get("output_attentions", False):
        raise ValueError(f"attn_implementation={NAME!r} does not return attention weights "
                         "(output_attentions=True): use 'eager' for that")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' SDPA path: causal only where the mask builder left the mask out
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :kv_len]  # a static cache's mask covers its capacity
    elif is_causal and kv_len > q_len:  # prefill into an empty static cache: only the first q_len keys
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    sink = s_aux.float() if s_aux is not None else None
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=is_causal, scale=scaling, enable_gqa=True,
                                       softcap=float(softcap) if softcap else 0.0, learnable_sink=sink)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention function and its mask function with transformers under ``name``
    (default ``"fm_triton"``); returns the name to pass as ``attn_implementation``."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as exc:  # transformers missing, or older than its mask interface
        raise ImportError("flash_module's transformers backend needs transformers with AttentionInterface "
                          "and AttentionMaskInterface (>= 4.54): pip install 'flash_module[hf]'") from exc
    if "flash" in name:
        raise ValueError(f"name={name!r}: transformers routes implementation names containing 'flash' to its "
                         "own flash-attention loader; pick another (default 'fm_triton')")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["sdpa"])
    return name
