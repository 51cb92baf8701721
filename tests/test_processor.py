"""MaraLogitsProcessor inside plain `generate`: decisions equal the naive reference in every mode it supports."""

import copy

import pytest
import torch
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from conftest import (
    ARCHS,
    assert_model_untouched,
    constant_agent,
    decisive_agent,
    left_padded,
    random_prompts,
    tiny_model,
)
from mara_hf import MaraAgent, MaraLogitsProcessor
from mara_hf import hf_internals as hf
from reference import naive_candidates, naive_mara_greedy, naive_next_logits, naive_states

REJECTS_OFTEN = dict(reject_bias=9.0)  # accepts some candidates, rejects all of them at some steps


def mara_greedy(model, agent, ids, mask=None, n=12, **kwargs):
    processor = MaraLogitsProcessor(agent, model, **kwargs)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, logits_processor=[processor],
        pad_token_id=0,
    )
    return out[:, ids.shape[1]:], processor


def trim_at_eos(tokens, eos=2):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["first", "last"])
def test_greedy_equals_naive_reference(arch, fallback):
    model = tiny_model(arch)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    # The first reject bias whose agent both accepts later candidates and falls back on this model.
    for bias in (6.0, 9.0, 12.0, 15.0, 20.0, 30.0):
        agent = decisive_agent(reject_bias=bias)
        expected, records = naive_mara_greedy(model, agent, prompt, 14, fallback=fallback, eos_token_id=2)
        if any(r["fallback"] for r in records) and any(r["index"] > 0 and not r["fallback"] for r in records):
            break
    else:
        pytest.fail("no agent exercises both accepting later candidates and falling back")
    got, processor = mara_greedy(model, agent, torch.tensor([prompt]), n=14, fallback=fallback)
    assert trim_at_eos(got[0].tolist()) == expected
    stats = processor.stats
    assert stats.tokens == len(expected)
    assert stats.agent_decided == sum(r["asked"] for r in records)
    assert stats.fallbacks == sum(r["fallback"] for r in records)
    histogram = [0] * 40
    for r in records:
        if r["asked"] and not r["fallback"]:
            histogram[r["index"]] += 1
    assert stats.accepted_index_histogram == histogram


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_left_padded_batch_rows_equal_batch_of_one(arch):
    model = tiny_model(arch)
    agent = decisive_agent(**REJECTS_OFTEN)
    prompts = random_prompts(3, lengths=(4, 11, 7), seed=7)
    ids, mask = left_padded(prompts)
    batch, _ = mara_greedy(model, agent, ids, mask, n=10)
    for row, prompt in enumerate(prompts):
        alone, _ = mara_greedy(model, agent, torch.tensor([prompt]), n=10)
        alone = alone[0].tolist()
        assert batch[row, : len(alone)].tolist() == alone
        assert (batch[row, len(alone):] == 0).all()  # finished rows are padded


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_accept_all_agent_gives_plain_greedy(arch):
    model = tiny_model(arch)
    ids, mask = left_padded(random_prompts(2, seed=9))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got, processor = mara_greedy(model, constant_agent(accept=True), ids, mask, n=10)
    assert torch.equal(got, plain[:, ids.shape[1]:])
    assert processor.stats.fallbacks == 0
    assert processor.stats.forwards == 10  # only the top-1 forward per step: nothing else is evaluated


def test_lone_candidate_is_taken_without_asking():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=2)[0]])
    plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, processor = mara_greedy(model, constant_agent(accept=False), ids, n=6, top_p=1e-6)
    assert torch.equal(got, plain[:, ids.shape[1]:])
    assert processor.stats.agent_decided == 0 and processor.stats.forwards == 0


def test_reject_all_agent_follows_fallback():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=4)[0]])
    plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, processor = mara_greedy(model, constant_agent(accept=False), ids, n=6, fallback="first")
    assert torch.equal(got, plain[:, ids.shape[1]:])
    assert processor.stats.fallbacks == 6
    last, _ = mara_greedy(model, constant_agent(accept=False), ids, n=1, fallback="last")
    candidates = naive_candidates(naive_next_logits(model, ids[0].tolist()), 40, 0.95)
    assert last[0, 0].item() == candidates[-1]


def test_sampling_takes_only_accepted_candidates():
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=5.0)
    prompt = random_prompts(1, seed=11)[0]
    torch.manual_seed(0)
    processor = MaraLogitsProcessor(agent, model)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=True, temperature=0.7, top_k=0,
        logits_processor=[processor], pad_token_id=0,
    )
    tokens = out[0].tolist()
    for step in range(len(prompt), len(tokens)):
        context, token = tokens[:step], tokens[step]
        candidates = naive_candidates(naive_next_logits(model, context), 40, 0.95)
        assert token in candidates
        if len(candidates) > 1:
            with torch.no_grad():
                accepted = agent(naive_states(model, context, candidates))[:, 1] > 0.5
            allowed = [c for c, a in zip(candidates, accepted) if a] or [candidates[0]]
            assert token in allowed


class CandidatesOnly(LogitsProcessor):
    """Reference: keep exactly the naive MARA candidate set of each row."""

    def __call__(self, input_ids, scores):
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for row in range(scores.shape[0]):
            keep[row, naive_candidates(scores[row], 40, 0.95)] = True
        return scores.masked_fill(~keep, -float("inf"))


def test_beam_search_with_accept_all_agent_searches_the_candidate_sets():
    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(2, seed=13))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                  do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs, logits_processor=[CandidatesOnly()])
    got = model.generate(**kwargs, logits_processor=[MaraLogitsProcessor(constant_agent(accept=True), model)])
    assert torch.equal(got, expected)


def test_num_return_sequences_and_streamer():
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny_model("qwen3")
    agent = decisive_agent(**REJECTS_OFTEN)
    ids = torch.tensor([random_prompts(1, seed=3)[0]])
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, logits_processor=[MaraLogitsProcessor(agent, model)],
                         streamer=streamer, pad_token_id=0)
    assert streamer.ended and [c[0] for c in streamer.chunks[1:]] == out[0, ids.shape[1]:].tolist()
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=5, do_sample=True, num_return_sequences=3,
                         logits_processor=[MaraLogitsProcessor(agent, model)], pad_token_id=0)
    assert out.shape[0] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids, mask = left_padded(random_prompts(2, seed=1))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, _ = mara_greedy(model, constant_agent(accept=True), ids, mask, n=6)
    assert torch.equal(got, plain[:, ids.shape[1]:])
    got, processor = mara_greedy(model, decisive_agent(**REJECTS_OFTEN), ids, mask, n=6)
    assert processor.stats.tokens > 0 and processor.agent.ln.weight.dtype == torch.float32


def test_peft_wrapped_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    agent = decisive_agent(**REJECTS_OFTEN)
    prompt = random_prompts(1, seed=6)[0]
    expected, _ = naive_mara_greedy(peft_model.get_base_model(), agent, prompt, 8, eos_token_id=2)
    processor = MaraLogitsProcessor(agent, peft_model)
    out = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              logits_processor=[processor], pad_token_id=0)
    assert trim_at_eos(out[0, len(prompt):].tolist()) == expected
    assert_model_untouched(peft_model)


def test_one_instance_serves_many_calls_and_leaves_nothing_attached():
    model = tiny_model("llama")
    processor = MaraLogitsProcessor(decisive_agent(**REJECTS_OFTEN), model)
    ids = torch.tensor([random_prompts(1, seed=8)[0]])
    first = model.generate(ids, max_new_tokens=7, do_sample=False, logits_processor=[processor], pad_token_id=0)
    stats = processor.stats.to_dict()
    second = model.generate(ids, max_new_tokens=7, do_sample=False, logits_processor=[processor], pad_token_id=0)
    again = processor.stats.to_dict()
    # Stats describe the latest call; only the cost may differ (the "auto" schedule learned the agent in call 1).
    assert torch.equal(first, second) and again["tokens"] == stats["tokens"] == 7
    assert {k: v for k, v in again.items() if "forwards" not in k} == {k: v for k, v in stats.items() if "forwards" not in k}
    assert_model_untouched(model)



def test_a_call_that_continues_on_the_last_calls_cache_is_a_new_call():
    """A second `generate` call on the cache the first returned (a chat's next turn) gets fresh statistics and its
    own checks, as a fresh processor does; its tokens are the same either way."""
    model = tiny_model("llama")
    agent = decisive_agent(**REJECTS_OFTEN)
    processor = MaraLogitsProcessor(agent, model)
    ids = torch.tensor([random_prompts(1, seed=8)[0]])
    common = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    first = model.generate(ids, **common, logits_processor=[processor])
    turn = torch.cat([first.sequences, torch.tensor([[5, 6]])], dim=1)
    cache = getattr(first, hf.OUTPUT_CACHE_FIELD)
    snapshot = copy.deepcopy(cache)
    second = model.generate(turn, **common, **{hf.cache_keyword(model): cache}, logits_processor=[processor])
    fresh = MaraLogitsProcessor(agent, model)
    alone = model.generate(turn, **common, **{hf.cache_keyword(model): snapshot}, logits_processor=[fresh])
    assert torch.equal(second.sequences, alone.sequences)
    assert processor.stats.tokens == 5
    assert {k: v for k, v in processor.stats.to_dict().items() if "forwards" not in k} == \
        {k: v for k, v in fresh.stats.to_dict().items() if "forwards" not in k}


@pytest.mark.parametrize("return_cache", [False, True])
def test_a_deferred_stop_check_changes_nothing(monkeypatch, return_cache):
    """transformers (5.17+) may check for the end of generation one step late, so the host never waits on the
    device (`DeferredStopCheck`, on "mps" only for now): when every row has finished, `generate` runs one more
    step, processor included, and undoes it. That step must leave no trace: the same tokens, statistics and
    returned cache as the usual check. Forced here on the CPU, with an event stand-in (the CPU has no events)."""
    from transformers.generation import utils

    if not hasattr(utils, "DeferredStopCheck"):
        pytest.skip("this transformers has no deferred stop check")
    model = tiny_model("llama")
    agent = decisive_agent(**REJECTS_OFTEN)
    ids, mask = left_padded(random_prompts(3, seed=4))
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=return_cache)
    # Each row's 3rd token (a first run without EOS) as an EOS: every row ends before max_new_tokens.
    probe = mara_greedy(model, agent, ids, mask, n=3)[0]
    common["eos_token_id"] = probe[:, 2].unique().tolist()

    def run():
        processor = MaraLogitsProcessor(agent, model, schedule=(1, 8))
        out = model.generate(ids, **common, logits_processor=[processor])
        return out, processor.stats.to_dict()

    usual, usual_stats = run()

    class Event:  # what DeferredStopCheck asks of a device event; CPU work is done when it is queued
        def __init__(self, *args, **kwargs): pass
        def record(self): pass
        def synchronize(self): pass

    deferred = []
    monkeypatch.setattr(torch, "Event", Event)
    monkeypatch.setattr(utils.DeferredStopCheck, "is_supported", staticmethod(lambda *a, **k: True))
    finish = utils.DeferredStopCheck.finish

    def counted_finish(self):
        deferred.append(finish(self))
        return deferred[-1]

    monkeypatch.setattr(utils.DeferredStopCheck, "finish", counted_finish)
    late, late_stats = run()
    assert deferred == [1]  # the deferred check ran, and one step was undone
    if return_cache:
        assert torch.equal(late.sequences, usual.sequences)
        cache, usual_cache = getattr(late, hf.OUTPUT_CACHE_FIELD), getattr(usual, hf.OUTPUT_CACHE_FIELD)
        assert cache.get_seq_length() == usual_cache.get_seq_length()
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, usual_cache.layers))
    else:
        assert torch.equal(late, usual)
    assert late_stats == usual_stats
    assert_model_untouched(model)


def test_the_callers_agent_keeps_its_training_flag():
    # The agent's layers behave alike in train and eval mode, so neither path switches the caller's module (a
    # training loop that rolls out with its actor would otherwise find it in eval mode).
    from mara_hf import mara_generate

    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=8)[0]])
    agent = decisive_agent(**REJECTS_OFTEN).train()
    mara_greedy(model, agent, ids, n=3)
    assert agent.training
    model.generate(ids, max_new_tokens=3, custom_generate=mara_generate, mara_agent=agent, pad_token_id=0)
    assert agent.training and agent.eval() is agent and not agent.training
    mara_greedy(model, agent, ids, n=3)
    assert not agent.training

# ---------------------------------------------------------------- errors


def test_agent_of_other_hidden_size_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"agent reads states of size 48.*hidden size 32"):
        MaraLogitsProcessor(MaraAgent(state_dim=48), model)
    with pytest.raises(TypeError, match="has to be a `MaraAgent`"):
        MaraLogitsProcessor(torch.nn.Linear(32, 2), model)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=0), "`top_k` has to be a strictly positive integer"),
        (dict(top_p=1.5), r"`top_p` has to be a float in \(0, 1\]"),
        (dict(fallback="random"), "`fallback` has to be one of"),
        (dict(accept_threshold=1.0), r"`accept_threshold` has to be a float in \(0, 1\) \(0.5: the agent's greedy"),
        (dict(schedule=(8, 2)), "`schedule` is \"auto\" or increasing chunk boundaries"),
        (dict(schedule="fast"), "`schedule` is \"auto\" or a tuple of chunk boundaries, but is 'fast'"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaraLogitsProcessor(constant_agent(), tiny_model("llama"), **kwargs)


def baseline(model, ids):
    return model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt_lookup_num_tokens=2), "assisted or speculative decoding"),
        (dict(cache_implementation="static"), "MaraLogitsProcessor cannot use a StaticCache.*fused loop"),
        (dict(use_cache=False), "without one"),
    ],
)
def test_unsupported_generation_is_refused_and_model_untouched(kwargs, message):
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=1)[0]])
    before = baseline(model, ids)
    processor = MaraLogitsProcessor(constant_agent(), model)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=5, do_sample=False, logits_processor=[processor], pad_token_id=0, **kwargs)
    assert_model_untouched(model)
    assert torch.equal(baseline(model, ids), before)


def test_assistant_model_is_refused():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=1)[0]])
    with pytest.raises(ValueError, match="assisted or speculative decoding"):
        model.generate(ids, max_new_tokens=5, do_sample=False, assistant_model=tiny_model("llama", seed=1),
                       logits_processor=[MaraLogitsProcessor(constant_agent(), model)], pad_token_id=0)
    assert_model_untouched(model)


def test_flash_attention_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r'attn_implementation="sdpa"'):
        MaraLogitsProcessor(constant_agent(), model)


def test_called_outside_generate():
    model = tiny_model("llama")
    processor = MaraLogitsProcessor(constant_agent(), model)
    with pytest.raises(RuntimeError, match="must be called by `model.generate"):
        processor(torch.tensor([[1, 2]]), torch.zeros(1, 96))


def test_failure_inside_generate_leaves_model_and_cache_untouched():
    class Exploding(MaraAgent):
        calls = 0

        def accept_probability(self, states):
            Exploding.calls += 1
            if Exploding.calls == 3:
                raise RuntimeError("boom")
            return super().accept_probability(states)

    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=2)[0]])
    before = baseline(model, ids)
    agent = Exploding(state_dim=32)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(ids, max_new_tokens=6, do_sample=False, logits_processor=[MaraLogitsProcessor(agent, model)],
                       pad_token_id=0)
    assert_model_untouched(model)
    assert torch.equal(baseline(model, ids), before)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_static_cache_set_by_the_models_generation_config_is_refused_with_the_way_out(arch):
    """The user set nothing: the refusal names `cache_implementation="dynamic"`, and that call decodes."""
    model = tiny_model(arch)
    model.generation_config.cache_implementation = "static"
    agent = decisive_agent(reject_bias=9.0)
    ids = torch.tensor([random_prompts(1, seed=5)[0]])
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match='cache_implementation="dynamic"'):
        model.generate(ids, **common, logits_processor=[MaraLogitsProcessor(agent, model)])
    got = model.generate(ids, **common, cache_implementation="dynamic",
                         logits_processor=[MaraLogitsProcessor(agent, model)])
    model.generation_config.cache_implementation = None
    assert torch.equal(got, model.generate(ids, **common, logits_processor=[MaraLogitsProcessor(agent, model)]))
    assert_model_untouched(model)
