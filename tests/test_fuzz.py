"""Property-based fuzz of the public attention API against the float64 oracle (hypothesis).

Each example draws a shape (odd lengths, Sq != Sk both ways, GQA/MQA, head dims that are not
powers of two), a layout, causal or not, an entry point (flash-attn's or SDPA's, with their two
causal alignments), a mode and an implementation, then checks out, dq, dk and dv with
flash-attn's rule (2x PyTorch's own error in the dtype, plus a small atol).

The budget is small and fixed in CI (``derandomize``: the same examples every run); set
``FLASH_FUZZ_EXAMPLES`` for a longer run, e.g. ``FLASH_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import flash_module as fm

from .helpers import assert_flash_rule, make_qkv, reference_grads

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("FLASH_FUZZ_EXAMPLES", "12"))


@st.composite
def cases(draw):
    h_kv = draw(st.sampled_from([1, 2]))
    return dict(
        b=draw(st.integers(1, 2)),
        sq=draw(st.integers(1, 80)),
        sk=draw(st.integers(1, 80)),
        h_kv=h_kv,
        h=h_kv * draw(st.sampled_from([1, 2, 3])),
        d=draw(st.sampled_from([8, 16, 24, 40, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        layout=draw(st.sampled_from(["bshd", "bhsd"])),
        causal=draw(st.booleans()),
        api=draw(st.sampled_from(["flash", "sdpa"])),
        mode=draw(st.sampled_from(fm.MODES)),
        impl=draw(st.sampled_from(["auto", "torch"])),
    )


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=cases())
def test_public_api_matches_oracle(case, device):
    c = case
    q, k, v = make_qkv(c["b"], c["sq"], c["sk"], c["h"], c["h_kv"], c["d"], c["dtype"], device, c["layout"])
    dout = torch.randn(c["b"], c["sq"], c["h"], c["d"], dtype=c["dtype"], device=device)
    kw = dict(mode=c["mode"], impl=c["impl"], num_splits=2 if c["mode"] == "tiling" else 0)
    if c["api"] == "flash":  # (B, S, H, D), bottom-right causal
        out = fm.flash_attn_func(q, k, v, causal=c["causal"], **kw)
    else:  # (B, H, S, D), top-left causal
        out = fm.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=c["causal"],
                                              enable_gqa=True, **kw).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    bottom_right = c["api"] == "flash"
    oracle = reference_grads(q, k, v, dout, c["causal"], bottom_right, dtype=torch.float64)
    lowp = reference_grads(q, k, v, dout, c["causal"], bottom_right)
    for name, a, o, p in zip(["out", "dq", "dk", "dv"], (out, *grads), (oracle[0], *oracle[2:]),
                             (lowp[0], *lowp[2:])):
        assert_flash_rule(f"{name} {c}", a, o, p, c["dtype"])
