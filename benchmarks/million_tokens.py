"""One attention call over a million tokens on one GPU: B=1, H=8, D=128, bf16, causal, fwd + bwd.

Reports the time of each pass (CUDA events), the peak memory against what the call must hold
(q, k, v, out, dout, dq, dk, dv and the O(N) row statistics), and checks that offsets past 2**31
elements are right: the last query rows' output and dQ, and the last keys' dK/dV, are compared
with a float32 PyTorch computation of just those rows (over all keys / all queries).

    python benchmarks/million_tokens.py [--seqlen 1048576] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import flash_module as fm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=1 << 20)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rows", type=int, default=64, help="rows / keys checked at the end of the sequence")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    n, h, d, r = args.seqlen, args.heads, args.head_dim, args.rows
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = d ** -0.5
    # Compile first, at a short length that specialises the kernels the same way (N % 16 == 0).
    warm = [t[:, :4096].detach().requires_grad_() for t in (q, k, v)]
    torch.autograd.grad(fm.flash_attn_func(*warm, causal=True), warm, dout[:, :4096])
    del warm
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    ev[0].record()
    out = fm.flash_attn_func(q, k, v, causal=True)
    ev[1].record()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ev[2].record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    fwd_ms, bwd_ms = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
    flops = 4 * h * n * n * d / 2  # causal forward
    elem = n * h * d * 2  # bytes of one (1, N, H, D) bf16 tensor
    needed = 4 * elem + 2 * n * h * 4 * 3  # out, dq, dk, dv + fp32 LSE and the backward's row stats

    # Spot checks at the end of the sequence, where offsets exceed 2**31 elements.
    with torch.no_grad():
        qf, kf, vf, df = (t.float() for t in (q, k, v, dout))
        rows = slice(n - r, n)
        s = torch.einsum("qhd,khd->hqk", qf[0, rows], kf[0]) * scale  # (H, r, N): the last rows see all keys
        lse = torch.logsumexp(s, dim=-1)
        pr = torch.exp(s - lse[..., None])
        out_ref = torch.einsum("hqk,khd->qhd", pr, vf[0])
        dp = torch.einsum("qhd,khd->hqk", df[0, rows], vf[0])
        delta = (out_ref * df[0, rows]).sum(-1).T  # (H, r)
        dq_ref = torch.einsum("hqk,khd->qhd", pr * (dp - delta[..., None]), kf[0]) * scale
        del s, pr, dp
        keys = slice(n - r, n)  # the last keys are seen only by the last queries (causal)
        s = torch.einsum("qhd,khd->hqk", qf[0, rows], kf[0, keys]) * scale
        mask = torch.ones(r, r, dtype=torch.bool, device=dev).tril()
        pk = torch.exp(s.masked_fill(~mask, float("-inf")) - lse[..., None])
        dv_ref = torch.einsum("hqk,qhd->khd", pk, df[0, rows])
    err = dict(
        out=(out[0, rows].float() - out_ref).abs().max().item(),
        dq=(dq[0, rows].float() - dq_ref).abs().max().item(),
        dv=(dv[0, keys].float() - dv_ref).abs().max().item(),
    )
    res = dict(
        device=torch.cuda.get_device_name(dev), seqlen=n, heads=h, head_dim=d, dtype="bf16", causal=True,
        fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms / 1e9, bwd_tflops=2.5 * flops / bwd_ms / 1e9,
        peak_gib=peak / 2**30, inputs_gib=4 * elem / 2**30, needed_gib=needed / 2**30, max_abs_err=err,
        finite=bool(torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()),
    )
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
