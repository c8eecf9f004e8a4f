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

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from ._runtime import acc_dtype, lse_dtype
from .api import _check_alibi, _check_qkv_bshd, _check_sink, _check_tensor, _check_variants, dropout_seed

LAYOUTS = ("contiguous", "zigzag")
#: How the ring moves K/V (and the backward's dK/dV) between ranks (``FLASH_MODULE_RING_TRANSPORT``
#: at import; the attribute is read at each call): ``"p2p"`` (the default), torch.distributed's
#: ``batch_isend_irecv`` (NCCL's copy kernels on GPUs, which take SMs from the attention they
#: overlap); ``"copy"``, pulls through torch's symmetric memory that the GPUs' copy engines run
#: (:class:`_SymmetricPull`; eager CUDA calls: compiled or captured calls, CPU groups and torch
#: builds without symmetric memory keep ``"p2p"``).  ``"copy"`` has not run on a GPU yet
#: (``benchmarks/ring_transport.py`` measures both).
TRANSPORTS = ("p2p", "copy")
TRANSPORT = os.environ.get("FLASH_MODULE_RING_TRANSPORT", "p2p")
#: How :func:`ring_attention_varlen` moves K/V between ranks.
METHODS = ("ring", "allgather")


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


def _ring_exchange(tensors: list[Tensor], group, rank: int, world: int, reverse: bool = False):
    """Start sending ``tensors`` to the next rank and receiving the previous rank's (``reverse``:
    to the previous, from the next); returns (received buffers, requests)."""
    step = -1 if reverse else 1
    dst, src = ((rank + step) % world, (rank - step) % world)
    if group is not None:
        dst, src = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
    recv = [torch.empty_like(t) for t in tensors]
    p2p = [dist.P2POp(dist.isend, t, dst, group) for t in tensors]
    p2p += [dist.P2POp(dist.irecv, r, src, group) for r in recv]
    return recv, dist.batch_isend_irecv(p2p)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


class _P2P:
    """The ring's exchanges by torch.distributed point-to-point ops (transport ``"p2p"``)."""

    def __init__(self, group) -> None:
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    def exchange(self, tensors: list[Tensor], reverse: bool = False, lane: int = 0):
        """Start sending ``tensors`` one rank on (``reverse``: back) and receiving the other
        neighbour's; returns (the received tensors, a handle for :meth:`wait`)."""
        return _ring_exchange(tensors, self.group, self.rank, self.world, reverse)

    def wait(self, handle) -> None:
        """Make the current stream wait for an exchange's arrival."""
        _wait(handle)

    def keep(self, tensors: list[Tensor]) -> list[Tensor]:
        """Received tensors that must outlive the ring pass (their own buffers here)."""
        return tensors

    def finish(self) -> None:
        """End of a ring pass."""


#: Per (group name, device): (this rank's symmetric buffer, its handle) (transport ``"copy"``);
#: buffers outgrown stay alive in _RETIRED (a peer may still read one).
_WORKSPACES: dict = {}
_RETIRED: list = []
#: Per device: the stream the ``"copy"`` transport's barriers and copies run on.
_SIDE_STREAMS: dict = {}


def _symmetric_workspace(group, device: torch.device, nbytes: int):
    """A byte buffer of at least ``nbytes`` in torch's symmetric memory for ``group`` (a
    collective the first time and whenever it grows: every rank asks for the same size at the
    same call), and its handle (``get_buffer(rank, sizes, dtype, storage_offset)``,
    ``barrier(channel)``); None where there is none (CPU, no symmetric memory in this torch)."""
    if device.type != "cuda":
        return None
    key = (group.group_name, device.index)
    cached = _WORKSPACES.get(key)
    if cached is not None and cached[0].numel() >= nbytes:
        return cached
    try:
        from torch.distributed import _symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it, newer deprecates it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group.group_name)
        size = max(nbytes, 2 * cached[0].numel() if cached else 0)
        buf = symm_mem.empty(size, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, group.group_name)
    except Exception as err:  # noqa: BLE001 - no symmetric memory here: the caller keeps "p2p"
        warnings.warn(f"ring attention: transport 'copy' unavailable ({type(err).__name__}: {err}); "
                      "using 'p2p'", RuntimeWarning, stacklevel=3)
        return None
    if cached is not None:
        _RETIRED.append(cached)
    _WORKSPACES[key] = (buf, handle)
    return buf, handle


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


class _SymmetricPull:
    """The ring's exchanges as pulls through symmetric memory (transport ``"copy"``).

    Each lane (a stream of shards: the forward's K/V; the backward's K/V and its dK/dV) owns two
    slots in a buffer every rank of the group can read.  At a lane's exchange n every rank
    publishes its shard in slot n % 2 (a local copy, unless the shard already lies there: it
    arrived at exchange n - 1), meets the others at a barrier, and copies its source
    neighbour's slot n % 2 into its own slot (n + 1) % 2.  That copy runs between the GPUs on
    their copy engines and takes no SM from the attention kernels.  One barrier per exchange is
    enough: a rank overwrites slot (n + 1) % 2 only after every rank has passed exchange n's
    barrier, so after every pull from it at exchange n - 1; and the side stream first waits for
    the compute stream, so after every kernel that read it.  :meth:`finish` adds a last
    barrier, so the next pass's first publish cannot overwrite a slot a peer still reads.
    ``workspace`` = (this rank's byte buffer, a handle with ``get_buffer`` and ``barrier``);
    ``lanes``: bytes per slot of each lane.  On CUDA everything runs on a side stream, in order.
    """

    def __init__(self, group, device: torch.device, workspace, lanes: list[int]) -> None:
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.handle = workspace[1]
        self.slot_bytes = [_align(n) for n in lanes]
        self.base = [2 * sum(self.slot_bytes[:i]) for i in range(len(lanes))]  # each lane's first byte
        self.count = [0] * len(lanes)  # exchanges so far per lane
        self.side = None
        if device.type == "cuda":
            if device.index not in _SIDE_STREAMS:
                _SIDE_STREAMS[device.index] = torch.cuda.Stream(device)
            self.side = _SIDE_STREAMS[device.index]

    @staticmethod
    def bytes_needed(lanes: list[int]) -> int:
        """The workspace size for slots of these byte sizes."""
        return sum(2 * _align(n) for n in lanes)

    def _slot(self, rank: int, lane: int, slot: int, like: list[Tensor]) -> list[Tensor]:
        """Views of ``rank``'s slot ``slot`` of ``lane``, shaped like ``like`` (one after another)."""
        offset, views = self.base[lane] + slot * self.slot_bytes[lane], []
        for t in like:
            elem = t.element_size()
            views.append(self.handle.get_buffer(rank, tuple(t.shape), t.dtype, offset // elem))
            offset += _align(t.numel() * elem)
        return views

    def _on_side(self):
        """The side stream's context, after it waits for the current stream (a no-op on CPU)."""
        if self.side is None:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream(self.side.device))
        return torch.cuda.stream(self.side)

    def exchange(self, tensors: list[Tensor], reverse: bool = False, lane: int = 0):
        """As :meth:`_P2P.exchange`: publish ``tensors`` in this rank's slot n % 2 of ``lane``,
        meet at a barrier, pull the source neighbour's slot n % 2 into this rank's slot
        (n + 1) % 2, which is returned (views of the workspace)."""
        n = self.count[lane]
        self.count[lane] += 1
        src = (self.rank + (1 if reverse else -1)) % self.world
        mine = self._slot(self.rank, lane, n % 2, tensors)
        recv = self._slot(self.rank, lane, (n + 1) % 2, tensors)
        theirs = self._slot(src, lane, n % 2, tensors)
        with self._on_side():
            for t, slot in zip(tensors, mine):
                if t.data_ptr() != slot.data_ptr():  # (the shard received at exchange n - 1 lies there)
                    if self.side is not None:
                        t.record_stream(self.side)  # read here: not reused before this copy is done
                    slot.copy_(t)
            self.handle.barrier(channel=0)
            for r, t in zip(recv, theirs):
                r.copy_(t)  # peer memory -> local: the copy engines
            event = None
            if self.side is not None:
                event = torch.cuda.Event()
                event.record(self.side)
        return recv, event

    def wait(self, handle) -> None:
        """Make the current stream wait for an exchange's pulls (its event on the side stream)."""
        if handle is not None:
            torch.cuda.current_stream(self.side.device).wait_event(handle)

    def keep(self, tensors: list[Tensor]) -> list[Tensor]:
        """Workspace views that must outlive the pass, copied out (the slots are reused)."""
        return [t.clone() for t in tensors]

    def finish(self) -> None:
        """The pass's last barrier: every pull from this rank's slots is done before the next
        pass writes them."""
        with self._on_side():
            self.handle.barrier(channel=0)


def _transport(group, like: list[list[Tensor]]):
    """The ring's transport for one pass (:data:`TRANSPORT`); ``like``: per lane, the tensors
    its exchanges carry (for the ``"copy"`` transport's slot sizes)."""
    if TRANSPORT not in TRANSPORTS:
        raise ValueError(f"FLASH_MODULE_RING_TRANSPORT must be one of {TRANSPORTS}, got {TRANSPORT!r}")
    device = like[0][0].device
    traced = torch.compiler.is_compiling() or (
        device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    if TRANSPORT == "copy" and not traced and dist.get_world_size(group) > 1:
        group = group if group is not None else dist.group.WORLD
        lanes = [sum(_align(t.numel() * t.element_size()) for t in ts) for ts in like]
        workspace = _symmetric_workspace(group, device, _SymmetricPull.bytes_needed(lanes))
        if workspace is not None:
            return _SymmetricPull(group, device, workspace, lanes)
    return _P2P(group)


def _merge(out_a, lse_a, out_b, lse_b):
    """merge_attention_states on either layout: dense (B, S, H, D) / (B, H, S), or varlen
    (T, H, D) / (H, T), given a batch dim of one."""
    if out_a.dim() == 4:
        return ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
    out, lse = ops.merge_attention_states(out_a[None], lse_a[None], out_b[None], lse_b[None])
    return out[0], lse[0]


def _ring_forward(q, k, v, group, layout, causal, window, seq_dim, attend):
    """The ring's forward on either layout (``seq_dim``: 1 for dense (B, S, H, D) shards, 0 for
    varlen (T, H, D); the LSE's sequence dim is the next one).  ``attend(q, k, v, diag, shift,
    row0)`` gives one (query chunk, key chunk) pair's ``(out, lse)`` (``row0``: the query chunk's
    first global row, for dropout's mask); the pairs' results are merged.
    Returns this rank's merged ``(out, lse)``, ``out`` still in the accumulator dtype (the caller
    adds any sink, then rounds once), and ``[k, v]`` of the shard the last step attended to (the
    next rank's; this rank's own with one rank): :func:`_ring_backward` starts from it."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q_ids = _chunk_ids(rank, world, layout)
    n = len(q_ids)
    qs, sq = q.chunk(n, dim=seq_dim), q.shape[seq_dim] // n
    # The merges accumulate in fp32 (fp64 for fp64 inputs) and round once at the end, as one
    # kernel over the whole sequence would: merging 16-bit partials would round every step.
    acc = acc_dtype(q.dtype)
    outs: list[Tensor | None] = [None] * n
    lses: list[Tensor | None] = [None] * n
    kv = [k.contiguous(), v.contiguous()]
    transport = _transport(group, [kv])
    for step in range(world):
        if step + 1 < world:  # the next shard travels while this one computes
            nxt, reqs = transport.exchange(kv)
        k_ids = _chunk_ids((rank - step) % world, world, layout)
        ks, vs = kv[0].chunk(n, dim=seq_dim), kv[1].chunk(n, dim=seq_dim)
        for i, j, diag, shift in _pairs(q_ids, k_ids, causal, sq, window):
            o, lse = attend(qs[i], ks[j], vs[j], diag, shift, q_ids[i] * sq)
            if outs[i] is None:
                outs[i], lses[i] = o.to(acc), lse
            else:
                outs[i], lses[i] = _merge(outs[i], lses[i], o, lse)
        if step + 1 < world:
            transport.wait(reqs)
            kv = nxt
    if world > 1:
        kv = transport.keep(kv)  # held until the backward
        transport.finish()
    for i in range(n):  # only possible with causal and no visible chunk: not with these layouts
        if outs[i] is None:
            outs[i] = torch.zeros_like(qs[i], dtype=acc)
            shape = (*qs[i].shape[:seq_dim], qs[i].shape[seq_dim + 1], sq)  # (B, H, S) or (H, T)
            lses[i] = torch.full(shape, float("-inf"), device=q.device, dtype=lse_dtype(q.dtype))
    return torch.cat(outs, dim=seq_dim), torch.cat(lses, dim=seq_dim + 1), kv


def _ring_backward(dout, q, k, v, out, lse, kv_last, group, layout, causal, window, seq_dim, grad):
    """The ring's backward (layouts as :func:`_ring_forward`): K/V travel again, and so does the
    dK/dV accumulated for them; ``grad(dout, q, k, v, out, lse, diag, shift, row0)`` gives one
    pair's ``(dq, dk, dv)``, driven by the merged ``out``/``lse``.  ``kv_last``: the K/V shard the
    forward's last step attended to (the next rank's).  Returns ``dq`` and this rank's dK/dV, in
    the accumulator dtype.

    The steps run in the forward's reverse order, and K/V travel the other way round the ring
    (to the previous rank): the first step attends to ``kv_last``, already here, and the last to
    this rank's own shard, so only W - 2 K/V hops remain.  Shard c then visits ranks c - 1, c -
    2, ..., c + 1 and ends on its owner c; the dK/dV accumulated for it travel with it.  Each
    step accumulates its pairs' dK/dV into a fresh buffer and only then adds the accumulator the
    next rank sent at the end of its previous step (in flight meanwhile) and sends the sum on;
    the last of these hops brings each accumulator home during its owner's own last step.  So
    every hop (W - 2 of K/V, W - 1 of dK/dV) overlaps a whole step and none is left after the
    compute."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q_ids = _chunk_ids(rank, world, layout)
    n = len(q_ids)
    qs, dos = q.chunk(n, dim=seq_dim), dout.contiguous().chunk(n, dim=seq_dim)
    sq = q.shape[seq_dim] // n
    os_, lses = out.chunk(n, dim=seq_dim), lse.chunk(n, dim=seq_dim + 1)
    dq = torch.zeros_like(q, dtype=acc_dtype(q.dtype))
    dqs = dq.chunk(n, dim=seq_dim)
    acc = dq.dtype
    kv = list(kv_last)  # the visiting shard's K, V
    d_in, reqs_d = None, []  # dK/dV of the visiting shard from the ranks after this one, in flight
    transport = _transport(group, [kv, [torch.empty(k.shape, dtype=acc, device="meta"),  # (sizes only)
                                        torch.empty(v.shape, dtype=acc, device="meta")]])
    for step in range(world):
        k_ids = _chunk_ids((rank + 1 + step) % world, world, layout)
        hop = step + 2 < world  # the next step's shard travels during this one (the last is ours)
        if hop:
            nxt_kv, reqs_kv = transport.exchange(kv, reverse=True, lane=0)
        ks, vs = kv[0].chunk(n, dim=seq_dim), kv[1].chunk(n, dim=seq_dim)
        d = [torch.zeros(k.shape, dtype=acc, device=k.device),  # contiguous, whatever k's strides
             torch.zeros(v.shape, dtype=acc, device=v.device)]
        dks, dvs = d[0].chunk(n, dim=seq_dim), d[1].chunk(n, dim=seq_dim)
        for i, j, diag, shift in _pairs(q_ids, k_ids, causal, sq, window):
            dqi, dkj, dvj = grad(dos[i], qs[i], ks[j], vs[j], os_[i], lses[i].contiguous(), diag, shift,
                                 q_ids[i] * sq)
            dqs[i].add_(dqi)
            dks[j].add_(dkj)
            dvs[j].add_(dvj)
        if d_in is not None:  # sent by the next rank after its previous step
            transport.wait(reqs_d)
            d[0].add_(d_in[0])
            d[1].add_(d_in[1])
        if step + 1 < world:  # on to the rank that attends to this shard next (last: its owner)
            d_in, reqs_d = transport.exchange(d, reverse=True, lane=1)
        if hop:
            transport.wait(reqs_kv)
            kv = nxt_kv
        elif step + 2 == world:
            kv = [k.contiguous(), v.contiguous()]  # the last step: this rank's own shard
    if world > 1:
        transport.finish()
    return dq, d[0], d[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, mode, impl, group, softcap, sink, alibi_slopes, window,
                dropout_p, rng):
        def attend(qc, kc, vc, diag, shift, row0):
            # fp32 partials (acc_out): the merges then round once, not once per step; dropout's
            # mask is the global sequence's (drop_offset: where this query chunk starts)
            return ops.attention_fwd(qc, kc, vc, scale, diag, True, mode, 0, impl, softcap, alibi_slopes,
                                     *window, None, dropout_p, rng, shift=shift, acc_out=True,
                                     drop_offset=row0)

        out, lse, kv_last = _ring_forward(q, k, v, group, layout, causal, window, 1, attend)
        if sink is not None:  # the sink joins each row's denominator once, after every key chunk
            out, lse = reference.add_sink(out, lse, sink.detach())
        out = out.to(q.dtype)  # the one rounding of the merged output
        # kv_last (one more K/V shard held until the backward) saves the backward a K/V hop
        ctx.save_for_backward(q, k, v, out, lse, sink, alibi_slopes, rng, *kv_last)
        ctx.args = (scale, causal, layout, mode, impl, group, softcap, window, dropout_p)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, alibi_slopes, rng, *kv_last = ctx.saved_tensors
        scale, causal, layout, mode, impl, group, softcap, window, dropout_p = ctx.args

        def grad(do, qc, kc, vc, oc, lc, diag, shift, row0):
            return ops.attention_bwd(do, qc, kc, vc, oc, lc, None, scale, diag, True, mode, impl, softcap,
                                     alibi_slopes, *window, dropout_p, rng, shift=shift, drop_offset=row0)

        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, kv_last, group, layout, causal, window, 1, grad)
        # The sink's gradient from this rank's rows (the LSE above already includes the sink, so
        # every P was right); summing it over the group, as data-parallel gradient reduction
        # does, gives the full sequence's.
        dsink = None
        if sink is not None and ctx.needs_input_grad[10]:
            dsink = ops.sink_grad(sink, out, dout, lse, None)
        nones = (None,) * 7  # scale, causal, layout, mode, impl, group, softcap
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *nones, dsink, None, None, None, None)


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
    dropout_p: float = 0.0,
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
        dropout_p: dropout probability (flash-attn's; use 0.0 in evaluation).  Each rank draws
            its seed from torch's generator, as :func:`flash_module.flash_attn_func` does, and
            the mask is laid over the *global* sequence, so ranks seeded alike drop exactly what
            one device running the whole sequence with that seed drops.  The chunks must start
            on the mask's 16-row tiles: shard length a multiple of 16 (32 with zigzag).

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
    window_size = _check_variants(dropout_p, window_size, softcap, alibi_slopes)
    chunk = q.shape[1] // (2 if layout == "zigzag" else 1)
    if dropout_p and chunk % 16:
        raise ValueError(f"ring_attention with dropout_p > 0 needs chunks of a multiple of 16 tokens (the "
                         f"dropout mask's tiles): shard length {q.shape[1]} with layout={layout!r} gives "
                         f"{chunk}")
    _check_sink(learnable_sink, q, q.shape[2])
    _check_alibi(alibi_slopes, q, q.shape[0], q.shape[2])
    left, right = (int(w) for w in window_size)
    # flash-attn: causal overrides the right bound; causal alone is no window (the pairs decide)
    window = (-1, -1) if causal and left < 0 else (left, 0 if causal else right)
    dropout_p = float(dropout_p)
    rng = dropout_seed(q.device) if dropout_p else None
    return _RingAttention.apply(q, k, v, scale, bool(causal), layout, mode, impl, group, float(softcap),
                                learnable_sink, alibi_slopes, window, dropout_p, rng)


# ---------------------------------------------------------------------------------------------
# Packed documents (varlen): ring attention over a sequence of many documents
# ---------------------------------------------------------------------------------------------
#
# Every document is cut into ``world`` (contiguous) or ``2 * world`` (zigzag) equal pieces, and
# rank r holds pieces _chunk_ids(r) of *every* document, so each rank holds the same share of
# every document's causal work.  A rank's shard is grouped by piece: piece ids[0] of documents
# 0..B-1, then (zigzag) piece ids[1] of documents 0..B-1.  Piece c of every document has the
# same relation to piece c' of the same document (before, the diagonal, after), so one varlen
# call per (query piece, key piece) pair covers all documents, with the pieces' cu_seqlens.


def _n_chunks(world: int, layout: str) -> int:
    return world if layout == "contiguous" else 2 * world


def _piece_cu_seqlens(cu_seqlens: Tensor, n_chunks: int) -> Tensor:
    """cu_seqlens (B+1,) of one piece of every document (document lengths / n_chunks), int32,
    computed on the device (no host read)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]) // n_chunks
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def _document_bounds(cu_seqlens: Tensor, n_chunks: int, name: str = "cu_seqlens") -> list[int]:
    """cu_seqlens on the host, checked: non-decreasing from 0, every document length divisible
    by ``n_chunks`` (ValueError naming the first one that is not)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor (num_documents + 1,), got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu_seqlens.dtype}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b < a:
            raise ValueError(f"{name} must be non-decreasing; document {d} has length {b - a}")
        if (b - a) % n_chunks:
            raise ValueError(
                f"document {d} has length {b - a}, which does not split into {n_chunks} equal pieces "
                f"({n_chunks} = world for contiguous, 2 x world for zigzag); pad each document to a multiple "
                f"of {n_chunks}")
    return cu


def shard_documents(x: Tensor, cu_seqlens: Tensor, rank: int, world: int, layout: str = "zigzag",
                    dim: int = 0) -> Tensor:
    """This rank's shard of a packed sequence of documents (``x``'s dim ``dim`` holds the
    ``cu_seqlens[-1]`` tokens), in the layout :func:`ring_attention_varlen` expects: every
    document cut into ``world`` (contiguous) or ``2 * world`` (zigzag) equal pieces, the rank's
    pieces of all documents grouped by piece.  Reads ``cu_seqlens`` on the host (a data-loader
    helper).  Every document length must divide into the pieces (pad documents to a multiple).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    n = _n_chunks(world, layout)
    cu = _document_bounds(cu_seqlens, n)
    if x.shape[dim] != cu[-1]:
        raise ValueError(f"x has {x.shape[dim]} tokens on dim {dim} ({tuple(x.shape)}), "
                         f"cu_seqlens[-1] = {cu[-1]}")
    parts = []
    for c in _chunk_ids(rank, world, layout):
        for a, b in zip(cu[:-1], cu[1:]):
            p = (b - a) // n
            parts.append(x.narrow(dim, a + c * p, p))
    return torch.cat(parts, dim=dim) if parts else x.narrow(dim, 0, 0)


def document_positions(cu_seqlens: Tensor, rank: int, world: int, layout: str = "zigzag",
                       device=None) -> Tensor:
    """Each local token's position inside its document (for RoPE), in :func:`shard_documents`'s
    order, shape (local_tokens,)."""
    n = _n_chunks(world, layout)
    cu = _document_bounds(cu_seqlens, n)
    pos = [torch.arange(c * ((b - a) // n), (c + 1) * ((b - a) // n), device=device)
           for c in _chunk_ids(rank, world, layout) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64, device=device)


class _RingAttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, causal, layout, mode, impl, group, softcap, sink):
        pcu = _piece_cu_seqlens(cu_seqlens, _n_chunks(dist.get_world_size(group), layout))

        def attend(qc, kc, vc, diag, shift, _row0):
            return ops.varlen_fwd(qc, kc, vc, pcu, pcu, None, scale, diag, mode, impl, None, softcap,
                                  acc_out=True)  # fp32 partials, as the dense ring

        out, lse, kv_last = _ring_forward(q, k, v, group, layout, causal, (-1, -1), 0, attend)
        if sink is not None:  # once per row, after every key piece
            out, lse = reference.add_sink(out, lse, sink.detach(), head_dim=0)
        out = out.to(q.dtype)  # the one rounding of the merged output
        ctx.save_for_backward(q, k, v, pcu, out, lse, sink, *kv_last)
        ctx.args = (scale, causal, layout, mode, impl, group, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pcu, out, lse, sink, *kv_last = ctx.saved_tensors
        scale, causal, layout, mode, impl, group, softcap = ctx.args

        def grad(do, qc, kc, vc, oc, lc, diag, shift, _row0):
            return ops.varlen_bwd(do, qc, kc, vc, oc, lc, None, pcu, pcu, None, scale, diag, mode, impl,
                                  softcap)

        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, kv_last, group, layout, causal, (-1, -1), 0,
                                    grad)
        dsink = None
        if sink is not None and ctx.needs_input_grad[11]:
            dsink = ops.sink_grad(sink, out[None], dout[None], lse[None], None)
        nones = (None,) * 8  # cu_seqlens, scale, causal, layout, mode, impl, group, softcap
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *nones, dsink)


def _doc_major_index(cu_seqlens: Tensor, pcu: Tensor, n_chunks: int, total: int) -> Tensor:
    """Row of the block-major layout (block c = piece c of every document, blocks in order) for
    each token of the packed sequence in document order, (total,) int64, from device ops alone
    (no host read: the index is data-dependent but its shape is not)."""
    j = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu[1:].contiguous(), j, right=True)  # cu[doc] <= j < cu[doc + 1]
    doc = doc.clamp(max=cu.numel() - 2)
    piece_len = ((cu[doc + 1] - cu[doc]) // n_chunks).clamp(min=1)
    offset = j - cu[doc]
    c = offset // piece_len
    return c * (total // n_chunks) + pcu.to(torch.int64)[doc] + (offset - c * piece_len)


def _gather_blocks(x: Tensor, group, world: int, layout: str) -> Tensor:
    """All ranks' shards of ``x`` (local_tokens, ...) in block-major order: block c (piece c of
    every document) for c = 0 .. n_chunks - 1."""
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    blocks: dict[int, Tensor] = {}
    for r, shard in enumerate(shards):
        ids = _chunk_ids(r, world, layout)
        for c, piece in zip(ids, shard.chunk(len(ids), dim=0)):
            blocks[c] = piece
    return torch.cat([blocks[c] for c in range(_n_chunks(world, layout))], dim=0)


def _keys_through(pcu: Tensor, piece: int, causal: bool) -> Tensor | None:
    """``seqused_k`` for query piece ``piece`` of every document: causal, the keys up to the
    piece's end, (piece + 1) piece lengths; otherwise None (whole documents)."""
    return ((piece + 1) * (pcu[1:] - pcu[:-1])).to(torch.int32) if causal else None


def _sum_over_group(x: Tensor, group) -> Tensor:
    """``x`` summed over the ranks of ``group`` (in place)."""
    dist.all_reduce(x, group=group)
    return x


class _AllGatherAttentionVarlen(torch.autograd.Function):
    """Llama 3's context parallelism for packed documents: every rank gathers all of K and V
    (small with GQA), puts them in document order, and attends its own query pieces to them in
    one varlen call per piece, each document's keys ending where the piece ends (causal: keys
    before and inside the piece, through ``seqused_k``).  The backward computes dK/dV for the
    whole sequence on every rank and sums them with one all-reduce."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, causal, layout, mode, impl, group, softcap, sink):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        q_ids = _chunk_ids(rank, world, layout)
        n, n_chunks = len(q_ids), _n_chunks(world, layout)
        pcu = _piece_cu_seqlens(cu_seqlens, n_chunks)
        cu = cu_seqlens.to(torch.int32)
        total = q.shape[0] // n * n_chunks
        index = _doc_major_index(cu_seqlens, pcu, n_chunks, total)
        k_doc = _gather_blocks(k, group, world, layout).index_select(0, index)
        v_doc = _gather_blocks(v, group, world, layout).index_select(0, index)
        outs, lses = [], []
        for i, qi in enumerate(q.chunk(n, dim=0)):
            o, lse = ops.varlen_fwd(qi, k_doc, v_doc, pcu, cu, _keys_through(pcu, q_ids[i], causal), scale,
                                    causal, mode, impl, None, softcap)
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=1)
        if sink is not None:
            out, lse = reference.add_sink(out, lse, sink.detach(), head_dim=0)
        ctx.save_for_backward(q, k_doc, v_doc, cu, pcu, index, out, lse, sink)
        ctx.args = (scale, causal, layout, mode, impl, group, softcap, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_doc, v_doc, cu, pcu, index, out, lse, sink = ctx.saved_tensors
        scale, causal, layout, mode, impl, group, softcap, k_dtype, v_dtype = ctx.args
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        q_ids = _chunk_ids(rank, world, layout)
        n = len(q_ids)
        acc = acc_dtype(q.dtype)
        dk_doc = torch.zeros(k_doc.shape, dtype=acc, device=q.device)
        dv_doc = torch.zeros(v_doc.shape, dtype=acc, device=q.device)
        dqs = []
        parts = zip(dout.contiguous().chunk(n, dim=0), q.chunk(n, dim=0), out.chunk(n, dim=0),
                    lse.chunk(n, dim=1))
        for i, (doi, qi, oi, lsei) in enumerate(parts):
            dqi, dk, dv = ops.varlen_bwd(doi, qi, k_doc, v_doc, oi, lsei.contiguous(), None, pcu, cu,
                                         _keys_through(pcu, q_ids[i], causal), scale, causal, mode, impl,
                                         softcap)
            dqs.append(dqi)
            dk_doc.add_(dk)
            dv_doc.add_(dv)
        # Back to block-major order, summed over the ranks; each rank keeps its own pieces.
        grads = torch.stack([dk_doc, dv_doc])
        blocks = _sum_over_group(torch.zeros_like(grads).index_copy_(1, index, grads), group)
        tp = blocks.shape[1] // _n_chunks(world, layout)
        mine = torch.cat([blocks[:, c * tp:(c + 1) * tp] for c in q_ids], dim=1)
        dsink = None
        if sink is not None and ctx.needs_input_grad[11]:
            dsink = ops.sink_grad(sink, out[None], dout[None], lse[None], None)
        nones = (None,) * 8
        return (torch.cat(dqs, dim=0).to(q.dtype), mine[0].to(k_dtype), mine[1].to(v_dtype), *nones, dsink)


def ring_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    mode: str = "fa2",
    *,
    impl: str = "auto",
    softcap: float = 0.0,
    learnable_sink: Tensor | None = None,
    method: str = "ring",
) -> Tensor:
    """Attention within documents over a packed sequence sharded across the ranks of ``group``
    (context parallelism for document-masked long-context training).

    Args:
        q: (local_tokens, nheads, headdim), this rank's shard of the packed queries, cut by
            :func:`shard_documents` (every document in ``world`` or ``2 * world`` equal pieces,
            the rank's pieces of all documents grouped by piece).
        k, v: (local_tokens, nheads_kv, headdim), cut the same way (GQA: nheads % nheads_kv == 0).
        cu_seqlens: (num_documents + 1,) int32, the *global* document boundaries, the same on
            every rank; every document length divisible by the piece count (pad documents).
            Length-0 documents are allowed.
        group: the process group (default: the world).
        causal: causal within each document (a token sees the earlier tokens of its document).
        softmax_scale: default 1/sqrt(headdim).
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        mode, impl: the varlen algorithm of every step and its implementation.
        softcap: as in :func:`flash_module.flash_attn_varlen_func`.
        learnable_sink: (nheads,) sink logits, joined once per row; its gradient on each rank
            covers that rank's rows (sum it over the group).
        method: ``"ring"``: K/V shards travel around the ring, one hop per step, while each step
            computes (W steps).  ``"allgather"`` (Llama 3's way, for GQA/MQA where K/V are small):
            every rank gathers all of K and V once and attends its query pieces to them; the
            backward sums dK/dV over the group with one all-reduce.  The same result either way.
        (Sliding windows, ALiBi and dropout are not supported here yet.)

    Returns:
        (local_tokens, nheads, headdim): this rank's rows of attention within documents.
        Differentiable in q, k and v.
    """
    layout_s = "(local_tokens, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, layout_s, dim=3)
    _check_qkv_bshd(q[None], k[None], v[None], ("q", "k", "v"), layout_s)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mode, impl = ops.check_varlen_mode(mode, impl)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must hold the same number of local tokens, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be a tensor on q's device ({q.device}), got "
                         f"{getattr(cu_seqlens, 'device', type(cu_seqlens).__name__)}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention_varlen needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    n = _n_chunks(world, layout)
    tracing = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    if not tracing:  # reads cu_seqlens on the host: eager only (shapes are fixed under compile/capture)
        cu = _document_bounds(cu_seqlens, n)
        local = cu[-1] * len(_chunk_ids(0, world, layout)) // n
        if q.shape[0] != local:
            raise ValueError(f"q holds {q.shape[0]} tokens; this rank's shard of cu_seqlens ({cu[-1]} "
                             f"tokens, {layout}, world={world}) has {local}: cut it with shard_documents")
    _check_equal_shards(q[None], k[None], group)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    _check_variants(0.0, (-1, -1), softcap, None)
    _check_sink(learnable_sink, q, q.shape[1])
    fn = _RingAttentionVarlen if method == "ring" else _AllGatherAttentionVarlen
    return fn.apply(q, k, v, cu_seqlens, scale, bool(causal), layout, mode, impl, group, float(softcap),
                    learnable_sink)
