"""The sibling forward gives each candidate its faithful state, and the cache is put back exactly."""

import pytest
import torch

from conftest import ARCHS, left_padded, random_prompts, tiny_model
from mara_hf.hf_internals import DynamicSnapshot, appended_kv, cache_keyword
from mara_hf.states import DynamicSiblings, select_kv, sibling_forward
from reference import naive_states


def prefill(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    return out[cache_keyword(model)]


def snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone(), getattr(layer, "cumulative_length", None)) for layer in cache.layers]


def assert_cache_equal(cache, saved):
    for layer, (keys, values, cumulative) in zip(cache.layers, saved):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert getattr(layer, "cumulative_length", None) == cumulative


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_sibling_states_equal_separate_forwards(arch, padded):
    model = tiny_model(arch)
    # Lengths 12 and 14 overflow the sliding window (8) of mistral / qwen2 / gemma2 layers.
    prompts = random_prompts(3, lengths=(12, 5, 14) if padded else (12,), seed=1)
    if not padded:
        prompts = [prompts[0]] * 2
    ids, mask = left_padded(prompts)
    cache = prefill(model, ids, mask)
    saved = snapshot(cache)
    candidates = torch.randint(3, 96, (len(prompts), 6), generator=torch.Generator().manual_seed(2))
    positions = mask.sum(-1, keepdim=True)
    checkpoint = DynamicSnapshot(cache)
    with torch.no_grad():
        out = sibling_forward(model, cache, candidates, positions, mask if padded else None, return_logits=True)
    for row, prompt in enumerate(prompts):
        expected = naive_states(model, prompt, candidates[row].tolist())
        torch.testing.assert_close(out.states[row], expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            expected_logits = model(torch.tensor([prompt + [c] for c in candidates[row].tolist()])).logits[:, -1]
        torch.testing.assert_close(out.logits[row], expected_logits, atol=1e-4, rtol=1e-4)
    checkpoint.restore()
    assert_cache_equal(cache, saved)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_committed_sibling_continues_like_plain_decoding(arch):
    """Keeping one sibling per row leaves the cache as if that token had been decoded normally."""
    model = tiny_model(arch)
    prompts = random_prompts(2, lengths=(11, 6), seed=3)
    ids, mask = left_padded(prompts)
    cache = prefill(model, ids, mask)
    candidates = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    positions = mask.sum(-1, keepdim=True)
    siblings = DynamicSiblings(model, cache, mask)
    with torch.no_grad():
        siblings.forward(candidates, positions, 0, keep_kv=True)
    chosen = torch.tensor([2, 0])
    siblings.commit(select_kv(siblings.kept_kv(), chosen))
    follow = torch.tensor([[30], [31]])
    mask2 = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=-1)
    with torch.no_grad():
        logits = model(input_ids=follow, attention_mask=mask2, position_ids=positions + 1,
                       **{cache_keyword(model): cache}).logits[:, -1]
    for row, prompt in enumerate(prompts):
        full = prompt + [candidates[row, chosen[row]].item(), follow[row].item()]
        with torch.no_grad():
            expected = model(torch.tensor([full])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


class _PickFirst:
    """A `pick` keeping each row's first sibling of the chunk (`index`, as `decide.Picker` records it)."""

    def __call__(self, states):
        self.index = torch.zeros(states.shape[0], dtype=torch.long)
        return self.index


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_step_keeps_views_of_its_entries_and_a_later_commit_is_exact(arch):
    """The fused loop's decode step (one sibling for every row) keeps its entries as views of the decoded cache (no
    op per layer unless a commit needs them); a later chunk for one row, then a commit of that row's sibling and
    the other row's top-1, leaves the cache as if those tokens had been decoded normally."""
    from mara_hf.states import select_picked

    model = tiny_model(arch)
    prompts = random_prompts(2, lengths=(9, 7), seed=5)
    ids, mask = left_padded(prompts)
    cache = prefill(model, ids, mask)
    positions = mask.sum(-1, keepdim=True)
    siblings = DynamicSiblings(model, cache, mask)
    with torch.no_grad():
        siblings.forward(torch.tensor([[10], [20]]), positions, 0, logits="pick", pick=_PickFirst(), keep_kv=True)
        keys = siblings.kept_kv()[0][0][0]
        assert keys.untyped_storage().data_ptr() == cache.layers[0].keys.untyped_storage().data_ptr()
        siblings.restore()
        rows = torch.tensor([1])
        siblings.forward(torch.tensor([[21, 22]]), positions[rows], 1, rows, logits="pick", pick=_PickFirst(),
                         keep_kv=True)
        siblings.restore()
        siblings.commit(select_picked(siblings.kept_kv(), torch.tensor([0, 1])))  # row 0: its top-1; row 1: 21
        follow = torch.tensor([[30], [31]])
        mask2 = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=-1)
        logits = model(input_ids=follow, attention_mask=mask2, position_ids=positions + 1,
                       **{cache_keyword(model): cache}).logits[:, -1]
    for row, (prompt, taken) in enumerate(zip(prompts, (10, 21))):
        with torch.no_grad():
            expected = model(torch.tensor([prompt + [taken, follow[row].item()]])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def test_a_chunk_of_siblings_attends_on_the_key_value_heads_as_they_are(monkeypatch):
    """Grouped-query attention with sdpa: a chunk's queries are packed onto the 2 key/value heads (4 query heads), so
    no layer copies its keys/values per query head; the states are those of separate forwards (above)."""
    from mara_hf import hf_internals as hf

    model = tiny_model("llama")
    prompts = random_prompts(2, lengths=(9, 6), seed=3)
    ids, mask = left_padded(prompts)
    cache = prefill(model, ids, mask)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    candidates = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = sibling_forward(model, cache, candidates, mask.sum(-1, keepdim=True), mask)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert calls == [((2, 2, 2 * 5, head_dim), (2, 2, 9 + 5, head_dim), False)] * model.config.num_hidden_layers
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(out.states[row], naive_states(model, prompt, candidates[row].tolist()),
                                   atol=1e-5, rtol=1e-5)
    assert hf._replaced_sdpa is None and hf._packed_sdpa_users == 0


@pytest.mark.parametrize(
    "mask_shape, packs",
    [((2, 1, 3, 10), True), ((2, 1, 1, 10), False), ((2, 4, 3, 10), False), (None, False)],
    ids=["a-row-per-query", "one-row-broadcast", "per-head", "no-mask"],
)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_the_packing_attention_equals_transformers_sdpa(monkeypatch, mask_shape, packs, dtype):
    """Called as a layer calls "sdpa", the packing function gives transformers' output: packed for a chunk's mask
    (one row per query, shared by the heads), handed to transformers' function for any other mask."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mara_hf import hf_internals as hf

    generator = torch.Generator().manual_seed(6)
    query, key, value = (torch.randn(2, heads, length, 8, generator=generator)
                         for heads, length in ((4, 3), (2, 10), (2, 10)))
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, generator=generator) > 0.3
        mask[..., 0] = True  # every query sees a key
        if dtype is not torch.bool:
            mask = torch.zeros(mask_shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        shapes.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    with hf.packed_sibling_attention():
        out, _ = hf._sdpa_packing_siblings(module, query, key, value, mask, scaling=0.3)
    assert shapes[1] == ((2, 2, 6, 8) if packs else shapes[0])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_the_attention_table_is_left_as_it_was_also_after_a_failed_forward(monkeypatch):
    """The packing function stands in for "sdpa" only while a chunk runs; a function the user put there (a local
    override) is called for every call it does not pack and is back afterwards, also when the forward raised."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mara_hf import hf_internals as hf

    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(1, lengths=(7,), seed=5))
    cache = prefill(model, ids, mask)
    candidates = torch.tensor([[5, 6, 7]])
    checkpoint = DynamicSnapshot(cache)
    with torch.no_grad():
        sibling_forward(model, cache, candidates, mask.sum(-1, keepdim=True), mask)
    checkpoint.restore()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping

    seen = []

    def users_sdpa(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", users_sdpa)
    with hf.packed_sibling_attention():
        with hf.packed_sibling_attention():  # nested: the table changes once
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is hf._sdpa_packing_siblings
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is hf._sdpa_packing_siblings
        with torch.no_grad():  # one token per row is not a chunk: the user's function runs
            model(input_ids=candidates[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], -1), use_cache=False)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is users_sdpa and seen == [1] * model.config.num_hidden_layers

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[-1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        sibling_forward(model, cache, candidates, mask.sum(-1, keepdim=True), mask)
    handle.remove()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is users_sdpa
    assert hf._replaced_sdpa is None and hf._packed_sdpa_users == 0
