"""The variants' argument errors in one table (issue #13): malformed values are ValueError /
TypeError naming the argument and what it must be; a mode without a variant (fa1) raises
NotImplementedError naming both."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm

# (keyword arguments, error, words); q has 2 heads, batch 1.
BAD = [
    pytest.param(dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0", id="softcap-negative"),
    pytest.param(dict(softcap=float("inf")), ValueError, "softcap must be finite", id="softcap-inf"),
    pytest.param(dict(softcap=float("nan")), ValueError, "softcap must be finite", id="softcap-nan"),
    pytest.param(dict(softcap="30"), TypeError, "softcap must be a real number", id="softcap-str"),
    pytest.param(dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError,
                 "alibi_slopes must be float32", id="alibi-fp64"),
    pytest.param(dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be \(nheads,\) = \(2,\)",
                 id="alibi-wrong-heads"),
    pytest.param(dict(alibi_slopes=torch.ones(3, 2)), ValueError, r"\(batch, nheads\) = \(1, 2\)",
                 id="alibi-wrong-batch"),
    pytest.param(dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes must be a torch.Tensor",
                 id="alibi-list"),
    pytest.param(dict(window_size=(3, -2)), ValueError, "window_size entries must be >= -1", id="window-neg"),
    pytest.param(dict(window_size=(3.0, 1)), TypeError, "window_size must be a pair", id="window-float"),
    pytest.param(dict(learnable_sink=torch.zeros(3)), ValueError,
                 r"learnable_sink must be a floating \(nheads,\) = \(2,\)", id="sink-shape"),
    pytest.param(dict(learnable_sink=torch.zeros(2, dtype=torch.int32)), ValueError,
                 "learnable_sink must be a floating", id="sink-int"),
    pytest.param(dict(learnable_sink=[0.0, 1.0]), TypeError, "learnable_sink must be a torch.Tensor",
                 id="sink-list"),
]


@pytest.mark.parametrize("kwargs,error,words", BAD)
def test_bad_variant_argument_is_a_clear_error(kwargs, error, words, device):
    q = torch.randn(1, 4, 2, 16, device=device)
    kwargs = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
    with pytest.raises(error, match=words):
        fm.flash_attn_func(q, q, q, **kwargs)


FA1_REFUSES = [
    pytest.param(dict(softcap=5.0), "softcap", id="softcap"),
    pytest.param(dict(alibi_slopes=torch.ones(2)), "alibi_slopes", id="alibi"),
    pytest.param(dict(window_size=(2, 0)), "window_size", id="window"),
    pytest.param(dict(learnable_sink=torch.zeros(2)), "learnable_sink", id="sink"),
]


@pytest.mark.parametrize("kwargs,name", FA1_REFUSES)
def test_fa1_mode_names_the_missing_variant(kwargs, name, device):
    q = torch.randn(1, 4, 2, 16, device=device)
    kwargs = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
    with pytest.raises(NotImplementedError, match=f"mode='fa1' does not support {name}"):
        fm.flash_attn_func(q, q, q, mode="fa1", **kwargs)
