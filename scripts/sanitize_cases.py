"""Every attention kernel and mode, forward and backward, plus the softmax kernels, on ragged
shapes, sized for compute-sanitizer (memcheck / racecheck / initcheck).

Lengths are not multiples of any tile, head dims 40 / 72 / 136 are padded, GQA and Sq != Sk
both ways, causal and not.  Run it under the sanitizer with PyTorch's caching allocator off, so
that every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

(``bash scripts/gpu_check.sh sanitize`` runs the three tools, each over ``--shard i/n`` slices
in parallel.)  Prints one line per case.
"""

from __future__ import annotations

import argparse
import sys

import torch

import flash_module as fm

# (B, Sq, Sk, H, H_kv, D)
SHAPES = [(1, 77, 203, 4, 2, 40), (2, 203, 77, 2, 1, 72), (1, 130, 131, 2, 2, 136), (2, 1, 300, 8, 2, 64)]
CASES = [("fa2", torch.bfloat16), ("fa2", torch.float32), ("fa1", torch.bfloat16), ("tiling", torch.bfloat16),
         ("fa2", torch.float64)]


def _attention_case(mode, dtype, shape, causal, softcap=0.0, alibi=False, window=(-1, -1), sink=False,
                    dropout=0.0):
    def run():
        b, sq, sk, h, h_kv, d = shape
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, sk, h_kv, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        slopes = torch.rand(b, h, device="cuda") if alibi else None
        sinks = torch.randn(h, device="cuda", requires_grad=True) if sink else None
        out = fm.flash_attn_func(q, k, v, dropout, causal=causal, mode=mode,
                                 num_splits=3 if mode == "tiling" else 0,
                                 softcap=softcap, alibi_slopes=slopes, window_size=window,
                                 learnable_sink=sinks)
        out.backward(torch.randn_like(out))
    variants = (f" softcap={softcap}" if softcap else "") + (" alibi" if alibi else "")
    variants += (f" window={window}" if window != (-1, -1) else "") + (" sink" if sink else "")
    variants += f" dropout={dropout}" if dropout else ""
    return f"{mode} {str(dtype)[6:]} {shape} causal={causal}{variants}", run


def _mask_case(dtype, shape, mask_shape, kind):
    """SDPA's attn_mask (bool or a float mask with its gradient), broadcast dims read in place."""
    def run():
        b, sq, sk, h, h_kv, d = shape
        q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, h_kv, sk, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        if kind == "bool":
            mask = torch.rand(mask_shape, device="cuda") > 0.3
        else:
            mask = torch.randn(mask_shape, device="cuda", dtype=dtype, requires_grad=True)
        out = fm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.backward(torch.randn_like(out))
    return f"sdpa {str(dtype)[6:]} {shape} attn_mask={kind}{tuple(mask_shape)}", run


def _varlen_case(lens_q, lens_k, h, h_kv, d, causal, cu_q_bad=None):
    """The varlen kernels (issue #12) on ragged sequences, zero lengths included; ``cu_q_bad``
    replaces cu_seqlens_q with offsets past the tensor (the kernels clamp them)."""
    from flash_module.kernels.varlen import varlen_backward, varlen_forward

    def run():
        def cu(lengths):
            offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
            return torch.tensor(offsets, dtype=torch.int32, device="cuda")
        q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(sum(lens_k), h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu_q = cu(lens_q) if cu_q_bad is None else torch.tensor(cu_q_bad, dtype=torch.int32, device="cuda")
        cu_k = cu(lens_k)
        out, lse = varlen_forward(q, k, v, cu_q, cu_k, d**-0.5, causal)
        varlen_backward(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, d**-0.5, causal)
    bad = " bad-offsets" if cu_q_bad else ""
    return f"varlen {lens_q} {lens_k} h={h}/{h_kv} d={d} causal={causal}{bad}", run


def _kvcache_case(paged, bad):
    """flash_attn_with_kvcache (the append kernel and split-KV over the cache), decode with GQA,
    left padding on the contiguous cache; ``bad``: lengths past the capacity, batch rows, pages
    and padding out of range (clamped)."""
    def run():
        b, h, h_kv, d, cap = 3, 8, 2, 72, 128
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        k_new, v_new = (torch.randn(b, 1, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = torch.tensor([0, 40, 200 if bad else 95], dtype=torch.int32, device="cuda")
        shape = (2 * b, cap // 2) if paged else (b, cap)  # pages of 64 rows, or a row per sequence
        caches = [torch.randn(*shape, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        if paged:
            table = torch.tensor([[0, 5], [3, 1], [4, 9 if bad else 2]], dtype=torch.int32, device="cuda")
            fm.flash_attn_with_kvcache(q, *caches, k_new, v_new, cache_seqlens=lens, block_table=table,
                                       causal=True)
        else:
            idx = torch.tensor([2, 7 if bad else 0, 1], dtype=torch.int32, device="cuda")
            pad = torch.tensor([0, 50 if bad else 7, -4 if bad else 90], dtype=torch.int32, device="cuda")
            fm.flash_attn_with_kvcache(q, *caches, k_new, v_new, cache_seqlens=lens, cache_batch_idx=idx,
                                       cache_leftpad=pad, causal=True)
    return f"kvcache paged={paged}{' bad-indices' if bad else ''}", run


VARLEN = [([17, 0, 1, 113, 50], [17, 0, 1, 113, 50], 2, 2, 40), ([5, 70, 1], [33, 20, 203], 4, 2, 72),
          ([0, 0], [3, 0], 2, 2, 64)]


def _softmax_case(algorithm, splits):
    def run():
        x = torch.randn(37, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fm.softmax(x, algorithm=algorithm, num_splits=splits).backward(torch.randn_like(x))
    return f"softmax {algorithm}", run


def cases() -> list:
    """Every case as (name, run)."""
    out = []
    for mode, dtype in CASES:
        for shape in SHAPES[:1] if dtype == torch.float64 else SHAPES:
            out += [_attention_case(mode, dtype, shape, causal) for causal in (False, True)]
    out += [_varlen_case(*c, causal) for c in VARLEN for causal in (False, True)]
    out.append(_varlen_case([6, 4], [6, 4], 2, 2, 16, True, cu_q_bad=[0, 6, 40]))
    out += [_kvcache_case(paged, bad) for paged in (False, True) for bad in (False, True)]
    out += [_attention_case(mode, torch.bfloat16, SHAPES[0], True, softcap=5.0, alibi=True)
            for mode in ("fa2", "tiling")]
    out.append(_attention_case("tiling", torch.bfloat16, SHAPES[3], False, alibi=True))  # decode, GQA packed
    # sliding windows: both edges masked with skipped blocks between; rows with no key (Sq > Sk)
    out += [_attention_case(mode, torch.bfloat16, SHAPES[1], False, window=(9, 3))
            for mode in ("fa2", "tiling")]
    out.append(_attention_case("fa2", torch.float32, SHAPES[0], True, window=(50, -1)))
    out.append(_attention_case("tiling", torch.bfloat16, SHAPES[3], True, window=(40, 0)))  # decode
    # sinks: in the FA2 epilogue, and in the split-KV combine (3 splits) and its one-split path
    out += [_attention_case(mode, torch.bfloat16, SHAPES[1], True, sink=True) for mode in ("fa2", "tiling")]
    out.append(_attention_case("tiling", torch.float32, SHAPES[3], False, window=(40, 7), sink=True))
    # dropout: the Philox mask in the forward, dK/dV and dQ loops (ragged shapes, GQA, a window)
    out += [_attention_case("fa2", dtype, SHAPES[1], True, dropout=0.2)
            for dtype in (torch.bfloat16, torch.float32)]
    out.append(_attention_case("fa2", torch.bfloat16, SHAPES[0], False, window=(30, 5), dropout=0.5))
    # SDPA masks: a key-padding bool mask, a per-head float mask with its gradient
    out.append(_mask_case(torch.bfloat16, SHAPES[0], (1, 1, 1, 203), "bool"))
    out.append(_mask_case(torch.float32, SHAPES[1], (2, 2, 203, 77), "float"))
    out.append(_mask_case(torch.bfloat16, SHAPES[0], (1, 1, 1, 203), "float"))  # its gradient: atomics
    # masks at decode shapes: the split-KV kernel reads them (packed GQA rows, per-head pointers)
    out.append(_mask_case(torch.bfloat16, SHAPES[3], (2, 1, 1, 300), "bool"))
    out.append(_mask_case(torch.float32, SHAPES[3], (2, 8, 1, 300), "float"))
    return out + [_softmax_case("online", None), _softmax_case("tiling", 3)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard", default="0/1", help="i/n: run cases i, i+n, i+2n, ... (parallel runs)")
    p.add_argument("--only", default="", help="comma-separated substrings: only cases whose name has one")
    args = p.parse_args()
    i, n = (int(x) for x in args.shard.split("/"))
    torch.manual_seed(0)
    keys = [k for k in args.only.split(",") if k]
    mine = [c for c in cases() if not keys or any(k in c[0] for k in keys)][i::n]
    for name, run in mine:
        run()
        torch.cuda.synchronize()
        print(f"ok {name}", flush=True)
    print(f"{len(mine)} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
