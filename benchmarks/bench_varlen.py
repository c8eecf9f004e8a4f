"""Varlen training benchmark: documents of random lengths packed into one batch, forward and
backward, in TFLOP/s counted on the real tokens only.

    PYTHONPATH=$PWD python benchmarks/bench_varlen.py [--tokens 65536] [--min-len 256] [--max-len 8192]
        [--heads 16] [--head-dim 128] [--causal both] [--json out.json]

Rows (all on the same packed documents unless said otherwise):

* ``ours-varlen``   ``flash_attn_varlen_func`` on the packed (total, H, D) tensors.
* ``ours-padded``   ``flash_attn_func`` with every document padded to the longest (what one does
  without varlen); causal only (padding keys are then never seen); FLOPs still counted on real
  tokens, so the padding shows as lost throughput.
* ``flex-doc``      FlexAttention (compiled) over the packed sequence with a document mask.
* ``sdpa-njt``      torch SDPA on a nested jagged tensor (torch's own varlen path).
* ``dense-N``       ``flash_attn_func`` at a fixed length N with the same token count (the
  efficiency of the fixed-length kernel, on other inputs): N = 1k, 2k, 4k, 8k.

Backward rows time ``torch.autograd.grad`` alone (the forward is outside the timed region).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import flash_module as fm

BWD_FLOP_FACTOR = 2.5  # as benchmarks/bench.py


def document_lengths(tokens: int, lo: int, hi: int, seed: int) -> list[int]:
    """Random lengths in [lo, hi] summing to exactly ``tokens`` (the last one is cut)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def flops(lengths: list[int], heads: int, d: int, causal: bool) -> float:
    """Forward FLOPs of attention within each document: 4 * H * D * (visible pairs)."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return 4.0 * heads * d * pairs


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fwd_bwd_ms(run, inputs):
    """(forward ms, backward ms) of ``run(*inputs) -> out``."""
    fwd = _time(lambda: run(*inputs))
    out = run(*inputs)
    dout = torch.randn_like(out)
    bwd = _time(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return fwd, bwd


def runners(lengths, h, d, causal, dev, dt):
    """name -> (inputs, run, fwd FLOPs)."""
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    real = flops(lengths, h, d, causal)
    def varlen(q, k, v):
        return fm.flash_attn_varlen_func(q, k, v, cu, cu, causal=causal)

    out = {"ours-varlen": ((q, k, v), varlen, real)}
    if causal:
        n_max = max(lengths)
        qp, kp, vp = (torch.randn(len(lengths), n_max, h, d, device=dev, dtype=dt, requires_grad=True)
                      for _ in range(3))
        out["ours-padded"] = ((qp, kp, vp), lambda q, k, v: fm.flash_attn_func(q, k, v, causal=True), real)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.arange(len(lengths), device=dev).repeat_interleave(torch.tensor(lengths, device=dev))

        def mask_mod(b, hh, qi, ki):
            same = doc[qi] == doc[ki]
            return same & (qi >= ki) if causal else same

        block_mask = create_block_mask(mask_mod, 1, 1, total, total, device=dev)
        flex = torch.compile(flex_attention, dynamic=False)
        qf, kf, vf = (torch.randn(1, h, total, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        out["flex-doc"] = ((qf, kf, vf), lambda q, k, v: flex(q, k, v, block_mask=block_mask), real)
    except Exception as e:  # noqa: BLE001 - a peer that is not available
        print(f"flex-doc: {type(e).__name__}: {str(e)[:120]}")
    try:
        offsets = cu.long()

        def njt(q, k, v):
            qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
                          for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qn, kn, vn, is_causal=causal)
            return o.transpose(1, 2).values()

        out["sdpa-njt"] = ((q, k, v), njt, real)
    except Exception as e:  # noqa: BLE001
        print(f"sdpa-njt: {type(e).__name__}: {str(e)[:120]}")
    for n in (1024, 2048, 4096, 8192):
        if total % n == 0:
            xs = tuple(torch.randn(total // n, n, h, d, device=dev, dtype=dt, requires_grad=True)
                       for _ in range(3))
            out[f"dense-{n // 1024}k"] = (xs, lambda q, k, v: fm.flash_attn_func(q, k, v, causal=causal),
                                          flops([n] * (total // n), h, d, causal))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    lengths = document_lengths(a.tokens, a.min_len, a.max_len, a.seed)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16 "
          f"H={a.heads} D={a.head_dim} | {a.tokens} tokens in {len(lengths)} documents "
          f"({min(lengths)}..{max(lengths)})")
    print(f"{'causal':>6} {'impl':>12} {'fwd ms':>8} {'bwd ms':>8} {'fwd TF/s':>9} {'bwd TF/s':>9}")
    records = []
    for causal in {"yes": (True,), "no": (False,), "both": (False, True)}[a.causal]:
        for name, (inputs, run, fl) in runners(lengths, a.heads, a.head_dim, causal, dev, dt).items():
            rec = dict(impl=name, causal=causal, tokens=a.tokens, documents=len(lengths), H=a.heads,
                       D=a.head_dim)
            try:
                fwd, bwd = _fwd_bwd_ms(run, inputs)
                tf_fwd, tf_bwd = fl / fwd / 1e9, fl * BWD_FLOP_FACTOR / bwd / 1e9
                rec.update(fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=tf_fwd, bwd_tflops=tf_bwd)
                print(f"{causal!s:>6} {name:>12} {fwd:8.3f} {bwd:8.3f} {tf_fwd:9.1f} {tf_bwd:9.1f}")
            except Exception as e:  # noqa: BLE001 - a peer that refuses the shape
                rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"{causal!s:>6} {name:>12} {rec['error']}")
            records.append(rec)
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(lengths=lengths, records=records), f, indent=1)


if __name__ == "__main__":
    main()
