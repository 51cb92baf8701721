"""Bad decoding setups in both paths (issue 13): assisted decoding, right padding, an agent that gives NaN; and what
half precision may change between the two paths."""

import logging

import pytest
import torch

from conftest import assert_model_untouched, constant_agent, decisive_agent, random_prompts, tiny_model
from mara_hf import MaraAgent, MaraLogitsProcessor, add_mara_generation, mara_generate

COMMON = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def right_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p)
        mask[row, : len(p)] = 1
    return ids, mask


@pytest.mark.parametrize("extra", [dict(prompt_lookup_num_tokens=3), "assistant"])
def test_fused_loop_refuses_assisted_decoding(extra):
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=1)[0]])
    kwargs = dict(assistant_model=tiny_model("llama", seed=1)) if extra == "assistant" else extra
    with pytest.raises(ValueError, match="fused MARA loop does not do assisted or speculative decoding"):
        model.generate(ids, **COMMON, custom_generate=mara_generate, mara_agent=constant_agent(), **kwargs)
    add_mara_generation(model)
    with pytest.raises(ValueError, match="assisted or speculative decoding"):
        model.generate(ids, **COMMON, mara_agent=constant_agent(), **kwargs)
    assert_model_untouched(model)


@pytest.mark.parametrize("path", ["processor", "fused"])
def test_right_padding_is_refused_with_the_fix(path):
    model = tiny_model("llama")
    ids, mask = right_padded(random_prompts(3, lengths=(4, 9, 6), seed=2))
    kwargs = dict(input_ids=ids, attention_mask=mask, **COMMON)
    if path == "processor":
        kwargs["logits_processor"] = [MaraLogitsProcessor(constant_agent(), model)]
    else:
        kwargs.update(custom_generate=mara_generate, mara_agent=constant_agent())
    with pytest.raises(ValueError, match='left-padded prompts.*padding_side = "left"'):
        model.generate(**kwargs)
    assert_model_untouched(model)


class NaNAgent(MaraAgent):
    """Gives NaN accept probabilities from its `nan_from`-th call on (1: always)."""

    def __init__(self, *args, nan_from: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_from, self.calls = nan_from, 0

    def accept_probability(self, states):
        self.calls += 1
        if self.calls >= self.nan_from:
            return torch.full(states.shape[:-1], float("nan"), device=states.device)
        return super().accept_probability(states)


@pytest.mark.parametrize("path", ["processor", "fused"])
@pytest.mark.parametrize("nan_from", [1, 3])  # 3: the first steps are fine, then the agent breaks
def test_nan_accept_probabilities_warn_once_naming_the_agent(path, nan_from, caplog):
    model = tiny_model("llama")
    agent = NaNAgent(state_dim=32, source="broken_actor.pth", nan_from=nan_from)
    ids = torch.tensor([random_prompts(1, seed=3)[0]])
    kwargs = dict(**COMMON)
    if path == "processor":
        kwargs["logits_processor"] = [MaraLogitsProcessor(agent, model)]
    else:
        kwargs.update(custom_generate=mara_generate, mara_agent=agent)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        model.generate(ids, **kwargs)
    warnings = [r for r in caplog.records if "NaN or infinite accept probabilities" in r.getMessage()]
    assert len(warnings) == 1 and "broken_actor.pth" in warnings[0].getMessage()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths_agree_when_every_taken_token_was_its_own_forward(dtype):
    """In half precision the fused loop keeps the keys/values its sibling forward computed for the taken token; they
    equal generate's own one-token forward when the taken token was evaluated in a chunk of one (README, "Greedy
    output identity"). An accept-all agent with a first chunk of one candidate takes only such tokens."""
    model = tiny_model("llama", dtype=dtype)
    ids = torch.tensor([random_prompts(1, seed=4)[0]])
    agent = constant_agent(accept=True)
    plain = model.generate(ids, **COMMON)
    dropin = model.generate(ids, **COMMON, logits_processor=[MaraLogitsProcessor(agent, model, schedule=(1, 8))])
    fused = model.generate(ids, **COMMON, custom_generate=mara_generate, mara_agent=agent, mara_schedule=(1, 8))
    assert torch.equal(dropin, plain) and torch.equal(fused, plain)


def test_float32_paths_agree_with_a_decisive_agent_whatever_the_chunks():
    model = tiny_model("qwen3")
    agent = decisive_agent(reject_bias=9.0)
    ids = torch.tensor([random_prompts(1, lengths=(9,), seed=6)[0]])
    outputs = [model.generate(ids, **dict(COMMON, max_new_tokens=10), custom_generate=mara_generate,
                              mara_agent=agent, mara_schedule=schedule) for schedule in ((1,), (1, 8), (40,))]
    dropin = model.generate(ids, **dict(COMMON, max_new_tokens=10), logits_processor=[MaraLogitsProcessor(agent, model)])
    assert all(torch.equal(o, dropin) for o in outputs)


def test_pending_statistics_stay_bounded_when_only_search_lengths_are_read():
    """The auto schedule reads search lengths every few steps; the probabilities kept for the NaN count must not pile
    up in between (a long generation would hold every chunk's tensors)."""
    from mara_hf import MaraStats
    from mara_hf.stats import StepDecision

    stats = MaraStats(top_k=4)
    step = StepDecision(index=torch.zeros(2, dtype=torch.long), token=torch.zeros(2, dtype=torch.long),
                        num_candidates=torch.full((2,), 4), asked=torch.ones(2, dtype=torch.bool),
                        fallback=torch.zeros(2, dtype=torch.bool))
    for _ in range(3 * MaraStats.FOLD_EVERY):
        stats.record(step)
        stats.add_probabilities([(torch.tensor([0.9, float("nan")]), torch.tensor([True, True]))])
        stats.search_length_histogram  # what the schedule reads
    assert len(stats._pending_probabilities) < MaraStats.FOLD_EVERY
    assert stats.nonfinite == 3 * MaraStats.FOLD_EVERY and stats.tokens == 6 * MaraStats.FOLD_EVERY


def _layer_entries(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _same_entries(a, b, close=False):
    same = (lambda x, y: x.shape == y.shape and torch.allclose(x, y, atol=1e-5)) if close else torch.equal
    return len(a) == len(b) and all(same(k, l) and same(v, w) for (k, v), (l, w) in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding layers (window 8) past their window
@pytest.mark.parametrize("agent_kind", ["accept-all", "decisive"])
def test_the_returned_cache_is_generates_and_a_call_can_continue_on_it(arch, agent_kind):
    """The fused loop keeps the taken token's keys/values in its step; it returns the cache as `generate` does,
    without the last token (its next call feeds it). Continuing with `out.sequences` on that cache then decodes as
    one longer call; a cache that also held the last token made `generate` feed the whole sequence again."""
    from mara_hf import hf_internals as hf

    model = tiny_model(arch)
    agent = constant_agent() if agent_kind == "accept-all" else decisive_agent(reject_bias=3.0)
    ids = torch.tensor([random_prompts(1, lengths=(12,), seed=4)[0]])
    common = dict(do_sample=False, pad_token_id=0)
    mara = dict(custom_generate=mara_generate, mara_agent=agent)
    plain = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, **common)
    first = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, **common, **mara)
    cache = getattr(first, hf.OUTPUT_CACHE_FIELD)
    assert cache.get_seq_length() == getattr(plain, hf.OUTPUT_CACHE_FIELD).get_seq_length() == ids.shape[1] + 5
    if agent_kind == "accept-all":  # the same tokens as plain greedy: the same cache, entry for entry
        assert _same_entries(_layer_entries(cache), _layer_entries(getattr(plain, hf.OUTPUT_CACHE_FIELD)))
    continued = model.generate(first.sequences, max_new_tokens=6, **{hf.cache_keyword(model): cache}, **common, **mara)
    assert torch.equal(continued, model.generate(ids, max_new_tokens=12, **common, **mara))


def test_the_returned_static_cache_is_filled_as_generates():
    from mara_hf import hf_internals as hf

    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, lengths=(12,), seed=4)[0]])
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  cache_implementation="static")
    plain = model.generate(ids, **common)
    fused = model.generate(ids, **common, custom_generate=mara_generate, mara_agent=decisive_agent(reject_bias=3.0))
    assert int(getattr(fused, hf.OUTPUT_CACHE_FIELD).get_seq_length()) == ids.shape[1] + 5
    assert int(getattr(plain, hf.OUTPUT_CACHE_FIELD).get_seq_length()) == ids.shape[1] + 5


class FailsOnCall(MaraAgent):
    """Accepts everything, and raises at its `fail_at`-th call (as a CUDA out-of-memory error might)."""

    def __init__(self, fail_at: int):
        super().__init__(state_dim=32)
        self.fail_at, self.calls = fail_at, 0
        with torch.no_grad():
            self.output_linear.weight.zero_()
            self.output_linear.bias.copy_(torch.tensor([-10.0, 10.0]))

    def accept_probability(self, states):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("agent failed")
        return super().accept_probability(states)


class FailsOnCallProcessor:
    def __init__(self, fail_at: int):
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("processor failed")
        return scores


@pytest.mark.parametrize("path", ["processor", "fused"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failed_step_leaves_the_callers_cache_as_plain_generate_leaves_it(path, fail_at):
    """The agent fails while a step's four candidates are in the cache (mistral: sliding layers past their window,
    recording every entry while siblings are in). The caller's cache holds what plain `generate` failing at that step
    leaves: the prompt and the tokens of the steps before, no sibling, the sliding layers' window bookkeeping back."""
    from transformers import DynamicCache

    from mara_hf import hf_internals as hf

    model = tiny_model("mistral")
    ids = torch.tensor([random_prompts(1, lengths=(12,), seed=2)[0]])  # no EOS in its first five tokens

    def run(**kwargs):
        cache = DynamicCache(config=model.config)
        with pytest.raises(RuntimeError, match="failed"):
            model.generate(ids, **COMMON, **{hf.cache_keyword(model): cache}, **kwargs)
        return cache

    plain = run(logits_processor=[FailsOnCallProcessor(fail_at)])
    agent = FailsOnCall(fail_at)  # one call per step: every row accepts the first of its four candidates
    if path == "processor":
        cache = run(logits_processor=[MaraLogitsProcessor(agent, model, schedule=(4,))])
    else:
        cache = run(custom_generate=mara_generate, mara_agent=agent, mara_schedule=(4,))
    assert cache.get_seq_length() == plain.get_seq_length() == ids.shape[1] + fail_at - 1
    # (The fused loop kept the taken tokens' keys/values from their four-sibling forwards: equal up to rounding.)
    assert _same_entries(_layer_entries(cache), _layer_entries(plain), close=path == "fused")
    assert not any(getattr(layer, "record_past", False) for layer in cache.layers)
    assert_model_untouched(model)
