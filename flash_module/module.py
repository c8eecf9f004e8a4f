"""nn.Module layers: the attention core and a multi-head block with fused QKV, GQA and RoPE.

The modules hold configuration and parameters only; the computation is the public functions in
:mod:`flash_module.api`, so everything those support (torch.compile, CUDA graphs, export,
autocast, both layouts) holds for the layers too.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from . import ops
from .api import flash_attn_func, scaled_dot_product_attention

LAYOUTS = ("bshd", "bhsd")


def _check_dropout(dropout: float) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")


class FlashAttention(nn.Module):
    """softmax(q k^T * scale) v over pre-projected heads.

    Args:
        causal: causal masking.  With ``layout="bshd"`` it is flash-attn's bottom-right
            alignment (query i sees keys j <= i + Sk - Sq); with ``"bhsd"`` torch SDPA's
            top-left one (j <= i).  They agree when Sq == Sk.
        softmax_scale: default 1/sqrt(head_dim).
        dropout: attention dropout probability, applied in training mode only (``module.train()``;
            the kernels' Philox mask, see :func:`flash_module.flash_attn_func`).  Not with
            context parallelism yet.
        mode: algorithm, one of ``flash_module.MODES``.
        impl: implementation, one of ``flash_module.IMPLS`` (``"torch"`` forces the PyTorch path).
        num_splits: key chunks for ``mode="tiling"`` (0 = automatic).
        softcap: > 0 caps the scaled scores at ``softcap * tanh(s / softcap)`` (Gemma 2);
            0 (default) is off.  Also with context parallelism (every ring step).
        window_size: ``(left, right)`` sliding-window attention (Mistral, Gemma), -1 =
            unbounded, aligned like ``causal`` (see :func:`flash_module.flash_attn_func`); with
            context parallelism over the global positions.
        context_parallel_group: a ``torch.distributed`` process group: the inputs are this
            rank's shards of a sequence split across the group, and attention runs as ring
            attention (:func:`flash_module.distributed.ring_attention`; causal is global).
        context_parallel_layout: ``"contiguous"`` or ``"zigzag"`` sharding.
        layout: ``"bshd"`` for (batch, seq, heads, head_dim) inputs, ``"bhsd"`` for
            (batch, heads, seq, head_dim).  K/V may have fewer heads (GQA/MQA).

    Shapes: q (B, Sq, H, D) and k, v (B, Sk, H_kv, D) in "bshd" (transpose 1 and 2 for
    "bhsd"); returns the same layout as q.
    """

    def __init__(
        self,
        causal: bool = False,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        mode: str = "fa2",
        layout: str = "bshd",
        num_splits: int = 0,
        context_parallel_group=None,
        context_parallel_layout: str = "contiguous",
        impl: str = "auto",
        softcap: float = 0.0,
        window_size: tuple[int, int] = (-1, -1),
    ) -> None:
        super().__init__()
        mode, impl = ops.check_mode(mode, impl)
        _check_dropout(dropout)
        window_size = tuple(window_size)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.dropout = dropout
        self.mode = mode
        self.impl = impl
        self.layout = layout
        self.num_splits = num_splits
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        self.softcap = softcap
        self.window_size = window_size

    def forward(self, q: Tensor, k: Tensor, v: Tensor, learnable_sink: Tensor | None = None) -> Tensor:
        """Attention of q over k, v in the module's layout; ``learnable_sink`` (H,) or None:
        attention-sink logits (see :func:`flash_module.flash_attn_func`)."""
        dropout_p = self.dropout if self.training else 0.0
        if self.context_parallel_group is not None:
            from .distributed import ring_attention

            to_bshd = (lambda t: t) if self.layout == "bshd" else (lambda t: t.transpose(1, 2))
            out = ring_attention(to_bshd(q), to_bshd(k), to_bshd(v), self.context_parallel_group,
                                 self.causal, self.softmax_scale, self.context_parallel_layout, self.mode,
                                 impl=self.impl, softcap=self.softcap, learnable_sink=learnable_sink,
                                 window_size=self.window_size, dropout_p=dropout_p)
            return to_bshd(out)
        if self.layout == "bshd":
            return flash_attn_func(q, k, v, dropout_p, softmax_scale=self.softmax_scale, causal=self.causal,
                                   softcap=self.softcap, window_size=self.window_size, mode=self.mode,
                                   impl=self.impl, num_splits=self.num_splits, learnable_sink=learnable_sink)
        return scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal,
                                            scale=self.softmax_scale,
                                            enable_gqa=True, mode=self.mode, impl=self.impl,
                                            num_splits=self.num_splits, softcap=self.softcap,
                                            window_size=self.window_size, learnable_sink=learnable_sink)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, dropout={self.dropout}, "
                f"mode={self.mode!r}, impl={self.impl!r}, layout={self.layout!r}"
                + (f", num_splits={self.num_splits}" if self.num_splits else "")
                + (f", softcap={self.softcap}" if self.softcap else "")
                + (f", window_size={self.window_size}" if self.window_size != (-1, -1) else "")
                + (f", context_parallel={self.context_parallel_layout}"
                   if self.context_parallel_group is not None else ""))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), "rotate-half" convention, applied to (B, S, H, D).

    Pairs dimension ``i`` with ``i + D/2`` and rotates them by ``pos * base**(-2i/D)``.
    ``offset`` shifts the positions (decoding with a KV cache); ``positions`` gives them
    explicitly (a context-parallel shard's global positions).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.head_dim = head_dim
        self.base = base

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate (B, S, H, D) ``x``; positions ``offset + arange(S)``, or ``positions`` (S,)."""
        # fp32 math for fp16/bf16/fp32 inputs; fp64 stays fp64 (gradcheck needs it exact).
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        seq = x.shape[1]
        if positions is not None:
            pos = positions.to(device=x.device, dtype=work)
        else:
            pos = torch.arange(offset, offset + seq, device=x.device, dtype=work)
        angles = torch.outer(pos, self.inv_freq.to(work))  # (S, D/2)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1)[None, :, None, :]  # (1, S, 1, D)
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1)[None, :, None, :]
        xw = x.to(work)
        x1, x2 = xw.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xw * cos + rotated * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


class MultiheadFlashAttention(nn.Module):
    """Multi-head self-attention on (B, S, E) with a fused QKV projection, GQA/MQA and RoPE.

    ``batch_first`` by design, no ``need_weights``: ``forward(x) -> (B, S, E)``.

    Args:
        embed_dim: model width E; must be divisible by ``num_heads``.
        num_heads: query heads H (head_dim = E / H).
        num_kv_heads: key/value heads (default H; H % num_kv_heads == 0 for GQA/MQA).
        bias: biases in the projections.
        causal: causal self-attention.
        dropout: attention dropout probability, in training mode only (see :class:`FlashAttention`).
        mode: attention algorithm, one of ``flash_module.MODES``.
        impl: implementation, one of ``flash_module.IMPLS``.
        softcap, window_size: score softcapping and sliding window as in :class:`FlashAttention`
            (also in KV-cache decoding).
        sinks: learn one attention-sink logit per query head (gpt-oss): the parameter
            ``sinks`` (H,), initialised to 0, joins every row's softmax denominator.
        rotary: apply rotary position embeddings to q and k.
        rope_base: RoPE frequency base.
        context_parallel_group, context_parallel_layout: run attention as ring attention over
            a sequence sharded across this process group (see :class:`FlashAttention`); the
            input ``x`` is then this rank's (B, S_local, E) shard.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        causal: bool = False,
        dropout: float = 0.0,
        mode: str = "fa2",
        rotary: bool = False,
        rope_base: float = 10000.0,
        context_parallel_group=None,
        context_parallel_layout: str = "contiguous",
        device=None,
        dtype=None,
        impl: str = "auto",
        softcap: float = 0.0,
        window_size: tuple[int, int] = (-1, -1),
        sinks: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias,
                                  **factory)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **factory)
        self.attn = FlashAttention(causal=causal, dropout=dropout, mode=mode, impl=impl, layout="bshd",
                                   context_parallel_group=context_parallel_group,
                                   context_parallel_layout=context_parallel_layout, softcap=softcap,
                                   window_size=window_size)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None
        # Kept here too: RoPE needs the shard's positions even if ``attn`` is swapped out.
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        self.rotary = RotaryEmbedding(self.head_dim, rope_base, device=device) if rotary else None

    def allocate_kv_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Preallocate a static KV cache (buffers ``k_cache``/``v_cache``, (batch_size,
        max_seq_len, H_kv, D), not saved in the state dict) for generation.  Its shapes never
        change, so a decode step compiles once and can be captured in a CUDA graph; see
        :meth:`forward`'s ``cache_seqlens``."""
        if self.context_parallel_group is not None:
            raise ValueError("a KV cache cannot be used with context parallelism")
        weight = self.qkv_proj.weight
        shape = (batch_size, max_seq_len, self.num_kv_heads, self.head_dim)
        factory = dict(device=device or weight.device, dtype=dtype or weight.dtype)
        self.register_buffer("k_cache", torch.zeros(shape, **factory), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, **factory), persistent=False)
        if self.rotary is not None:  # the rotation tables, (max_seq_len, D / 2), as RotaryEmbedding
            angles = torch.outer(torch.arange(max_seq_len, device=factory["device"], dtype=torch.float32),
                                 self.rotary.inv_freq.to(device=factory["device"], dtype=torch.float32))
            self.register_buffer("rotary_cos", angles.cos(), persistent=False)
            self.register_buffer("rotary_sin", angles.sin(), persistent=False)

    def free_kv_cache(self) -> None:
        """Drop the buffers of :meth:`allocate_kv_cache`."""
        for name in ("k_cache", "v_cache", "rotary_cos", "rotary_sin"):
            if name in self._buffers:
                del self._buffers[name]

    def forward(self, x: Tensor, cache_seqlens: Tensor | None = None) -> Tensor:
        """``x`` (B, S, E) -> (B, S, E).

        With ``cache_seqlens`` ((B,) int32: how many tokens each sequence already has in the
        cache of :meth:`allocate_kv_cache`), ``x`` holds the next S tokens: their keys and values
        are written into the cache at those positions (in place) and the tokens attend to
        everything cached before them (a prompt: S tokens with ``cache_seqlens`` 0; a decode
        step: S = 1).  RoPE rotates each token at its position in its sequence.  The caller
        advances ``cache_seqlens`` by S afterwards.  Inference only.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, seq, {self.embed_dim}), got {tuple(x.shape)}")
        if cache_seqlens is not None and "k_cache" not in self._buffers:
            raise ValueError("cache_seqlens needs a KV cache: call allocate_kv_cache(batch_size, "
                             "max_seq_len) first")
        qkv = self.qkv_proj(x)  # (B, S, (H + 2 H_kv) D)
        hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Splitting the last dim gives strided views: the kernels read them without copies.
        q = rearrange(qkv[..., :hd], "b s (h d) -> b s h d", d=self.head_dim)
        k = rearrange(qkv[..., hd:hd + kvd], "b s (h d) -> b s h d", d=self.head_dim)
        v = rearrange(qkv[..., hd + kvd:], "b s (h d) -> b s h d", d=self.head_dim)
        if cache_seqlens is not None:
            from .api import flash_attn_with_kvcache

            rotary = {}
            if self.rotary is not None:
                rotary = dict(rotary_cos=self.rotary_cos, rotary_sin=self.rotary_sin,
                              rotary_interleaved=False)
            attn = self.attn  # FlashAttention's settings (a swapped-in core may lack some)
            out = flash_attn_with_kvcache(
                q, self.k_cache, self.v_cache, k, v, cache_seqlens=cache_seqlens, causal=attn.causal,
                softmax_scale=getattr(attn, "softmax_scale", None), impl=getattr(attn, "impl", "auto"),
                softcap=getattr(attn, "softcap", 0.0), window_size=getattr(attn, "window_size", (-1, -1)),
                learnable_sink=self.sinks, **rotary)
            return self.out_proj(rearrange(out, "b s h d -> b s (h d)"))
        if self.rotary is not None:
            positions = None
            group = self.context_parallel_group
            if group is not None:  # this rank holds a shard: rotate by its global positions
                from .distributed import shard_positions

                positions = shard_positions(x.shape[1], torch.distributed.get_rank(group),
                                            torch.distributed.get_world_size(group),
                                            self.context_parallel_layout, x.device)
            q, k = self.rotary(q, positions=positions), self.rotary(k, positions=positions)
        out = self.attn(q, k, v) if self.sinks is None else self.attn(q, k, v, learnable_sink=self.sinks)
        return self.out_proj(rearrange(out, "b s h d -> b s (h d)"))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")
