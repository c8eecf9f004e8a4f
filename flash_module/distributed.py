"""Context parallelism: ring attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Each rank of ``group`` holds a shard of the sequence for q, k and v (bshd: (B, S_local, H, D)).
K/V shards travel around the ring, one hop per step, with ``torch.distributed`` point-to-point
ops that run while the current step computes.  Every step produces a partial attention of the
local queries over one K/V shard, ``(out_c, lse_c)``.  Those are merged with
:func:`flash_module.merge_attention_states`, the tiling softmax's merge, so after W steps each
rank holds exactly the attention of its queries over the whole sequence.

The backward rotates K/V again, together with dK/dV accumulators.  Each step adds the local
queries' contribution to the visiting shard's dK/dV with the FA2 backward op, driven by the
*final* (merged) ``out`` and ``lse``: ``P = exp(S - lse)`` with the global LSE is the true
probability of every visiting key.  After W steps the accumulators hop once more, home to the
rank that owns the shard.

Sharding layouts (``layout=``):

* ``"contiguous"``: rank r holds positions [r·S_local, (r+1)·S_local).
* ``"zigzag"`` (for causal load balance): the sequence is cut into 2W chunks and rank r holds
  chunks r and 2W-1-r, so every rank has the same amount of causal work.

Causal masking is decided per (query chunk, key chunk) pair: a key chunk before the query
chunk is fully visible, the same chunk is the causal diagonal, a later chunk is skipped.  A
sliding window and ALiBi measure distances in the global sequence: each pair's step passes the
ops the key chunk's distance behind the query chunk (``shift``), and pairs the window leaves
without a single visible key are skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from ._runtime import acc_dtype, lse_dtype
from .api import _check_alibi, _check_qkv_bshd, _check_sink, _check_tensor, _check_variants

LAYOUTS = ("contiguous", "zigzag")


def _chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Global chunk indices held by ``rank`` (chunks of equal size, in local order)."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def shard_positions(seq_local: int, rank: int, world: int, layout: str = "contiguous",
                    device=None) -> Tensor:
    """Global token positions of a rank's local shard (e.g. for RoPE), shape (seq_local,)."""
    ids = _chunk_ids(rank, world, layout)
    chunk = seq_local // len(ids)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in ids])


def shard_sequence(x: Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 1) -> Tensor:
    """This rank's shard of a full sequence tensor (along ``dim``), for tests and data loaders.

    The sequence length must divide into ``world`` chunks (``2 * world`` for zigzag): ring
    attention needs equal shards on every rank.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    n_chunks = world if layout == "contiguous" else 2 * world
    if x.shape[dim] % n_chunks:
        raise ValueError(
            f"sequence length {x.shape[dim]} (dim {dim} of {tuple(x.shape)}) does not split into {n_chunks} "
            f"equal chunks ({layout} layout, world={world}); pad it to a multiple of {n_chunks}"
        )
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[c] for c in _chunk_ids(rank, world, layout)], dim=dim)


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _check_equal_shards(q: Tensor, k: Tensor, group) -> None:
    """ValueError on every rank unless all ranks hold shards of one shape and dtype.

    Unequal shards would make the ring's point-to-point transfers disagree on sizes, which the
    communication backends answer by aborting the process.  One small all-gather settles it
    first.  It reads the result on the host, so it is skipped while torch.compile traces or a
    CUDA graph captures (shapes are fixed there by then).
    """
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    world = dist.get_world_size(group)
    meta = torch.tensor([*q.shape, *k.shape, _DTYPE_CODES[q.dtype]], dtype=torch.int64, device=q.device)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    rows = torch.stack(gathered).cpu()
    if bool((rows != rows[0]).any()):
        shapes = ", ".join(f"rank {r}: q {tuple(row[:4].tolist())} k/v {tuple(row[4:8].tolist())}"
                           for r, row in enumerate(rows))
        raise ValueError(f"ring_attention needs shards of one shape and dtype on every rank; got {shapes}")


def _pairs(q_ids: list[int], k_ids: list[int], causal: bool, chunk: int = 1,
           window: tuple[int, int] = (-1, -1)):
    """(qi, ki, causal_flag, shift) for every pair of local query chunk i and visiting key chunk k
    (``chunk`` tokens each) that contributes: all pairs without causal; with causal, key chunks
    before (full) or equal to (diagonal, causal) the query chunk; with a window ``(left,
    right)`` (right already 0 when causal), only pairs with a key inside some query's window.
    ``shift``: how far the key chunk sits behind the query chunk, in tokens."""
    left, right = window
    for i, qc in enumerate(q_ids):
        for j, kc in enumerate(k_ids):
            if causal and kc > qc:
                continue
            if left >= 0 and (kc + 1) * chunk - 1 < qc * chunk - left:  # every key left of every window
                continue
            if right >= 0 and kc * chunk > (qc + 1) * chunk - 1 + right:  # every key right of it
                continue
            yield i, j, causal and kc == qc, (qc - kc) * chunk


def _ring_exchange(tensors: list[Tensor], group, rank: int, world: int):
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns
    (received buffers, requests)."""
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    recv = [torch.empty_like(t) for t in tensors]
    p2p = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    p2p += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
    return recv, dist.batch_isend_irecv(p2p)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, mode, impl, group, softcap, sink, alibi_slopes, window):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        q_ids = _chunk_ids(rank, world, layout)
        n = len(q_ids)
        qs, sq = q.chunk(n, dim=1), q.shape[1] // n
        outs: list[Tensor | None] = [None] * n
        lses: list[Tensor | None] = [None] * n
        kv = [k.contiguous(), v.contiguous()]
        for step in range(world):
            if step + 1 < world:  # the next shard travels while this one computes
                nxt, reqs = _ring_exchange(kv, group, rank, world)
            src = (rank - step) % world
            k_ids = _chunk_ids(src, world, layout)
            ks, vs = kv[0].chunk(n, dim=1), kv[1].chunk(n, dim=1)
            for i, j, diag, shift in _pairs(q_ids, k_ids, causal, sq, window):
                o, lse = ops.attention_fwd(qs[i], ks[j], vs[j], scale, diag, True, mode, 0, impl, softcap,
                                           alibi_slopes, *window, shift=shift)
                if outs[i] is None:
                    outs[i], lses[i] = o, lse
                else:
                    outs[i], lses[i] = ops.merge_attention_states(outs[i], lses[i], o, lse)
            if step + 1 < world:
                _wait(reqs)
                kv = nxt
        for i in range(n):  # only possible with causal and no visible chunk: not with these layouts
            if outs[i] is None:
                outs[i] = torch.zeros_like(qs[i])
                lses[i] = torch.full((q.shape[0], q.shape[2], sq), float("-inf"), device=q.device,
                                     dtype=lse_dtype(q.dtype))
        out = torch.cat(outs, dim=1)
        lse = torch.cat(lses, dim=2)
        if sink is not None:  # the sink joins each row's denominator once, after every key chunk
            out, lse = reference.add_sink(out, lse, sink.detach())
        ctx.save_for_backward(q, k, v, out, lse, sink, alibi_slopes)
        ctx.args = (scale, causal, layout, mode, impl, group, softcap, window)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, alibi_slopes = ctx.saved_tensors
        scale, causal, layout, mode, impl, group, softcap, window = ctx.args
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        q_ids = _chunk_ids(rank, world, layout)
        n = len(q_ids)
        qs, dos = q.chunk(n, dim=1), dout.contiguous().chunk(n, dim=1)
        sq = q.shape[1] // n
        os_, lses = out.chunk(n, dim=1), lse.chunk(n, dim=2)
        dq = torch.zeros_like(q, dtype=acc_dtype(q.dtype))
        dqs = dq.chunk(n, dim=1)
        acc = dq.dtype
        # Travelling state: this shard's K, V and the dK, dV accumulated for it so far.
        state = [k.contiguous(), v.contiguous(),
                 torch.zeros(k.shape, dtype=acc, device=k.device),  # contiguous, whatever k's strides
                 torch.zeros(v.shape, dtype=acc, device=v.device)]
        for step in range(world):
            src = (rank - step) % world
            k_ids = _chunk_ids(src, world, layout)
            if step + 1 < world:  # K/V of the next step can travel now; dK/dV after this step
                nxt_kv, reqs_kv = _ring_exchange(state[:2], group, rank, world)
            ks, vs = state[0].chunk(n, dim=1), state[1].chunk(n, dim=1)
            dks, dvs = state[2].chunk(n, dim=1), state[3].chunk(n, dim=1)
            for i, j, diag, shift in _pairs(q_ids, k_ids, causal, sq, window):
                dqi, dkj, dvj = ops.attention_bwd(dos[i], qs[i], ks[j], vs[j], os_[i], lses[i].contiguous(),
                                                  None, scale, diag, True, mode, impl, softcap, alibi_slopes,
                                                  *window, shift=shift)
                dqs[i].add_(dqi)
                dks[j].add_(dkj)
                dvs[j].add_(dvj)
            # dK/dV go to the next rank (with the K/V that rank receives); after the last step
            # this hop brings each accumulator home to the shard's owner.  A group of one rank
            # is already home (and gloo cannot send to itself).
            if world > 1:
                nxt_d, reqs_d = _ring_exchange(state[2:], group, rank, world)
            else:
                nxt_d, reqs_d = list(state[2:]), []
            if step + 1 < world:
                _wait(reqs_kv)
            _wait(reqs_d)
            state = (nxt_kv if step + 1 < world else state[:2]) + nxt_d
        # The sink's gradient from this rank's rows (the LSE above already includes the sink, so
        # every P was right); summing it over the group, as data-parallel gradient reduction
        # does, gives the full sequence's.
        dsink = None
        if sink is not None and ctx.needs_input_grad[10]:
            dsink = ops.sink_grad(sink, out, dout, lse, None)
        nones = (None,) * 7  # scale, causal, layout, mode, impl, group, softcap
        return (dq.to(q.dtype), state[2].to(k.dtype), state[3].to(v.dtype), *nones, dsink, None, None)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "contiguous",
    mode: str = "fa2",
    *,
    impl: str = "auto",
    softcap: float = 0.0,
    learnable_sink: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Args:
        q: (batch, seqlen_local, nheads, headdim), this rank's query shard.
        k, v: (batch, seqlen_local, nheads_kv, headdim), this rank's key/value shards
            (GQA/MQA: nheads % nheads_kv == 0).  Every rank holds the same shard length.
        group: the process group (default: the world).
        causal: causal attention over the *global* sequence (queries and keys share positions).
        softmax_scale: default 1/sqrt(headdim).
        layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring; with zigzag the
            shard length must be even).  Use :func:`shard_sequence` to cut full tensors.
        mode: the attention algorithm of every step (``flash_module.MODES``).
        impl: its implementation (``flash_module.IMPLS``; ``"torch"`` forces the PyTorch path).
        softcap: as in :func:`flash_module.flash_attn_func` (applied in every step).
        learnable_sink: (nheads,) attention-sink logits as in :func:`flash_module.flash_attn_func`,
            joined once after all key chunks; its gradient on each rank covers that rank's query
            rows (sum it over the group, as data-parallel gradient reduction does).
        window_size: ``(left, right)`` sliding window over the *global* positions, -1 =
            unbounded (causal forces right = 0), as in :func:`flash_module.flash_attn_func`; key
            chunks wholly outside every query's window are skipped.
        alibi_slopes: fp32 (nheads,) or (batch, nheads): bias ``-slope * |i - j|`` over global
            positions (flash-attn's ALiBi with Sq == Sk).
        (Dropout is not supported here yet.)

    Returns:
        (batch, seqlen_local, nheads, headdim): this rank's rows of the full attention output.
        Differentiable in q, k and v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, "(batch, seqlen_local, nheads, headdim)")
    _check_qkv_bshd(q, k, v, ("q", "k", "v"), "(batch, seqlen_local, nheads, headdim)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    mode, impl = ops.check_mode(mode, impl)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q and k must hold the same shard length, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zigzag layout needs an even shard length, got {q.shape[1]}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs an initialised torch.distributed process group")
    _check_equal_shards(q, k, group)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    _check_variants(0.0, window_size, softcap, alibi_slopes)
    _check_sink(learnable_sink, q, q.shape[2])
    _check_alibi(alibi_slopes, q, q.shape[0], q.shape[2])
    left, right = (int(w) for w in window_size)
    # flash-attn: causal overrides the right bound; causal alone is no window (the pairs decide)
    window = (-1, -1) if causal and left < 0 else (left, 0 if causal else right)
    return _RingAttention.apply(q, k, v, scale, bool(causal), layout, mode, impl, group, float(softcap),
                                learnable_sink, alibi_slopes, window)
