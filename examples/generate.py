"""Generation with the example GPT (examples/train_gpt.py) and a static KV cache.

Each ``MultiheadFlashAttention`` layer gets a preallocated cache (``allocate_kv_cache``); the
prompt is written in one call, then each new token is one call with ``cache_seqlens`` (the
append and the attention are ``flash_attn_with_kvcache``: split-KV, GQA packed).  The tokens
are checked against full recomputation (the whole sequence through the model at every step),
and tokens/s are printed for:

* ``cache``        ours, with the KV cache, eager;
* ``cache+graph``  the same decode step captured once in a CUDA graph and replayed (CUDA only);
* ``recompute``    ours, no cache: the whole sequence at every step;
* ``sdpa``         torch SDPA in the same model, no cache (torch SDPA has no KV-cache API).

    python examples/generate.py                      # CPU: tiny model, fp32
    python examples/generate.py --device cuda --batch 8 --new-tokens 200 --d-model 384 --layers 6

``main(argv)`` returns the tokens and timings (used by the tests).  Weights are random unless
``--train-steps`` > 0 (a short training run on the arithmetic corpus first).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_gpt, next to this file
try:
    import flash_module  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_gpt import CharData, CharGPT, make_corpus, use_torch_sdpa  # noqa: E402


def decode_logits(model: CharGPT, idx: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Logits of the last of the new tokens ``idx`` (B, S_new) of sequences that already have
    ``lens`` tokens in the caches; the tokens' keys and values are appended."""
    x = model.tok_emb(idx)
    if model.pos_emb is not None:
        x = x + model.pos_emb[lens.long()[:, None] + torch.arange(idx.shape[1], device=idx.device)]
    for block in model.blocks:
        x = x + block.attn(block.ln_attn(x), cache_seqlens=lens)
        x = x + block.mlp(block.ln_mlp(x))
    return model.head(model.ln_out(x[:, -1]))


class Sampler:
    """Next tokens from logits: greedy at temperature 0, else drawn from softmax(logits / T) with
    a seeded generator, so two runs whose logits agree draw the same tokens."""

    def __init__(self, temperature: float, seed: int, device) -> None:
        self.temperature = temperature
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen)


def generate_recompute(model: CharGPT, prompt: torch.Tensor, n: int, pick: Sampler) -> torch.Tensor:
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, pick(model(ids)[:, -1])], dim=1)
    return ids[:, prompt.shape[1]:]


def generate_cached(model: CharGPT, prompt: torch.Tensor, n: int, pick: Sampler, graph: bool) -> torch.Tensor:
    b, p = prompt.shape
    for block in model.blocks:
        block.attn.allocate_kv_cache(b, p + n)
    lens = torch.zeros(b, dtype=torch.int32, device=prompt.device)
    token = pick(decode_logits(model, prompt, lens))  # the prompt, in one call
    lens += p
    out = [token]
    if not graph:
        for _ in range(n - 1):
            token = pick(decode_logits(model, token, lens))
            lens += 1
            out.append(token)
        return torch.cat(out, dim=1)
    # One decode step (append + attend through every layer, advance the lengths) captured once
    # and replayed; the token is drawn outside the graph.
    static_token = token.clone()
    static_logits = torch.empty(b, model.head.out_features, device=prompt.device,
                                dtype=model.head.weight.dtype)

    def step():
        static_logits.copy_(decode_logits(model, static_token, lens))
        lens.add_(1)

    caches = [(blk.attn.k_cache.clone(), blk.attn.v_cache.clone()) for blk in model.blocks]
    saved_lens = lens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    for blk, (k, v) in zip(model.blocks, caches):  # undo the warm-up step
        blk.attn.k_cache.copy_(k)
        blk.attn.v_cache.copy_(v)
    lens.copy_(saved_lens)
    static_token.copy_(token)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for blk, (k, v) in zip(model.blocks, caches):  # the capture ran the step once: undo it
        blk.attn.k_cache.copy_(k)
        blk.attn.v_cache.copy_(v)
    lens.copy_(saved_lens)
    static_token.copy_(token)
    for _ in range(n - 1):
        g.replay()
        static_token.copy_(pick(static_logits))
        out.append(static_token.clone())
    return torch.cat(out, dim=1)


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return result, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rotary", action="store_true", help="RoPE instead of learned positions")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 keeps the choices identical to recomputation; bf16 may flip near-ties")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    dev, n = args.device, args.new_tokens
    data = CharData(make_corpus(20000))
    model = CharGPT(data.vocab_size, args.prompt_len + n, args.d_model, args.layers, args.heads,
                    args.kv_heads, args.rotary, tie_weights=True).to(dev).eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    prompt = data.train[: args.batch * args.prompt_len].view(args.batch, args.prompt_len).to(dev)
    runs = {}
    with torch.no_grad():
        def pick():  # every run draws from the same seeded stream
            return Sampler(args.temperature, args.seed, dev)

        runs["recompute"] = _timed(lambda: generate_recompute(model, prompt, n, pick()), dev)
        runs["cache"] = _timed(lambda: generate_cached(model, prompt, n, pick(), graph=False), dev)
        if dev == "cuda" and not args.no_graph:
            runs["cache+graph"] = _timed(lambda: generate_cached(model, prompt, n, pick(), graph=True), dev)
        sdpa_model = use_torch_sdpa(copy.deepcopy(model))
        runs["sdpa"] = _timed(lambda: generate_recompute(sdpa_model, prompt, n, pick()), dev)
    reference = runs["recompute"][0]
    result = dict(tokens={k: v[0].tolist() for k, v in runs.items()},
                  seconds={k: v[1] for k, v in runs.items()},
                  match={k: bool(torch.equal(v[0], reference)) for k, v in runs.items()})
    if not args.quiet:
        print(f"{dev}, {args.dtype}, B={args.batch}, prompt {args.prompt_len}, {n} new tokens, "
              f"{args.layers} layers x {args.d_model}, heads {args.heads}/{args.kv_heads}")
        for name, (_, secs) in runs.items():
            same = "same tokens as recompute" if result["match"][name] else "TOKENS DIFFER from recompute"
            print(f"  {name:>12}: {args.batch * n / secs:10.1f} tokens/s   {same}")
        print("sample:", repr(data.decode(reference[0].tolist())))
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["match"]["cache"] and res["match"].get("cache+graph", True) else 1)
