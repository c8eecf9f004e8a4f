"""The transformers attention backend (issue #14): tiny random models built from configs (no
downloads) with ``attn_implementation="fm_triton"`` against transformers' own ``eager``
attention: logits, loss and every parameter gradient by flash-attn's rule (oracle: the eager
model in float64), with left padding, sliding windows (Mistral, Gemma 2), softcap (Gemma 2),
attention sinks (gpt-oss), packed sequences; greedy ``generate()``; a control without the mask
function must fail the same check.  On CPU the kernels run under the Triton interpreter.
Skipped without transformers (``pip install flash_module[hf]``)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AttentionMaskInterface, masking_utils  # noqa: E402

from flash_module.integrations import transformers as fm_hf  # noqa: E402

from .helpers import assert_flash_rule  # noqa: E402

NAME = fm_hf.register()
# transformers' mask interface: (q_length, q_offset) since 5.x, cache_position before
NEW_MASK_API = "q_length" in inspect.signature(masking_utils.sdpa_mask).parameters
needs_new_mask_api = pytest.mark.skipif(not NEW_MASK_API, reason="transformers before the (q_length, "
                                        "q_offset) mask interface: covered by the model tests")
VOCAB, SEQ = 97, 21
DEV = "cpu"  # the suite's device (tests/conftest.py): CPU under the interpreter, or the GPU


@pytest.fixture(autouse=True)
def _on_the_suite_device(device):
    global DEV
    DEV = device
    yield


def _eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, s_aux=None,
             **kwargs):
    """The oracle's attention: transformers' eager attention (softcap before the mask, sinks as
    an extra column) with the softmax in the input dtype.  (transformers' eager takes the
    softmax in fp32, where a float64 mask's minimum is -inf: left padding's all-masked rows
    became NaN.)"""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    w = query @ key.transpose(2, 3) * scaling
    if softcap:
        w = softcap * torch.tanh(w / softcap)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : key.shape[2]]
    if s_aux is not None:
        sink = s_aux.reshape(1, -1, 1, 1).to(w.dtype).expand(*w.shape[:3], 1)
        p = torch.softmax(torch.cat([w, sink], -1), -1)[..., :-1]
    else:
        p = torch.softmax(w, -1)
    return (p @ value).transpose(1, 2).contiguous(), p


AttentionInterface.register("eager64", _eager64)
AttentionMaskInterface.register("eager64", AttentionMaskInterface._global_mapping["eager"])


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=6)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=6,
                                        max_window_layers=1)
    if kind == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=None, query_pre_attn_scalar=16)
    if kind == "gpt_oss":
        if not hasattr(transformers, "GptOssConfig"):  # (transformers >= 4.55)
            pytest.skip(f"transformers {transformers.__version__} has no gpt-oss")
        return transformers.GptOssConfig(**common, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                         sliding_window=6,
                                         layer_types=["sliding_attention", "full_attention"])
    raise ValueError(kind)


def _models(kind: str, attn: str = NAME):
    """(ours, eager fp32, eager fp64) with the same random weights."""
    torch.manual_seed(0)
    cfg = _config(kind)
    cfg._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ref.to(DEV).eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn)
    ours.to(DEV).eval()
    ours.load_state_dict(ref.state_dict())
    oracle = copy.deepcopy(ref).double()
    oracle.set_attn_implementation("eager64")
    return ours, ref, oracle


def _batch(pad: bool):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if pad:
        mask[1, :7] = 0  # left padding
    # no loss on padding, nor on the first real token: it is predicted from a padded row, whose
    # output is arbitrary (its query sees no key; eager gives a uniform average, we give 0)
    seen = torch.cat([torch.zeros(2, 1, dtype=torch.long), mask[:, :-1]], 1)
    labels = ids.masked_fill((mask == 0) | (seen == 0), -100)
    return ids.to(DEV), mask.to(DEV), labels.to(DEV)


def _run(model, ids, mask, labels):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    keep = mask.bool()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return [out.logits.detach()[keep], out.loss.detach(), *grads]


def _check(kind: str, pad: bool, attn: str = NAME):
    ours, ref, oracle = _models(kind, attn)
    batch = _batch(pad)
    got, low = _run(ours, *batch), _run(ref, *batch)
    if kind == "gpt_oss":  # its experts' grouped matmul has no float64: eager fp32 is the reference
        for i, (a, p) in enumerate(zip(got, low)):
            torch.testing.assert_close(a, p, atol=1e-4, rtol=1e-3, msg=f"tensor {i} (logits, loss, grads)")
        return
    want = _run(oracle, *batch)
    assert len(got) == len(want)
    for i, (a, o, p) in enumerate(zip(got, want, low)):
        assert_flash_rule(f"tensor {i} (logits, loss, grads)", a, o, p, torch.float32)


# (kind, left padding): the default run keeps GQA + padding (Llama) and softcap + windows
# (Gemma 2); the rest, sinks (gpt-oss) among them, are slow (CI's slow run and the GPU check)
CASES = [
    pytest.param(kind, pad, id=f"{kind}-{'left-padding' if pad else 'no-padding'}",
                 marks=() if (kind, pad) in {("llama", True), ("gemma2", True)} else pytest.mark.slow)
    for kind in ("llama", "mistral", "qwen2", "gemma2", "gpt_oss") for pad in (False, True)
]


@pytest.mark.parametrize("kind, pad", CASES)
def test_logits_loss_and_gradients_match_eager(kind, pad, monkeypatch):
    before = fm_hf.calls
    unpadded = []
    real = fm_hf._unpadded
    monkeypatch.setattr(fm_hf, "_unpadded", lambda *a, **kw: unpadded.append(1) or real(*a, **kw))
    _check(kind, pad)
    assert fm_hf.calls > before  # the model really ran our attention
    assert bool(unpadded) == pad  # padding goes through the varlen kernels, not a 4-D mask


def test_control_without_the_mask_function_fails():
    """Registering the attention function alone makes transformers pass no mask: padding is
    dropped, and the same check must catch it."""
    AttentionInterface.register("fm_nomask", fm_hf.attention_forward)
    with pytest.raises(AssertionError):
        _check("llama", True, attn="fm_nomask")


@pytest.mark.parametrize("kind", ["llama", pytest.param("mistral", marks=pytest.mark.slow)])
def test_packed_sequences_by_position_ids(kind, monkeypatch):
    """Two documents in one row (position_ids restart, no attention_mask): each sees only itself,
    through the varlen kernels (transformers' document ids, counted once per forward)."""
    import flash_module.api as api

    varlen = []
    real = api.flash_attn_varlen_func
    monkeypatch.setattr(api, "flash_attn_varlen_func", lambda *a, **kw: varlen.append(1) or real(*a, **kw))
    ours, ref, _ = _models(kind)
    gen = torch.Generator().manual_seed(9)
    a, b = (torch.randint(0, VOCAB, (1, n), generator=gen).to(DEV) for n in (9, 12))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(12)])[None].to(DEV)
    with torch.no_grad():
        got = ours(packed, position_ids=pos, use_cache=False).logits  # (packing is read without a cache)
        alone = torch.cat([ref(a).logits, ref(b).logits], 1)
    torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
    assert len(varlen) == 2  # both layers


@pytest.mark.slow
def test_greedy_generate_gives_the_same_tokens():
    ours, ref, _ = _models("llama")
    ids, mask, _ = _batch(True)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    assert torch.equal(got, want)


def test_register_refuses_names_transformers_takes_for_its_own():
    with pytest.raises(ValueError, match="containing 'flash'"):
        fm_hf.register("flash_module")


@needs_new_mask_api
def test_mask_function_compiles_for_windows_and_packing():
    """transformers builds its mask functions inside compiled code (closures dynamo cannot open):
    the choice must trace with fullgraph=True, for a sliding window and for packing."""
    from transformers import masking_utils as mu

    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :3] = False
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])

    def masks(pad, docs):
        sliding = fm_hf.build_mask(2, 7, 7, mask_function=mu.sliding_window_causal_mask_function(3),
                                   attention_mask=pad, local_size=3)
        packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(docs))
        return sliding, fm_hf.build_mask(1, 7, 7, mask_function=packed, attention_mask=None,
                                         allow_is_causal_skip=False)

    torch._dynamo.reset()
    sliding, packed = torch.compile(masks, fullgraph=True, backend="eager")(pad, docs)
    assert torch.equal(sliding, pad) and packed.shape == (1, 1, 7, 7)


@needs_new_mask_api
def test_mask_function_gives_2d_padding_or_the_4d_mask():
    """Plain causal / sliding patterns aligned bottom-right: the 2-D padding mask (None without
    one); packing in eager code: the document ids; other overlays: transformers' SDPA 4-D mask."""
    from transformers import masking_utils as mu

    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :3] = False
    causal = mu.causal_mask_function
    got = fm_hf.build_mask(2, 7, 7, mask_function=causal, attention_mask=pad)
    assert got.shape == (2, 7) and torch.equal(got, pad)
    assert fm_hf.build_mask(2, 7, 7, mask_function=causal, attention_mask=None) is None
    sliding = mu.sliding_window_causal_mask_function(3)
    assert fm_hf.build_mask(2, 1, 7, q_offset=6, mask_function=sliding, attention_mask=pad,
                            local_size=3).shape == (2, 7)
    packed = mu.and_masks(causal, mu.packed_sequence_mask_function(torch.tensor([[0, 0, 0, 1, 1, 1, 1]])))
    docs = fm_hf.build_mask(1, 7, 7, mask_function=packed, attention_mask=None, allow_is_causal_skip=False)
    assert torch.equal(docs, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))  # eager: the document ids, for varlen
    overlay = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 2)  # (use_vmap: an overlay)
    four_d = fm_hf.build_mask(1, 7, 7, mask_function=overlay, attention_mask=None, allow_is_causal_skip=False,
                              use_vmap=True)
    assert four_d.shape == (1, 1, 7, 7) and not four_d[0, 0, 4, 2] and four_d[0, 0, 4, 3]
    # bidirectional (encoders, cross-attention: the padding is the keys' alone) -> the 4-D mask
    assert fm_hf.build_mask(2, 7, 7, mask_function=mu.bidirectional_mask_function, attention_mask=pad,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=True).dim() == 4
    # a static cache: keys past the queries (not aligned) -> the 4-D mask
    assert fm_hf.build_mask(2, 1, 16, q_offset=torch.tensor(6), mask_function=causal,
                            attention_mask=pad).dim() == 4


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["causal", "bidirectional"])
def test_unpadding_equals_the_masked_kernels(causal):
    """Padding by unpadding into the varlen kernels (left, right padding and a hole) equals the
    dense kernels with the same key-padding mask on every real row, forward and backward; padded
    rows give 0."""
    from flash_module.api import _attention

    torch.manual_seed(3)
    b, h, h_kv, s, d = 3, 4, 2, 19, 16
    q = torch.randn(b, h, s, d, device=DEV, requires_grad=True)
    k, v = (torch.randn(b, h_kv, s, d, device=DEV, requires_grad=True) for _ in range(2))
    mask = torch.ones(b, s, dtype=torch.bool, device=DEV)
    mask[0, :5] = False  # left padding
    mask[1, 13:] = False  # right padding
    mask[2, 4:6] = False  # a hole
    got = fm_hf._unpadded(q, k, v, mask, softmax_scale=0.3, causal=causal)
    # reference: the compacted tokens of each row attend among themselves (causal in order)
    want = torch.zeros_like(got)
    for i in range(b):
        idx = mask[i].nonzero()[:, 0]
        qi, ki, vi = (t[i : i + 1, :, idx].transpose(1, 2) for t in (q, k, v))
        want[i, idx] = _attention(qi, ki, vi, 0.3, causal, True, "fa2")[0][0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not got[~mask].any()
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_packed_sequences_by_cu_seq_lens(monkeypatch):
    """Packed documents given as cu_seq_lens_q/k (DataCollatorWithFlattening's flash kwargs) run
    the varlen kernels: each document sees only itself."""
    import flash_module.api as api

    varlen = []
    real = api.flash_attn_varlen_func
    monkeypatch.setattr(api, "flash_attn_varlen_func", lambda *a, **kw: varlen.append(1) or real(*a, **kw))
    ours, ref, _ = _models("llama")
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randint(0, VOCAB, (1, n), generator=gen).to(DEV) for n in (8, 13))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32, device=DEV)
    pos = torch.cat([torch.arange(8), torch.arange(13)])[None].to(DEV)
    with torch.no_grad():
        got = ours(torch.cat([a, b], 1), position_ids=pos, use_cache=False, cu_seq_lens_q=cu,
                   cu_seq_lens_k=cu, max_length_q=13, max_length_k=13).logits
        alone = torch.cat([ref(a).logits, ref(b).logits], 1)
    torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
    assert len(varlen) == 2  # both layers


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_greedy_generate_with_a_static_cache(kind):
    """Generation with transformers' static cache (keys past the queries: the 4-D mask path) and
    the dynamic cache give eager's tokens."""
    ours, ref, _ = _models(kind)
    ids, mask, _ = _batch(True)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want)


@pytest.mark.slow
@needs_new_mask_api
def test_unpadding_compiles_without_graph_breaks(device):
    """The padded path (mask function + unpadding + varlen kernels) under
    torch.compile(fullgraph=True): no host read, and a new padding pattern does not recompile."""
    from torch._dynamo.testing import CompileCounter
    from transformers import masking_utils as mu

    torch._dynamo.reset()
    counter = CompileCounter()

    def step(q, k, v, pad):
        mask = fm_hf.build_mask(2, q.shape[2], k.shape[2], mask_function=mu.causal_mask_function,
                                attention_mask=pad)
        return fm_hf.attention_forward(None, q, k, v, mask, scaling=0.25, is_causal=True)[0]

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, h, 9, 16, device=device) for h in (4, 2, 2))
    for first in (3, 5):
        pad = torch.ones(2, 9, dtype=torch.long, device=device)
        pad[1, :first] = 0
        torch.testing.assert_close(compiled(q, k, v, pad), step(q, k, v, pad), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_hf_example_trains_and_generates_like_sdpa(device):
    """examples/hf_train_generate.py: a Llama-shaped model trained with our backend and with
    transformers' "sdpa" from the same weights gives the same losses step by step (fp32 here)
    and the same greedy tokens from left-padded prompts."""
    from .helpers import example_module

    with example_module("hf_train_generate") as example:
        res = example.main(["--device", device, "--dtype", "fp32", "--steps", "3", "--new-tokens", "4",
                            "--corpus-chars", "20000"])
    tol = 1e-4 if device == "cpu" else 2e-3  # (on a GPU both backends may use TF32 matmuls)
    torch.testing.assert_close(torch.tensor(res[NAME]["losses"]), torch.tensor(res["sdpa"]["losses"]),
                               atol=tol, rtol=tol)
    assert res["tokens_agree"] == 1.0


@pytest.mark.slow
def test_attention_dropout_in_training():
    """A model with attention dropout, in training mode with padding: the varlen kernels draw the
    mask (fresh per step, reproducible under torch.manual_seed), and evaluation mode has none."""
    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).to(DEV)
    ids, mask, labels = _batch(True)
    model.train()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(ids, attention_mask=mask, labels=labels).loss.item())
    assert losses[0] == losses[1] != losses[2]
    model.eval()
    with torch.no_grad():
        a, b = (model(ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(a, b)
