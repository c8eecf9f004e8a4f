"""A Hugging Face Llama-shaped model trained and sampled with flash_module's attention backend
(``attn_implementation="fm_triton"``) and with transformers' ``"sdpa"``, side by side.

Both runs start from the same random weights and see the same batches of a procedural corpus
(true statements about small numbers, character tokens; ``train_gpt.make_corpus``).  Printed for
each backend: the losses step by step, the training step time, peak memory, and greedy
generation from left-padded prompts (tokens/s, and whether the tokens agree with the other
backend's).

    python examples/hf_train_generate.py                   # CPU: tiny model, fp32 (interpreter)
    python examples/hf_train_generate.py --device cuda --dtype bf16 --hidden 2048 --heads 16 \\
        --kv-heads 8 --layers 4 --seq 4096 --batch 2 --steps 6 --gen-batch 8 --new-tokens 64 \\
        [--cache static]     # static cache: transformers compiles the decode step

Needs transformers (``pip install flash_module[hf]``).  ``main(argv)`` returns the results
(used by the tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_gpt, next to this file
try:
    import flash_module  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_gpt import CharData, make_corpus  # noqa: E402

import flash_module.integrations.transformers as fm_hf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, vocab: int, attn: str):
    """A LlamaForCausalLM with seed-0 weights and the given attention implementation."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, args.prompt + args.new_tokens) + 8, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def train(model, data: CharData, args) -> dict:
    """``args.steps`` AdamW steps on seeded batches; the first ``args.warmup`` are not timed."""
    device = torch.device(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    losses, times = [], []
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        x, y = data.batch("train", args.batch, args.seq, gen)
        x, y = x.to(device), y.to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss  # (transformers shifts the labels by one)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    step_s = sorted(times)[len(times) // 2] if times else float("nan")  # the median
    return dict(losses=losses, step_s=step_s, peak_gib=peak)


def generate(model, data: CharData, args) -> dict:
    """Greedy generation from ``args.gen_batch`` left-padded prompts of up to ``args.prompt``
    characters; returns the tokens and tokens/s (new tokens of the whole batch per second)."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(2)
    ids, _ = data.batch("val", args.gen_batch, args.prompt, gen)
    mask = torch.ones_like(ids)
    for i in range(args.gen_batch):  # left padding of different lengths
        mask[i, : i * args.prompt // (2 * args.gen_batch)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ids, mask = ids.to(device), mask.to(device)
    model.eval()
    kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              min_new_tokens=args.new_tokens)
    if args.cache == "static":  # transformers compiles the decoding step itself on CUDA
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up: compiles the kernels (and, static, the decode step at this size)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(device)
    elapsed = time.perf_counter() - t0
    return dict(tokens=out[:, ids.shape[1]:].cpu(), tok_s=args.gen_batch * args.new_tokens / elapsed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="training sequence length")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--gen-batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--backends", default="fm_triton,sdpa")
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="generation cache; with static, transformers compiles the decode step on CUDA "
                         "(torch.compile fullgraph, CUDA graphs)")
    ap.add_argument("--corpus-chars", type=int, default=200_000)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    fm_hf.register()
    data = CharData(make_corpus(args.corpus_chars))
    results = {}
    for attn in args.backends.split(","):
        model = build(args, data.vocab_size, attn)
        calls = fm_hf.calls
        res = train(model, data, args)
        res.update(generate(model, data, args))
        if attn == fm_hf.NAME and fm_hf.calls == calls:
            raise RuntimeError("the model never called flash_module's attention")
        results[attn] = res
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{dev} | Llama hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, {args.layers} layers, "
          f"{args.dtype} | train: batch {args.batch} x {args.seq} | generate: {args.gen_batch} prompts of "
          f"<= {args.prompt}, {args.new_tokens} new tokens, {args.cache} cache")
    names = list(results)
    print(f"{'':22}" + "".join(f"{n:>14}" for n in names))
    for step in range(args.steps):
        row = "".join(f"{results[n]['losses'][step]:14.4f}" for n in names)
        print(f"{'loss, step ' + str(step):22}" + row)
    print(f"{'train step (ms)':22}" + "".join(f"{results[n]['step_s'] * 1e3:14.1f}" for n in names))
    print(f"{'peak memory (GiB)':22}" + "".join(f"{results[n]['peak_gib']:14.2f}" for n in names))
    print(f"{'generate (tokens/s)':22}" + "".join(f"{results[n]['tok_s']:14.1f}" for n in names))
    if len(names) == 2:
        a, b = (results[n]["tokens"] for n in names)
        agree = (a == b).float().mean().item()
        results["tokens_agree"] = agree
        print(f"greedy tokens equal between the two backends: {agree:.1%}")
    return results


if __name__ == "__main__":
    main()
