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
    def accept_probability(self, states):
        return torch.full(states.shape[:-1], float("nan"), device=states.device)


@pytest.mark.parametrize("path", ["processor", "fused"])
def test_nan_accept_probabilities_warn_once_naming_the_agent(path, caplog):
    model = tiny_model("llama")
    agent = NaNAgent(state_dim=32, source="broken_actor.pth")
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
