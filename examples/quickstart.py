"""Quickstart: flash_module.flash_attn_func against torch SDPA, forward and backward."""

import torch
import torch.nn.functional as F

import flash_module

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
batch, seqlen, heads, head_dim = 2, 512, 8, 64

# flash_attn layout: (batch, seqlen, heads, head_dim)
shape = (batch, seqlen, heads, head_dim)
q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

out = flash_module.flash_attn_func(q, k, v, causal=True)

# torch SDPA works on (batch, heads, seqlen, head_dim)
ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
ref = ref.transpose(1, 2)
print(f"device={device} dtype={dtype} out={tuple(out.shape)}")
print(f"ran: {flash_module.which_implementation(q)}")
print(f"forward  max |out - sdpa| = {(out - ref).abs().max().item():.3e}")

dout = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), dout)
ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
for name, g, r in zip("qkv", grads, ref_grads):
    print(f"backward max |d{name} - sdpa| = {(g - r).abs().max().item():.3e}")
