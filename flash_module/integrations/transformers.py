"""A Hugging Face transformers attention backend (issue #14).

    import flash_module.integrations.transformers as fm_hf
    fm_hf.register()                                   # once; returns the name, "fm_triton"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fm_triton")
    model.set_attn_implementation("fm_triton")        # or switch an existing model

The name: transformers treats any implementation name containing "flash" as a request for its
own flash-attention kernels (and tries to load them from its hub), so ours is ``"fm_triton"``.

What :func:`register` registers:

* the attention function (:func:`attention_forward`) with ``AttentionInterface``, taking what the
  model hands over: (B, H, S, D) query/key/value, GQA (no key/value repetition), ``scaling``,
  ``dropout`` in training, ``sliding_window`` (Mistral, Gemma 2/3, Qwen 2, gpt-oss), ``softcap``
  (Gemma 2), ``s_aux`` (gpt-oss's attention sinks, as our ``learnable_sink``);
* a mask function (:func:`build_mask`) with ``AttentionMaskInterface``.  Registering the
  attention function alone would make transformers pass ``attention_mask=None`` and silently drop
  padding.

Which mask reaches the attention, and what runs (all without a host sync):

* **No padding** (``None``): causal attention (:func:`flash_module.flash_attn_func`'s kernels);
  packed documents given as ``cu_seq_lens_q``/``cu_seq_lens_k`` (transformers'
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) run the varlen kernels.
* **Padding** (the 2-D (B, S_k) mask, as transformers' flash path gets): with as many queries as
  keys (training, prefill) the tokens are **unpadded** into the varlen kernels (one stable sort on
  the device, no per-sequence loop) and the output padded back, zeros on padded rows; with fewer
  queries (decoding with a cache) the mask is read as a (B, 1, 1, S_k) key mask with causal
  attention aligned bottom-right.  O(N) memory either way.
* **Packed documents from** ``position_ids`` (transformers detects them in eager code): the mask
  function hands over transformers' (B, S) document ids and each document runs as one varlen
  sequence (the documents are counted on the host once per forward, as transformers' flash
  path does).
* **Everything else** transformers can ask for (packing under ``torch.compile``, where it cannot
  be told from plain batches without a sync; static caches whose keys are not aligned with the
  queries; token-type overlays; chunked attention) gets transformers' SDPA boolean 4-D mask,
  which the kernels read by tiles: exact, O(mask) memory, as transformers' own SDPA path.

transformers is an optional dependency (``pip install flash_module[hf]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "fm_triton"

#: Eager calls of :func:`attention_forward` so far (for tests: the model really runs our kernels).
calls = 0

#: transformers' mask functions we need, looked up by :func:`register` (eager code): compiled
#: code cannot import them (transformers' lazy modules are not modules to dynamo).
_MASKING: dict = {}


def _plain_mask_function(fn, kwargs: dict) -> bool:
    """Whether transformers' mask function ``fn`` (with the extra arguments transformers passes
    the mask interface) is plain causal or causal with a sliding window, with nothing on top:
    then a 2-D padding mask plus the layer's ``sliding_window`` say everything.  (Bidirectional
    masks take the 4-D mask: for cross-attention the padding mask is the keys' only, and the
    unpadding would apply it to the queries.)

    Read from identities and transformers' own flags, not from closures (compiled code cannot
    look inside them): packing, token-type or block overlays, and a static cache's decode step
    set ``allow_is_causal_skip=False`` (or ``use_vmap``); a sliding window comes as the
    ``and_masks`` of its overlay and causality with ``local_size``, as chunked attention does,
    which the config's ``attention_chunk_size`` tells apart."""
    if kwargs.get("use_vmap", False):
        return False
    if not kwargs.get("allow_is_causal_skip", True):
        return False
    if fn is _MASKING["causal"]:
        return kwargs.get("local_size") is None
    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None)
    return getattr(fn, "__code__", None) is _MASKING["and_code"] and kwargs.get("local_size") is not None \
        and not chunked


def _packed_documents(fn) -> Tensor | None:
    """Eager code only (it opens closures): the (B, S) document ids inside transformers' mask
    function when it is packing (``packed_sequence_mask_function``) over a plain causal or
    sliding pattern (position remapping allowed); else None."""
    docs: list[Tensor] = []

    def plain(f) -> bool:
        if f is _MASKING["causal"]:
            return True
        name = getattr(f, "__qualname__", "")
        cells = [c.cell_contents for c in (getattr(f, "__closure__", None) or ())]
        if name.startswith("packed_sequence_mask_function."):
            docs.extend(c for c in cells if isinstance(c, Tensor))
            return True
        if name.startswith("sliding_window_overlay."):
            return True
        if name.startswith("remap_positions_for_packed_sequence."):
            inner = [c for c in cells if callable(c)]
            return len(inner) == 1 and plain(inner[0])
        if name.startswith("and_masks."):
            parts = [c for c in cells if isinstance(c, tuple)]
            return len(parts) == 1 and all(plain(f) for f in parts[0])
        return False

    return docs[0] if plain(fn) and len(docs) == 1 and docs[0].dim() == 2 else None


def _may_sync(t: Tensor) -> bool:
    """Whether reading ``t`` on the host is harmless: eager code, not compiling, not capturing a
    CUDA graph.  Then, once per forward (the mask function runs once per mask type, not per
    layer), an all-ones padding mask is dropped, as transformers does for its own backends."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def build_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
               kv_offset=0, mask_function=None, attention_mask: Tensor | None = None,
               **kwargs) -> Tensor | None:
    """transformers' mask-interface contract.  Returns the 2-D boolean padding mask (B, kv_length)
    (or None without padding) when the pattern is plain causal or sliding and the
    keys end where the queries end (bottom-right alignment); else transformers' SDPA 4-D mask.
    In eager code an all-ones padding mask becomes None (one host read per forward, as in
    transformers' own mask functions); compiled or captured, the mask is kept: no host sync."""
    if q_length is None:
        # transformers before its (q_length, q_offset) interface passes cache_position, the
        # queries' positions (a tensor, not read here): as many queries as keys from key 0 (no
        # cache, or a cache's first fill) are aligned; anything else takes the 4-D mask
        position = kwargs.pop("cache_position")
        q_length = position.shape[0]
        aligned = kv_offset == 0 and kv_length == q_length

        def fallback() -> Tensor | None:
            return _MASKING["sdpa"](batch_size=batch_size, cache_position=position, kv_length=kv_length,
                                    kv_offset=kv_offset, mask_function=mask_function,
                                    attention_mask=attention_mask, **kwargs)
    else:
        aligned = (isinstance(q_offset, int) and isinstance(kv_offset, int)
                   and kv_offset + kv_length == q_offset + q_length)

        def fallback() -> Tensor | None:
            return _MASKING["sdpa"](batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                    q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                    attention_mask=attention_mask, **kwargs)

    if (attention_mask is None and aligned and q_length == kv_length > 1 and mask_function is not None
            and not kwargs.get("use_vmap", False) and not torch.compiler.is_compiling()):
        docs = _packed_documents(mask_function)  # packing: the document ids, for the varlen kernels
        if docs is not None and docs.shape[1] == kv_length:
            return docs
    if mask_function is not None and aligned and _plain_mask_function(mask_function, kwargs):
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:].bool()
        if attention_mask.shape[1] == kv_length:
            if _may_sync(attention_mask) and bool(attention_mask.all()):
                return None  # no padding after all: skip the unpadding's gathers
            return attention_mask
    return fallback()


def _unpadded(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, **kw) -> Tensor:
    """Attention of (B, H, S, D) tensors whose tokens ``mask`` (B, S) marks as real: the real
    tokens are packed first (a stable sort of the flattened mask; the padded ones after them,
    outside every sequence) into the varlen kernels, and the output is scattered back, zeros on
    padded rows.  Static shapes only: no host sync, nothing recompiles when the padding changes.
    Returns (B, S, H, D)."""
    from ..api import flash_attn_varlen_func

    b, _, s, _ = query.shape
    flat = mask.reshape(-1)
    order = torch.argsort((~flat).to(torch.uint8), stable=True)  # packed slot -> token
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    lens = mask.sum(1, dtype=torch.int32)
    cu = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0, dtype=torch.int32)])
    rows, cols = order // s, order % s
    q, k, v = (t.transpose(1, 2)[rows, cols] for t in (query, key, value))  # (B*S, H, D) gathers
    out = flash_attn_varlen_func(q, k, v, cu, cu, s, s, **kw)[where]  # back in token order
    out = torch.where(flat[:, None, None], out, out.new_zeros(()))  # padded rows: 0, never garbage
    return out.view(b, s, *out.shape[1:])


_DOCS: dict = {}  # the last document-id tensor and its cu_seqlens (every layer gets the same one)


def _documents(query: Tensor, key: Tensor, value: Tensor, docs: Tensor, **kw) -> Tensor:
    """Attention of (B, H, S, D) tensors packed with documents (``docs`` (B, S): document index
    of each token, nondecreasing along a row, as transformers finds them from ``position_ids``):
    each document one varlen sequence.  Counting the documents reads them on the host once per
    forward (eager code only, as transformers' own flash path does).  Returns (B, S, H, D)."""
    from ..api import flash_attn_varlen_func

    b, _, s, d = query.shape
    if _DOCS.get("ids") is not docs:
        rows = docs.long() + torch.arange(b, device=docs.device)[:, None] * (s + 1)  # rows never share one
        counts = torch.unique_consecutive(rows.reshape(-1), return_counts=True)[1]
        cu = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
        _DOCS.update(ids=docs, cu=cu)
    cu = _DOCS["cu"]
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    return flash_attn_varlen_func(q, k, v, cu, cu, s, s, **kw).view(b, s, -1, d)


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
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, Sq, D), key/value (B, H_kv, Sk, D),
    ``attention_mask`` from :func:`build_mask` (2-D padding mask, 4-D boolean mask, or None);
    returns ``(attn_output (B, Sq, H, D), None)`` (no attention weights)."""
    from ..api import _attention, flash_attn_varlen_func, scaled_dot_product_attention

    global calls
    if not torch.compiler.is_compiling():  # (a global that changes would recompile every call)
        calls += 1
    if kwargs.get("output_attentions", False):
        raise ValueError(f"attn_implementation={NAME!r} does not return attention weights "
                         "(output_attentions=True): use 'eager' for that")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    sink = s_aux.float() if s_aux is not None else None
    softcap = float(softcap) if softcap else 0.0
    window = (-1, -1)
    if sliding_window and causal:  # transformers' causal window: keys (i - W, i]
        window = (int(sliding_window) - 1, 0)
    kw = dict(dropout_p=float(dropout), softmax_scale=scaling, causal=causal, window_size=window,
              softcap=softcap, learnable_sink=sink)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype != torch.bool:
        return _documents(query, key, value, attention_mask, **kw), None  # packed documents
    if attention_mask is not None and attention_mask.dim() == 2 and q_len == kv_len:  # padding: unpad
        return _unpadded(query, key, value, attention_mask, **kw), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and query.shape[0] == 1 and q_len == kv_len:
        # (the documents' mask, if transformers also built one from position_ids, says the same)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D): one packed row
        out = flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), kwargs.get("max_length_q"),
                                     kwargs.get("max_length_k"), **kw)
        return out[None], None
    if attention_mask is None or attention_mask.dim() == 2:
        # Keys end where the queries end (the mask function checked it): causal bottom-right, so
        # a decoding step with a cache sees every cached key (or the window's last ones); a
        # padding mask with fewer queries than keys (decoding) is read as a (B, 1, 1, Sk) key mask.
        key_mask = attention_mask[:, None, None, :] if attention_mask is not None else None
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = _attention(q, k, v, scaling, causal, True, "fa2", 0, "auto", softcap, None, window, sink,
                         float(dropout), key_mask)[0]
        return out, None
    # transformers' 4-D boolean mask (causality and windows in it); a static cache's mask
    # covers its capacity
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask[:, :, :, :kv_len],
                                       dropout_p=float(dropout), scale=scaling, enable_gqa=True,
                                       softcap=softcap, learnable_sink=sink)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention function and its mask function with transformers under ``name``
    (default ``"fm_triton"``); returns the name to pass as ``attn_implementation``."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface, masking_utils
    except ImportError as exc:  # transformers missing, or older than its mask interface
        raise ImportError("flash_module's transformers backend needs transformers with AttentionInterface "
                          "and AttentionMaskInterface (>= 4.54): pip install 'flash_module[hf]'") from exc
    if "flash" in name:
        raise ValueError(f"name={name!r}: transformers routes implementation names containing 'flash' to its "
                         "own flash-attention loader; pick another (default 'fm_triton')")
    _MASKING.update(causal=masking_utils.causal_mask_function, sdpa=masking_utils.sdpa_mask,
                    and_code=masking_utils.and_masks(masking_utils.causal_mask_function).__code__)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)
    return name
