"""Variant overhead benchmark (issue #13): each attention variant against the plain kernel, with
FlexAttention doing the same variant through a ``score_mod`` as the peer, in one run.

Usage: PYTHONPATH=$PWD python benchmarks/bench_variants.py [--seqlen 8192] [--batch 2] [--heads 16]
       [--dim 128] [--causal] [--json out.json]

bf16, (B, N, H, D) inputs, forward (no grad) and backward (``autograd.grad`` of a built graph),
``triton.testing.do_bench`` medians, TFLOP/s with the plain attention's FLOPs (4·B·H·N²·D
forward, halved when causal; 2.5x that backward), so a slower variant shows as a lower number.
Rows: ``plain``, ``softcap`` (c = 50, Gemma 2's attention cap) and ``alibi`` (BLOOM's slopes),
budget <= 10% overhead each; ``sink`` (gpt-oss's per-head logits), budget 3%; ``dropout``
(p = 0.1), budget 30%, next to torch SDPA's flash backend with and without the same dropout
(FlexAttention has none); ``mask``: SDPA's ``attn_mask`` holding the causal pattern (boolean, and
additive float with a gradient), next to torch SDPA's own dispatcher and FlexAttention given the
same tensor (its block mask skips the tiles the mask hides; ours and SDPA's read every tile,
since a mask's content is not known before the kernel runs; N = 8k: a 64 MiB mask).  The sliding
window, which saves work rather than adding it, has ``benchmarks/bench_window.py``.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import flash_module as fm

SOFTCAP = 50.0
DROPOUT = 0.1


def _flex(score_mod, causal: bool, n: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    mask = None
    if causal:
        mask = create_block_mask(lambda b_, h, q, k: q >= k, None, None, n, n, device="cuda")
    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=mask)


def _sdpa_flash(q, k, v, dropout_p: float, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                                is_causal=causal)


def _softcap_mod(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def _backward_ms(fn, inputs) -> float:
    """Median time of the backward alone: the graph is built once and kept."""
    out = fn()
    dout = torch.randn_like(out)
    return triton.testing.do_bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
                                   warmup=10, rep=50, return_mode="median")


def measure(b: int, n: int, h: int, d: int, causal: bool) -> list[dict]:
    shape = (b, n, h, d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda")  # BLOOM's
    sinks = torch.randn(h, device="cuda", requires_grad=True)
    impls = {
        "ours plain": (lambda: fm.flash_attn_func(q, k, v, causal=causal), (q, k, v)),
        "ours softcap": (lambda: fm.flash_attn_func(q, k, v, causal=causal, softcap=SOFTCAP), (q, k, v)),
        "ours alibi": (lambda: fm.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v)),
        "ours sink": (lambda: fm.flash_attn_func(q, k, v, causal=causal, learnable_sink=sinks),
                      (q, k, v, sinks)),
        "ours dropout": (lambda: fm.flash_attn_func(q, k, v, DROPOUT, causal=causal), (q, k, v)),
    }
    for name, p in (("sdpa-flash plain", 0.0), ("sdpa-flash dropout", DROPOUT)):
        impls[name] = (lambda p=p: _sdpa_flash(qt, kt, vt, p, causal), (qt, kt, vt))
    # attn_mask rows: the causal pattern as a tensor (a mask excludes is_causal), read tile by tile
    allowed = torch.ones(n, n, device="cuda", dtype=torch.bool).tril_()[None, None]  # (1, 1, N, N)
    additive = torch.zeros(n, n, device="cuda", dtype=torch.bfloat16)
    additive = additive.masked_fill_(~allowed[0, 0], float("-inf"))[None, None].requires_grad_()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls["ours mask bool"] = (lambda: fm.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed),
                               (qt, kt, vt))
    impls["ours mask float"] = (lambda: fm.scaled_dot_product_attention(qt, kt, vt, attn_mask=additive),
                                (qt, kt, vt, additive))
    impls["sdpa mask bool"] = (lambda: sdpa(qt, kt, vt, attn_mask=allowed), (qt, kt, vt))
    impls["sdpa mask float"] = (lambda: sdpa(qt, kt, vt, attn_mask=additive), (qt, kt, vt, additive))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex_c = torch.compile(flex_attention, dynamic=False)
        def from_tensor(b_, h_, q_idx, kv_idx):
            return allowed[0, 0, q_idx, kv_idx]

        tensor_mask = create_block_mask(from_tensor, None, None, n, n, device="cuda")
        impls["flex mask bool"] = (lambda: flex_c(qt, kt, vt, block_mask=tensor_mask), (qt, kt, vt))
    except Exception as e:  # noqa: BLE001 - no FlexAttention in this torch
        print(f"flex mask unavailable: {e}")
    try:
        plain, capped = _flex(None, causal, n), _flex(_softcap_mod, causal, n)

        def alibi_mod(score, b_, h_, q_idx, kv_idx):
            return score - slopes[h_] * (q_idx - kv_idx).abs()

        biased = _flex(alibi_mod, causal, n)
        impls["flex plain"] = (lambda: plain(qt, kt, vt), (qt, kt, vt))
        impls["flex softcap"] = (lambda: capped(qt, kt, vt), (qt, kt, vt))
        impls["flex alibi"] = (lambda: biased(qt, kt, vt), (qt, kt, vt))
    except Exception as e:  # noqa: BLE001 - no FlexAttention in this torch
        print(f"flex unavailable: {e}")
    rows = []
    for name, (fn, inputs) in impls.items():
        rec = dict(impl=name, B=b, N=n, H=h, D=d, causal=causal)
        try:
            with torch.no_grad():
                fwd = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
            bwd = _backward_ms(fn, inputs)
            rec.update(fwd_tflops=flops / fwd / 1e9, bwd_tflops=2.5 * flops / bwd / 1e9)
        except Exception as e:  # noqa: BLE001 - a peer that refuses the shape
            rec["error"] = str(e)[:200]
        rows.append(rec)
        print(f"{name:18} " + (f"fwd {rec['fwd_tflops']:6.1f}  bwd {rec['bwd_tflops']:6.1f} TFLOP/s"
                               if "fwd_tflops" in rec else f"n/a ({rec['error']})"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"B={args.batch} N={args.seqlen} H={args.heads} D={args.dim} causal={args.causal} bf16")
    rows = measure(args.batch, args.seqlen, args.heads, args.dim, args.causal)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
