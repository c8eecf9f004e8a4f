"""Train a small character-level GPT with flash_module's attention, side by side with torch SDPA.

Two copies of one decoder-only transformer are trained in lockstep: same seed, same initial
weights, same batches, same optimizer.  The only difference is the attention core inside each
``MultiheadFlashAttention`` block: ``flash_module`` (Triton FA2 on CUDA; its PyTorch path on
CPU, or the Triton interpreter when ``TRITON_INTERPRET=1``) versus
``torch.nn.functional.scaled_dot_product_attention``.  Each logging step prints both losses
and both throughputs; the run ends with the largest loss difference seen.

The text is generated here (arithmetic sentences such as "seven plus three is ten."), so
nothing is downloaded; ``--text PATH`` trains on a file instead.

    python examples/train_gpt.py                      # CPU: tiny model, 200 steps, eager
    python examples/train_gpt.py --device cuda        # GPU: 6 layers x 384, bf16, compiled
    python examples/train_gpt.py --attn flash --rotary --kv-heads 2 --steps 100

``main(argv)`` returns a dict with the per-step losses of both runs (used by the tests).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import flash_module
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flash_module

from flash_module import MultiheadFlashAttention

# Defaults per device: a model that trains in seconds on a laptop CPU, and a real one on a GPU.
PRESETS = {
    "cpu": dict(layers=2, d_model=64, heads=4, seq_len=64, batch_size=8, steps=200, lr=3e-3,
                log_every=20, precision="fp32", compile=False),
    "cuda": dict(layers=6, d_model=384, heads=6, seq_len=256, batch_size=32, steps=300, lr=1e-3,
                 log_every=25, precision="bf16", compile=True),
}

# ----------------------------------------------------------------------------------------------
# Corpus: deterministic arithmetic sentences


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 100 ("forty two")."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {_ONES[ones]}"


def make_corpus(n_chars: int, seed: int = 1234) -> str:
    """About ``n_chars`` characters of true statements about small numbers, one per line.

    The structure is learnable at several levels: spelling of the number words, the sentence
    templates, and (harder) the arithmetic itself.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < n_chars:
        kind = rng.randrange(6)
        a, b = rng.randrange(50), rng.randrange(50)
        if kind == 0:
            s = f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}."
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            s = f"{number_words(a)} minus {number_words(b)} is {number_words(a - b)}."
        elif kind == 2:
            a, b = rng.randrange(10), rng.randrange(10)
            s = f"{number_words(a)} times {number_words(b)} is {number_words(a * b)}."
        elif kind == 3:
            s = f"after {number_words(a)} comes {number_words(a + 1)}."
        elif kind == 4:
            if a == b:
                s = f"{number_words(a)} equals {number_words(b)}."
            else:
                rel = "more" if a > b else "less"
                s = f"{number_words(a)} is {rel} than {number_words(b)}."
        else:
            s = f"twice {number_words(a)} is {number_words(2 * a)}."
        lines.append(s)
        total += len(s) + 1
    return "\n".join(lines) + "\n"


class CharData:
    """Character vocabulary, encoded train/val splits, and a seeded batch sampler."""

    def __init__(self, text: str, val_fraction: float = 0.1) -> None:
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_val = max(int(len(data) * val_fraction), 2)
        self.train, self.val = data[:-n_val], data[-n_val:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s if c in self.stoi]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator):
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise ValueError(f"{split} split has {len(data)} tokens; need more than seq_len + 1 = "
                             f"{seq_len + 1} (use a longer --text or a smaller --seq-len)")
        starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 1 + seq_len] for s in starts.tolist()])
        return x, y


# ----------------------------------------------------------------------------------------------
# Model


class TorchSDPACore(nn.Module):
    """Drop-in for ``MultiheadFlashAttention.attn``: torch's SDPA on (B, S, H, D) inputs."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, rotary: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = MultiheadFlashAttention(d_model, heads, num_kv_heads=kv_heads, causal=True,
                                            rotary=rotary)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int, layers: int, heads: int,
                 kv_heads: int, rotary: bool, tie_weights: bool) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        # Learned absolute positions unless RoPE carries the position information.
        self.pos_emb = None if rotary else nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads, rotary) for _ in range(layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, layers: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                # The projections that write into the residual stream start smaller, so the
                # stream's variance does not grow with depth.
                if name.endswith(("out_proj.weight", "mlp.2.weight")):
                    std /= math.sqrt(2 * layers)
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.01)

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_out(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def use_torch_sdpa(model: CharGPT) -> CharGPT:
    """Swap every block's flash_module attention core for torch SDPA (weights untouched)."""
    for block in model.blocks:
        block.attn.attn = TorchSDPACore(causal=True)
    return model


@torch.no_grad()
def generate(model: CharGPT, data: CharData, prompt: str, n_chars: int, device: str, amp) -> str:
    model.eval()
    ids = torch.tensor([data.encode(prompt) or [0]], device=device)
    for _ in range(n_chars):
        with amp():
            logits = model(ids[:, -model.seq_len:])
        ids = torch.cat([ids, logits[:, -1].float().argmax(-1, keepdim=True)], dim=1)
    model.train()
    return data.decode(ids[0].tolist())


# ----------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults marked 'preset' come from the device: CPU = 2 layers, d_model 64, "
               "4 heads, seq 64, batch 8, 200 steps, fp32, eager (inductor's compile time on "
               "CPU would dominate a run this short, so --compile is opt-in there); CUDA = 6 "
               "layers, d_model 384, 6 heads, seq 256, batch 32, 300 steps, bf16 autocast, "
               "torch.compile.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (preset: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (preset)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (preset)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (preset)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (preset)")
    p.add_argument("--d-model", type=int, default=None, help="model width (preset)")
    p.add_argument("--heads", type=int, default=None, help="query heads (preset)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads, GQA (default: --heads)")
    p.add_argument("--rotary", action=argparse.BooleanOptionalAction, default=False,
                   help="rotary position embeddings instead of learned absolute positions")
    p.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="share the token embedding with the LM head")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (preset)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the models (preset: on for CUDA, off for CPU)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast (preset: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attn", choices=("both", "flash", "sdpa"), default="both",
                   help="train with flash_module, torch SDPA, or both side by side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines (preset)")
    p.add_argument("--text", type=Path, default=None,
                   help="train on this UTF-8 text file instead of the generated corpus")
    p.add_argument("--corpus-chars", type=int, default=200_000, help="size of the generated corpus")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches at the end")
    p.add_argument("--sample-chars", type=int, default=80,
                   help="characters to generate at the end (0: no sample)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


class Run:
    """One model + optimizer, with its loss history and timings."""

    def __init__(self, name: str, model: CharGPT, args: argparse.Namespace) -> None:
        self.name = name
        self.model = model
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.95),
        )
        self.step_fn = torch.compile(model, fullgraph=True) if args.compile else model
        self.losses: list[float] = []
        self.step_times: list[float] = []

    def train_step(self, x: Tensor, y: Tensor, lr: float, amp, device: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr
        with amp():
            loss = self.step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()  # syncs the device
        self.step_times.append(time.perf_counter() - t0)
        self.losses.append(value)
        return value

    def tokens_per_s(self, first: int, last: int, tokens_per_step: int) -> float:
        elapsed = sum(self.step_times[first:last])
        return tokens_per_step * (last - first) / elapsed if elapsed > 0 else float("nan")


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    device = args.device
    if args.precision == "bf16":
        amp = lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    else:
        amp = nullcontext

    text = args.text.read_text(encoding="utf-8") if args.text else make_corpus(args.corpus_chars)
    data = CharData(text)

    torch.manual_seed(args.seed)
    base = CharGPT(data.vocab_size, args.seq_len, args.d_model, args.layers, args.heads,
                   args.kv_heads, args.rotary, args.tie_weights).to(device)
    names = ("flash", "sdpa") if args.attn == "both" else (args.attn,)
    runs = []
    for name in names:
        model = copy.deepcopy(base)  # identical initial weights in every run
        if name == "sdpa":
            use_torch_sdpa(model)
        runs.append(Run(name, model, args))

    n_params = sum(p.numel() for p in base.parameters())
    interp = " (Triton interpreter)" if flash_module.ops.interpreting() and device == "cpu" else ""
    say(f"device={device}{interp} precision={args.precision} compile={args.compile} "
        f"torch={torch.__version__}")
    say(f"corpus: {len(text):,} chars, vocab {data.vocab_size}; model: {args.layers} layers, "
        f"d_model {args.d_model}, heads {args.heads}/{args.kv_heads} (q/kv), rotary={args.rotary}, "
        f"tied={args.tie_weights}, {n_params / 1e6:.2f}M params")
    say(f"training {args.steps} steps of {args.batch_size}x{args.seq_len} tokens; runs: {', '.join(names)}")

    header = f"{'step':>5}" + "".join(f" {'loss ' + r.name:>11}" for r in runs)
    if len(runs) == 2:
        header += f" {'|diff|':>9}"
    header += "".join(f" {'tok/s ' + r.name:>12}" for r in runs)
    say(header)

    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    last_logged = 0
    for step in range(args.steps):
        x, y = data.batch("train", args.batch_size, args.seq_len, gen)
        x, y = x.to(device), y.to(device)
        lr = _lr_at(step, args.steps, args.lr)
        for run in runs:
            run.train_step(x, y, lr, amp, device)
        if step % args.log_every == 0 or step == args.steps - 1:
            line = f"{step:>5}" + "".join(f" {r.losses[-1]:>11.6f}" for r in runs)
            if len(runs) == 2:
                line += f" {abs(runs[0].losses[-1] - runs[1].losses[-1]):>9.2e}"
            # Throughput over the steps since the last log line; step 0 includes warm-up/compile.
            first = last_logged if step > 0 else 0
            line += "".join(f" {r.tokens_per_s(first, step + 1, tokens_per_step):>12,.0f}" for r in runs)
            if step == 0:
                line += "  (first step: includes warm-up" + (" and compile)" if args.compile else ")")
            say(line)
            last_logged = step + 1

    result: dict = {
        "args": vars(args),
        "losses": {r.name: r.losses for r in runs},
        "final_loss": {r.name: r.losses[-1] for r in runs},
        "first_step_s": {r.name: r.step_times[0] for r in runs},
        # Steady-state throughput: every step but the first (warm-up, compile).
        "tokens_per_s": {r.name: r.tokens_per_s(min(1, args.steps - 1), args.steps, tokens_per_step)
                         for r in runs},
    }

    # Validation loss on the same held-out batches for every run.
    val = {}
    for run in runs:
        vgen = torch.Generator().manual_seed(args.seed + 1)
        run.model.eval()
        total = 0.0
        with torch.no_grad():
            for _ in range(args.eval_batches):
                x, y = data.batch("val", args.batch_size, args.seq_len, vgen)
                with amp():  # eager: a no-grad graph would cost torch.compile another compile
                    total += run.model(x.to(device), y.to(device)).item()
        run.model.train()
        val[run.name] = total / max(1, args.eval_batches)
    result["val_loss"] = val

    say("")
    for run in runs:
        say(f"{run.name:>6}: final train loss {run.losses[-1]:.6f}, val loss {val[run.name]:.6f}, "
            f"{result['tokens_per_s'][run.name]:,.0f} tok/s after the first step "
            f"(first step {result['first_step_s'][run.name]:.2f} s)")
    if len(runs) == 2:
        a, b = (torch.tensor(r.losses, dtype=torch.float64) for r in runs)
        diff = (a - b).abs()
        result["max_abs_loss_diff"] = diff.max().item()
        result["max_rel_loss_diff"] = (diff / b.abs()).max().item()
        say(f"max |loss flash - loss sdpa| over {args.steps} steps: {result['max_abs_loss_diff']:.3e} "
            f"(relative {result['max_rel_loss_diff']:.3e})")

    if args.sample_chars > 0:
        prompt = "seven plus three is" if args.text is None else text[: min(20, args.seq_len)]
        sample = generate(runs[0].model, data, prompt, args.sample_chars, device, amp)
        result["sample"] = sample
        say(f"sample ({runs[0].name}, greedy): {sample!r}")
    return result


if __name__ == "__main__":
    main()
