"""The opt-in value checks (flash_module.check_values / FLASH_MODULE_CHECK_VALUES=1): bad
offsets, lengths and indices raise ValueError naming them; off (the default) nothing is read."""

from __future__ import annotations

import pytest
import torch

import flash_module as fm


def _i32(x, device):
    return torch.tensor(x, dtype=torch.int32, device=device)


def _varlen_args(device, **over):
    q = torch.randn(10, 2, 16, device=device)
    k, v = (torch.randn(12, 2, 16, device=device) for _ in range(2))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_i32([0, 4, 10], device), cu_seqlens_k=_i32([0, 5, 12], device),
                max_seqlen_q=6, max_seqlen_k=7)
    args.update({n: _i32(x, device) if isinstance(x, list) else x for n, x in over.items()})
    return args


VARLEN_BAD = [
    pytest.param(dict(cu_seqlens_q=[1, 4, 10]), r"cu_seqlens_q\[0\] = 1", id="q-start"),
    pytest.param(dict(cu_seqlens_k=[0, 6, 5]),
                 r"cu_seqlens_k\[2\] = 5: offsets must start at 0, never decrease", id="k-decreasing"),
    pytest.param(dict(cu_seqlens_k=[0, 5, 13]), r"end <= 12 tokens", id="k-past-end"),
    pytest.param(dict(max_seqlen_q=5), r"sequence length \(cu_seqlens_q\)\[1\] = 6: longer than max_seqlen_q",
                 id="max-seqlen"),
    pytest.param(dict(seqused_k=[5, 8]), r"seqused_k\[1\] = 8", id="seqused"),
]


@pytest.mark.parametrize("over,words", VARLEN_BAD)
def test_bad_varlen_values_raise_when_checked(over, words, device):
    args = _varlen_args(device, **over)
    with fm.check_values(), pytest.raises(ValueError, match=words):
        fm.flash_attn_varlen_func(**args)


def test_checks_are_off_by_default_and_pass_good_values(device):
    good = _varlen_args(device)
    with fm.check_values():
        out = fm.flash_attn_varlen_func(**good)
    torch.testing.assert_close(out, fm.flash_attn_varlen_func(**good))
    bad = _varlen_args(device, cu_seqlens_k=[0, 6, 5])
    assert fm.flash_attn_varlen_func(**bad).shape == (10, 2, 16)  # clamped, not checked: no error
    previous = fm.set_check_values(True)
    try:
        with pytest.raises(ValueError, match="cu_seqlens_k"):
            fm.flash_attn_varlen_func(**bad)
    finally:
        fm.set_check_values(previous)


def test_paged_varlen_values(device):
    q = torch.randn(5, 2, 16, device=device)
    kp, vp = (torch.randn(4, 16, 2, 16, device=device) for _ in range(2))
    cu_q, table = _i32([0, 2, 5], device), _i32([[0, 3], [1, 2]], device)
    with fm.check_values(), torch.no_grad():
        fm.flash_attn_varlen_func(q, kp, vp, cu_q, _i32([0, 20, 52], device), block_table=table)
        with pytest.raises(ValueError, match="longer than one block-table row"):
            fm.flash_attn_varlen_func(q, kp, vp, cu_q, _i32([0, 33, 40], device), block_table=table)
        with pytest.raises(ValueError, match=r"block_table \(flattened\)\[3\] = 4: page index outside"):
            fm.flash_attn_varlen_func(q, kp, vp, cu_q, _i32([0, 20, 52], device),
                                      block_table=_i32([[0, 3], [1, 4]], device))


KV_BAD = [
    pytest.param(dict(cache_seqlens=[3, 31]),
                 r"cache_seqlens\[1\] = 31: must be in \[0, capacity - seqlen_new\]", id="overflow"),
    pytest.param(dict(cache_seqlens=[-1, 3]), r"cache_seqlens\[0\] = -1", id="negative"),
    pytest.param(dict(cache_batch_idx=[0, 2]), r"cache_batch_idx\[1\] = 2: cache row outside",
                 id="batch-row"),
    pytest.param(dict(cache_leftpad=[0, 6]), r"cache_leftpad\[1\] = 6", id="leftpad"),
]


@pytest.mark.parametrize("over,words", KV_BAD)
def test_bad_kvcache_values_raise_when_checked(over, words, device):
    q = torch.randn(2, 1, 4, 16, device=device)
    kc, vc = (torch.randn(2, 32, 2, 16, device=device) for _ in range(2))
    k, v = (torch.randn(2, 2, 2, 16, device=device) for _ in range(2))
    args = dict(cache_seqlens=[3, 3])
    args.update(over)
    args = {n: _i32(x, device) for n, x in args.items()}
    before = kc.clone()
    with fm.check_values(), pytest.raises(ValueError, match=words):
        fm.flash_attn_with_kvcache(q, kc, vc, k, v, **args)
    assert torch.equal(kc, before)  # checked before anything was appended
