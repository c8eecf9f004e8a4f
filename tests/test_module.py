"""The nn.Module layers and the guarantees they make to compilers and graph tools.

CPU (interpreter, inductor) in CI; the CUDA-graph tests and the GPU variants carry ``gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import flash_module as fm

from .helpers import max_err

# ----------------------------------------------------------------------------------------------
# A small GPT block stack built on the layer, and the same stack on torch SDPA (the reference)
# ----------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mode: str = "fa2", rotary: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = fm.MultiheadFlashAttention(dim, heads, kv_heads, causal=True, mode=mode, rotary=rotary)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tiny_gpt(dim=32, heads=4, kv_heads=2, layers=2, mode="fa2", rotary=True):
    return nn.Sequential(*[Block(dim, heads, kv_heads, mode, rotary) for _ in range(layers)])


def sdpa_mha(m: fm.MultiheadFlashAttention, x: torch.Tensor) -> torch.Tensor:
    """The same computation as ``m(x)`` with torch's SDPA, from m's own weights."""
    qkv = m.qkv_proj(x)
    hd, kvd = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    q = rearrange(qkv[..., :hd], "b s (h d) -> b h s d", d=m.head_dim)
    k = rearrange(qkv[..., hd:hd + kvd], "b s (h d) -> b h s d", d=m.head_dim)
    v = rearrange(qkv[..., hd + kvd:], "b s (h d) -> b h s d", d=m.head_dim)
    if m.rotary is not None:
        q = m.rotary(q.transpose(1, 2)).transpose(1, 2)
        k = m.rotary(k.transpose(1, 2)).transpose(1, 2)
    k = k.repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)
    v = v.repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=m.attn.causal)
    return m.out_proj(rearrange(out, "b h s d -> b s (h d)"))


# ----------------------------------------------------------------------------------------------
# Configuration and semantics
# ----------------------------------------------------------------------------------------------


def test_extra_repr_shows_config():
    m = fm.MultiheadFlashAttention(64, 8, 2, causal=True, rotary=True)
    text = repr(m)
    for piece in ("embed_dim=64", "num_heads=8", "num_kv_heads=2", "head_dim=8", "causal=True",
                  "mode='fa2'", "layout='bshd'", "RotaryEmbedding(head_dim=8"):
        assert piece in text, text


@pytest.mark.parametrize("kwargs, exc, match", [
    pytest.param(dict(mode="fa3"), ValueError, r"mode must be one of .*'fa2'.*'fa3'", id="bad-mode"),
    pytest.param(dict(layout="sbhd"), ValueError, r"layout must be one of", id="bad-layout"),
    pytest.param(dict(dropout=1.5), ValueError, r"dropout must be a probability in \[0, 1\]", id="dropout"),
])
def test_flash_attention_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fm.FlashAttention(**kwargs)


@pytest.mark.parametrize("args, match", [
    pytest.param((30, 4), r"embed_dim \(30\) must be divisible by num_heads \(4\)", id="embed-not-divisible"),
    pytest.param((32, 4, 3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)", id="kv-heads"),
])
def test_mha_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        fm.MultiheadFlashAttention(*args)


def test_mha_bad_input_shape():
    m = fm.MultiheadFlashAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, 32\), got \(2, 5, 16\)"):
        m(torch.randn(2, 5, 16))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rotary", [False, True], ids=["norope", "rope"])
def test_mha_matches_sdpa(kv_heads, rotary, device):
    m = fm.MultiheadFlashAttention(32, 4, kv_heads, causal=True, rotary=rotary, device=device)
    x = torch.randn(2, 29, 32, device=device, requires_grad=True)
    ours = m(x)
    ref = sdpa_mha(m, x)
    assert max_err(ours, ref) < 1e-5
    g = torch.randn_like(ours)
    ga = torch.autograd.grad(ours, [x, *m.parameters()], g)
    gb = torch.autograd.grad(ref, [x, *m.parameters()], g)
    for a, b in zip(ga, gb):
        assert max_err(a, b) < 1e-4


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_flash_attention_layouts(layout, device):
    q = torch.randn(2, 4, 23, 16, device=device)  # (B, H, S, D)
    k = torch.randn(2, 2, 23, 16, device=device)
    v = torch.randn(2, 2, 23, 16, device=device)
    m = fm.FlashAttention(causal=True, layout=layout)
    if layout == "bshd":
        out = m(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        out = m(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(out, ref) < 1e-5


def test_torch_impl_module(device):
    torch.manual_seed(1)
    a = tiny_gpt(mode="fa2").to(device)
    b = copy.deepcopy(a)
    for blk in b:
        blk.attn.attn.impl = "torch"
    x = torch.randn(2, 17, 32, device=device)
    assert max_err(a(x), b(x)) < 1e-5


def test_gradcheck_module_fp64(device):
    m = fm.MultiheadFlashAttention(16, 2, 1, causal=True, rotary=True, device=device, dtype=torch.float64)
    x = torch.randn(1, 7, 16, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_double_backward_raises_through_module(device):
    m = fm.MultiheadFlashAttention(16, 2, device=device, dtype=torch.float64)
    x = torch.randn(1, 5, 16, device=device, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_state_dict_round_trip_and_to(device):
    a = tiny_gpt().to(device)
    b = tiny_gpt().to(device)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 11, 32, device=device)
    assert torch.equal(a(x), b(x))
    # RoPE frequencies are a non-persistent buffer: not in the state dict, but they move.
    assert not any("inv_freq" in key for key in a.state_dict())
    c = b.to(torch.float64)
    assert c[0].attn.qkv_proj.weight.dtype == torch.float64
    assert c[0].attn.rotary.inv_freq.device.type == device
    assert max_err(c(x.double()), a(x)) < 1e-4


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_like_sdpa(autocast_dtype, device):
    if device == "cpu" and autocast_dtype == torch.float16:
        pytest.skip("CPU autocast is bf16-first; fp16 CPU autocast support varies by torch version")
    m = fm.MultiheadFlashAttention(32, 4, 2, causal=True, device=device)
    x = torch.randn(2, 21, 32, device=device)
    with torch.autocast(device, dtype=autocast_dtype):
        ours = m(x)
        ref = sdpa_mha(m, x)
        q = torch.randn(1, 2, 9, 16, device=device)
        raw = fm.scaled_dot_product_attention(q, q, q)
        raw_ref = F.scaled_dot_product_attention(q, q, q)
    assert ours.dtype == ref.dtype
    assert raw.dtype == raw_ref.dtype == autocast_dtype
    assert max_err(ours.float(), ref.float()) < 5e-2
    ours.float().sum().backward()
    assert m.qkv_proj.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# torch.compile, torch.export
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_gpt_trains_like_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = tiny_gpt().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(compiled_model.parameters(), lr=1e-2)
    for step in range(2):
        x = torch.randn(2, 24, 32, device=device)
        losses = []
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, (step, losses)
    for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
        assert max_err(pe, pc) < 1e-4
    explain = torch._dynamo.explain(tiny_gpt().to(device))(torch.randn(2, 24, 32, device=device))
    assert explain.graph_break_count == 0, explain.break_reasons


def _count_compiles(model, lengths, mark_dynamic: bool) -> int:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for n in lengths:
        x = torch.randn(2, n, 32, device=next(model.parameters()).device)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 1)
        compiled(x).sum().backward()
    return counter.frame_count


@pytest.mark.slow  # ~35 s of compiling on CPU
def test_seqlen_change_recompiles_at_most_once(device):
    model = tiny_gpt(layers=1).to(device)
    assert _count_compiles(model, [16, 24, 40], mark_dynamic=False) <= 2
    assert _count_compiles(model, [16, 24, 40], mark_dynamic=True) == 1


def test_export_matches_eager(device):
    model = tiny_gpt(layers=1).to(device).eval()
    x = torch.randn(2, 19, 32, device=device)
    ep = torch.export.export(model, (x,))
    assert any("flash_module.attention_fwd" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(2, 19, 32, device=device)
    assert max_err(ep.module()(x2), model(x2)) < 1e-5


# ----------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_training_step_matches_eager():
    torch.manual_seed(0)
    dev = "cuda"
    model = tiny_gpt(dim=64, heads=4, kv_heads=2).to(dev)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-3, capturable=True)
    static_x = torch.randn(4, 128, 64, device=dev)

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    # Warm up on a side stream (compiles the Triton kernels, allocates optimizer state).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(model, opt, static_x)
            step(twin, opt_twin, static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x)
    for _ in range(3):
        x = torch.randn(4, 128, 64, device=dev)
        static_x.copy_(x)
        graph.replay()
        eager_loss = step(twin, opt_twin, x)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_reduce_overhead_uses_cuda_graphs():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt(dim=64, heads=4, kv_heads=2).to("cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 128, 64, device="cuda")
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier outputs may be reused
        model.zero_grad(set_to_none=True)  # .grad buffers of the last step belong to its graph
        out = compiled(x)
        out.sum().backward()
        out = out.detach().clone()  # keep it past the next replay
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and sum(len(r) for r in manager.roots.values()) > 0


# ---------------------------------------------------------------------------------------------
# Static KV cache (generation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
def test_kv_cache_decoding_matches_full_recompute(rotary, impl, device):
    """A prompt, then one token at a time through the static cache, gives the full causal pass."""
    torch.manual_seed(0)
    m = fm.MultiheadFlashAttention(32, 4, num_kv_heads=2, causal=True, rotary=rotary, impl=impl,
                                   device=device).eval()
    x = torch.randn(2, 9, 32, device=device)
    with torch.no_grad():
        full = m(x)
        m.allocate_kv_cache(2, 16)
        lens = torch.zeros(2, dtype=torch.int32, device=device)
        steps = [m(x[:, :5], cache_seqlens=lens)]
        lens += 5
        for i in range(5, 9):
            steps.append(m(x[:, i:i + 1], cache_seqlens=lens))
            lens += 1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert "k_cache" not in m.state_dict()  # the cache is not a parameter of the model
    m.free_kv_cache()
    with pytest.raises(ValueError, match="allocate_kv_cache"):
        m(x, cache_seqlens=lens)
