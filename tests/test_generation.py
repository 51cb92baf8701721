"""The fused loop (custom_generate / mixin) decides exactly as the drop-in processor and the naive reference."""

import pytest
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    SynthIDTextWatermarkingConfig,
    WatermarkingConfig,
    pipeline,
)
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
from mara_hf import MaraGenerationMixin, MaraLogitsProcessor, MaraStats, add_mara_generation, mara_generate
from mara_hf.states import _PLAIN_HEAD, known_plain_head
from reference import naive_mara_greedy
from test_reject_cost import word_tokenizer


def both_paths(model, agent, ids, mask=None, n=10, **mara):
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    processor = MaraLogitsProcessor(agent, model, **{k[5:]: v for k, v in mara.items()})
    dropin = model.generate(**common, logits_processor=[processor])
    fused = model.generate(**common, custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True,
                           **mara)
    return dropin, fused, processor


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["first", "last"])
def test_fused_greedy_equals_processor_on_padded_batches(arch, fallback):
    model = tiny_model(arch)
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    dropin, fused, processor = both_paths(model, agent, ids, mask, n=12, mara_fallback=fallback)
    assert torch.equal(fused.sequences, dropin)
    a, b = fused.mara_stats.to_dict(), processor.stats.to_dict()
    for key in ("tokens", "agent_decided", "fallbacks", "accepted_index_histogram"):
        assert a[key] == b[key], key



@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: full and sliding layers
def test_steps_that_need_later_chunks_project_through_lm_head_once(arch):
    """Greedy steps project each row's taken sibling through lm_head once, at the commit, instead of once per chunk
    (`defer_head`): the same tokens and statistics as projecting in every chunk, one projection per step."""
    model = tiny_model(arch)
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  custom_generate=mara_generate, mara_agent=agent, mara_schedule=(1, 2, 8), return_dict_in_generate=True)
    projections = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: projections.append(output.shape[1]))
    try:
        deferred = model.generate(**common)
        assert known_plain_head(model) is True
        deferred_projections = [n for n in projections[2:] if n]  # after the prompt forward and the check
        projections.clear()
        _PLAIN_HEAD[model] = False  # as for a model whose forward post-processes lm_head's output
        picked = model.generate(**common)
        picked_projections = [n for n in projections[1:] if n]
    finally:
        handle.remove()
        _PLAIN_HEAD.pop(model, None)
    assert torch.equal(deferred.sequences, picked.sequences)
    assert deferred.mara_stats.to_dict() == picked.mara_stats.to_dict()
    steps, forwards = deferred.mara_steps["forwards"].numel(), int(deferred.mara_steps["forwards"].sum())
    assert forwards > steps + 3  # the agent made later chunks run
    assert len(deferred_projections) == steps and len(picked_projections) == forwards


@pytest.mark.parametrize("schedule", [(1,), (1, 2), (1, 4, 16), (1, 40)])
@pytest.mark.parametrize("fallback", ["first", "last"])
def test_chunk_schedule_changes_cost_not_decisions(schedule, fallback):
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    expected, records = naive_mara_greedy(model, agent, prompt, 10, fallback=fallback, eos_token_id=2)
    assert any(r["fallback"] for r in records) and any(r["index"] > 0 and not r["fallback"] for r in records)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                         custom_generate=mara_generate, mara_agent=agent, mara_schedule=schedule,
                         mara_fallback=fallback)
    got = out[0, len(prompt):].tolist()
    assert got[: len(expected)] == expected


def test_accept_threshold_moves_the_decision_boundary_on_every_path():
    """An agent with accept probabilities of 0.1-0.5 (like an actor trained to keep entropy) falls back on every
    decision at the greedy 0.5; at a threshold of 0.45 it accepts a candidate on some. The fused loop (dynamic and
    static cache) and the processor decide as the naive serial walk does with that threshold, whether it comes
    from the call or from the agent's config."""
    model = tiny_model("llama")
    agent = decisive_agent(sharpness=5.0, reject_bias=2.0)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    greedy, records = naive_mara_greedy(model, agent, prompt, 10)
    assert all(r["fallback"] for r in records if r["asked"])
    expected, records = naive_mara_greedy(model, agent, prompt, 10, threshold=0.45)
    assert any(r["fallback"] for r in records) and any(not r["fallback"] and r["index"] > 0 for r in records)
    assert expected != greedy
    ids = torch.tensor([prompt])
    dropin, fused, processor = both_paths(model, agent, ids, n=10, mara_accept_threshold=0.45)
    assert dropin[0, len(prompt):].tolist() == expected == fused.sequences[0, len(prompt):].tolist()
    static = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static",
                            custom_generate=mara_generate, mara_agent=agent, mara_accept_threshold=0.45)
    assert static[0, len(prompt):].tolist() == expected
    calibrated = decisive_agent(sharpness=5.0, reject_bias=2.0)
    calibrated.accept_threshold = 0.45
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=mara_generate,
                         mara_agent=calibrated)
    assert out[0, len(prompt):].tolist() == expected
    with pytest.raises(ValueError, match=r"`mara_accept_threshold` has to be a float in \(0, 1\)"):
        model.generate(ids, max_new_tokens=2, custom_generate=mara_generate, mara_agent=agent,
                       mara_accept_threshold=0.0)


def test_min_p_cuts_the_candidates_on_every_path():
    """With `min_p` the candidates less probable than min_p x the top-1 are gone: the decisions that took one of
    them take the fallback instead, and fewer positions ask the agent. The fused loop (dynamic and static cache) and
    the processor decide as the naive serial walk with that candidate set, whether min_p comes from the call or from
    the agent's config; a bad value is refused with the rule."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # sharper next-token distributions than a random model's (the agent's
        # LayerNorm sees the same states up to scale)
    agent = decisive_agent(reject_bias=9.0)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    paper, paper_records = naive_mara_greedy(model, agent, prompt, 10)
    expected, records = naive_mara_greedy(model, agent, prompt, 10, min_p=0.3)
    assert expected != paper
    assert all(len(r["candidates"]) <= len(p["candidates"]) for r, p in zip(records, paper_records))
    assert any(r["fallback"] for r in records) and any(r["index"] > 0 and not r["fallback"] for r in records)
    ids = torch.tensor([prompt])
    dropin, fused, processor = both_paths(model, agent, ids, n=10, mara_min_p=0.3)
    assert dropin[0, len(prompt):].tolist() == expected == fused.sequences[0, len(prompt):].tolist()
    a, b = fused.mara_stats.to_dict(), processor.stats.to_dict()
    for key in ("tokens", "agent_decided", "fallbacks", "accepted_index_histogram"):
        assert a[key] == b[key], key
    static = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static",
                            custom_generate=mara_generate, mara_agent=agent, mara_min_p=0.3)
    assert static[0, len(prompt):].tolist() == expected
    cut = decisive_agent(reject_bias=9.0)
    cut.min_p = 0.3
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=mara_generate,
                         mara_agent=cut)
    assert out[0, len(prompt):].tolist() == expected
    with pytest.raises(ValueError, match=r"`mara_min_p` has to be a float in \[0, 1\) \(0: the paper's candidates"):
        model.generate(ids, max_new_tokens=2, custom_generate=mara_generate, mara_agent=agent, mara_min_p=1.0)
    with pytest.raises(ValueError, match=r"`min_p` has to be a float in \[0, 1\)"):
        MaraLogitsProcessor(agent, model, min_p=-0.1)


def test_accept_all_agent_is_plain_greedy_with_one_forward_per_token():
    model = tiny_model("qwen2")
    ids, mask = left_padded(random_prompts(2, seed=3))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                         custom_generate=mara_generate, mara_agent=constant_agent(accept=True),
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.mara_steps["forwards"].tolist() == [1] * out.mara_steps["index"].shape[1]
    assert (out.mara_steps["index"] == 0).all()


def test_sampling_equals_processor_for_the_same_seed():
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=5.0)
    ids, mask = left_padded(random_prompts(2, seed=4))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8,
                  top_p=0.9, num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(123)
    dropin = model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model)])
    torch.manual_seed(123)
    fused = model.generate(**common, custom_generate=mara_generate, mara_agent=agent)
    assert fused.shape[0] == 4 and torch.equal(fused, dropin)


@pytest.mark.parametrize("after", ["kirchenbauer watermark", "synthid watermark", "renormalize_logits"])
def test_what_generate_appends_after_the_warpers_runs_after_mara_on_both_paths(after):
    """`generate` puts a watermark and `LogitNormalization` after its sampling warpers; the fused loop applies them
    where they act on the processor path: after MARA's cut, with the warpers."""
    settings = {
        "kirchenbauer watermark": dict(watermarking_config=WatermarkingConfig(bias=4.0, seeding_scheme="lefthash")),
        "synthid watermark": dict(watermarking_config=SynthIDTextWatermarkingConfig(keys=[3, 5, 7, 9], ngram_len=2)),
        "renormalize_logits": dict(renormalize_logits=True),
    }[after]
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=3.0)
    ids, mask = left_padded(random_prompts(3, lengths=(5, 9, 3), seed=3))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.4,
                  top_k=0, pad_token_id=0, return_dict_in_generate=True, output_scores=True, **settings)
    torch.manual_seed(7)
    dropin = model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model, top_k=96)])
    torch.manual_seed(7)
    fused = model.generate(**common, custom_generate=mara_generate, mara_agent=agent, mara_top_k=96)
    assert torch.equal(fused.sequences, dropin.sequences)
    for a, b in zip(fused.scores, dropin.scores, strict=True):
        torch.testing.assert_close(a, b)
    if after == "renormalize_logits":  # greedy's returned scores are normalized the same way on both paths
        greedy = dict(common, do_sample=False, temperature=None, top_k=None)
        dropin = model.generate(**greedy, logits_processor=[MaraLogitsProcessor(agent, model)])
        fused = model.generate(**greedy, custom_generate=mara_generate, mara_agent=agent)
        assert torch.equal(fused.sequences, dropin.sequences)
        for a, b in zip(fused.scores, dropin.scores, strict=True):
            torch.testing.assert_close(a, b)


class BanTokensWarper:
    """A caller's own processor whose name only looks like one of generate's sampling warpers."""

    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.arange(3, 60), -float("inf"))


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_every_processor_the_caller_passes_runs_before_mara_on_both_paths(mode):
    """The caller's `logits_processor` items run before MARA decides, whatever their class is called: generate's own
    warpers (which it appends after them) are told apart by identity, not by a name ending in "Warper"."""
    from transformers.generation.logits_process import MinPLogitsWarper

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=3.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=1))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                  **(dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.7)))
    for user in (BanTokensWarper(), MinPLogitsWarper(0.5)):
        torch.manual_seed(3)
        dropin = model.generate(**common, logits_processor=[user, MaraLogitsProcessor(agent, model)])
        torch.manual_seed(3)
        fused = model.generate(**common, logits_processor=[user], custom_generate=mara_generate, mara_agent=agent)
        assert torch.equal(fused, dropin), type(user).__name__
        if isinstance(user, BanTokensWarper):
            assert not ((fused[:, -8:] >= 3) & (fused[:, -8:] < 60)).any()


def test_a_watermark_on_greedy_mara_is_refused_on_both_paths():
    """Greedy MARA takes the token itself, before `generate` would add a watermark's bias: the watermark could
    change nothing, so both paths refuse it and name the fix."""
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    common = dict(max_new_tokens=2, do_sample=False, pad_token_id=0,
                  watermarking_config=WatermarkingConfig(bias=2.5, seeding_scheme="lefthash"))
    message = "cannot watermark greedy MARA decoding"
    with pytest.raises(ValueError, match=message):
        model.generate(ids, **common, custom_generate=mara_generate, mara_agent=constant_agent())
    with pytest.raises(ValueError, match=message):
        model.generate(ids, **common, logits_processor=[MaraLogitsProcessor(constant_agent(), model)])
    assert_model_untouched(model)


def test_a_finished_row_costs_no_later_chunk():
    """After a row has finished (`generate` pads its tokens), its candidates are not asked: a step costs what the
    unfinished rows need, as if the finished row were not in the batch. The tokens stay the same."""

    class FinishRowZero(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] >= 9  # row 0 stops after its 3rd new token
            return done

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=4.0)
    ids = torch.tensor(random_prompts(2, lengths=(6, 6), seed=8))
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, mara_schedule=(1, 4, 40))
    pair = model.generate(ids, **common, stopping_criteria=StoppingCriteriaList([FinishRowZero()]),
                          custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True)
    alone = model.generate(ids[1:], **common, custom_generate=mara_generate, mara_agent=agent,
                           return_dict_in_generate=True)
    assert torch.equal(pair.sequences[1], alone.sequences[0]) and (pair.sequences[0, 9:] == 0).all()
    assert pair.mara_steps["forwards"][3:].tolist() == alone.mara_steps["forwards"][3:].tolist()
    processors = [MaraLogitsProcessor(agent, model, schedule=(1, 4, 40)) for _ in range(2)]
    dropin = model.generate(ids, **{k: v for k, v in common.items() if k != "mara_schedule"},
                            stopping_criteria=StoppingCriteriaList([FinishRowZero()]), logits_processor=processors[:1])
    model.generate(ids[1:], **{k: v for k, v in common.items() if k != "mara_schedule"},
                   logits_processor=processors[1:])
    assert torch.equal(dropin, pair.sequences)
    assert processors[0].stats.forwards - pair.mara_steps["forwards"][:3].sum() == \
        processors[1].stats.forwards - alone.mara_steps["forwards"][:3].sum()


def test_decode_steps_run_in_generates_decode_context(monkeypatch):
    """`generate` runs its decode steps inside `_optimize_model_for_decode` (off the CPU, mixture-of-experts layers
    switch kernels there); the fused loop's steps run inside it too, and its prompt forward outside, as generate's."""
    import contextlib

    model = tiny_model("llama")
    inside, calls = [False], []

    @contextlib.contextmanager
    def optimize_for_decode():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(model, "_optimize_model_for_decode", optimize_for_decode, raising=False)
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(inside[0]))
    ids = torch.tensor(random_prompts(1, lengths=(6,), seed=2))
    common = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    model.generate(ids, **common)
    plain, calls[:] = list(calls), []
    model.generate(ids, **common, custom_generate=mara_generate, mara_agent=decisive_agent(reject_bias=4.0))
    hook.remove()
    assert plain == [False] + [True] * 4
    assert calls[0] is False and len(calls) > 5 and all(calls[1:])


def test_return_dict_carries_per_step_statistics_and_scores():
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids = torch.tensor([random_prompts(1, seed=5, lengths=(10,))[0]])
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                         custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    steps = out.mara_steps
    assert steps["index"].shape == (1, 6) and steps["forwards"].shape == (6,)
    assert len(out.scores) == 6 and len(out.logits) == 6
    for step, scores in enumerate(out.scores):
        assert scores[0].argmax().item() == out.sequences[0, ids.shape[1] + step].item()
    assert out.mara_stats.tokens == 6
    assert out.mara_stats.forwards == int(steps["forwards"].sum())


def test_eos_stopping_criteria_streamer_and_external_stats():
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids = torch.tensor([random_prompts(1, seed=6)[0]])
    stop = StopAfter()
    stop.length = ids.shape[1] + 4
    streamer, stats = Collect(), MaraStats(top_k=40)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, custom_generate=mara_generate,
                         mara_agent=agent, stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer,
                         mara_stats=stats)
    assert out.shape[1] == ids.shape[1] + 4
    assert streamer.ended and [c[0] for c in streamer.chunks[1:]] == out[0, ids.shape[1]:].tolist()
    assert stats.tokens == 4

    # A row that emits EOS stops and is padded while the others go on.
    prompts = random_prompts(2, seed=8)
    ids, mask = left_padded(prompts)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    eos = plain[0, -1].item()  # make row 0's first greedy token the EOS
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         eos_token_id=eos, custom_generate=mara_generate, mara_agent=constant_agent(accept=True))
    assert out[0, ids.shape[1]].item() == eos and (out[0, ids.shape[1] + 1:] == 0).all()


def test_mixin_and_add_mara_generation():
    model = tiny_model("mistral")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(2, lengths=(12, 5), seed=9))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(**common)
    fused = model.generate(**common, custom_generate=mara_generate, mara_agent=agent)
    cls = type(model)
    assert add_mara_generation(model) is model
    assert isinstance(model, MaraGenerationMixin) and isinstance(model, cls) and type(model).__name__ == cls.__name__
    assert torch.equal(model.generate(**common, mara_agent=agent), fused)
    assert torch.equal(model.generate(**common), plain)  # without an agent: the model's own generate
    # The README's fused form, said again on a model that has the mixin: the same call
    assert torch.equal(model.generate(**common, custom_generate=mara_generate, mara_agent=agent), fused)
    with pytest.raises(ValueError, match="either `mara_agent` or `custom_generate`"):
        model.generate(**common, custom_generate=lambda *a, **k: None, mara_agent=agent)
    add_mara_generation(model)  # idempotent
    assert type(model).__mro__.count(MaraGenerationMixin) == 1

    class MaraMistral(MaraGenerationMixin, cls):
        pass

    subclassed = MaraMistral(model.config).eval()
    subclassed.load_state_dict(model.state_dict())
    assert torch.equal(subclassed.generate(**common, mara_agent=agent), fused)


def test_peft_model_through_mixin():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    agent = decisive_agent(reject_bias=9.0)
    ids = torch.tensor([random_prompts(1, seed=6)[0]])
    common = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    dropin = peft_model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, peft_model)])
    add_mara_generation(peft_model)
    assert torch.equal(peft_model.generate(**common, mara_agent=agent), dropin)
    assert_model_untouched(peft_model)


def test_an_offloaded_cache_is_refused():
    if torch.backends.cuda.is_built() and not torch.cuda.is_available():  # a CUDA build, no GPU
        pytest.skip("this torch cannot make the stream that transformers' offloaded cache needs without a GPU")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cannot put candidate siblings into a DynamicCache with offloading"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, cache_implementation="offloaded",
                       custom_generate=mara_generate, mara_agent=constant_agent(), pad_token_id=0)
    assert_model_untouched(model)


def test_fused_refusals():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="needs an agent"):
        model.generate(ids, max_new_tokens=2, custom_generate=mara_generate, pad_token_id=0)
    for output in ("output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match="does not return attentions or hidden states"):
            model.generate(ids, max_new_tokens=2, custom_generate=mara_generate, mara_agent=constant_agent(),
                           pad_token_id=0, return_dict_in_generate=True, **{output: True})
    with pytest.raises(ValueError, match="does not do beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, custom_generate=mara_generate,
                       mara_agent=constant_agent(), pad_token_id=0)
    with pytest.raises(ValueError, match="cannot put candidate siblings into a StaticCache .*StaticSlidingWindowLayer"):
        tiny_model("mistral").generate(ids, max_new_tokens=2, cache_implementation="static",
                                       custom_generate=mara_generate, mara_agent=constant_agent(), pad_token_id=0)
    from mara_hf import MaraAgent

    with pytest.raises(ValueError, match="hidden size 32"):
        model.generate(ids, max_new_tokens=2, custom_generate=mara_generate, mara_agent=MaraAgent(state_dim=8),
                       pad_token_id=0)
    assert_model_untouched(model)


def test_settings_that_do_not_fit_the_call_are_refused_before_decoding_naming_the_argument():
    """A `mara_stats` or `AutoSchedule` made for fewer candidates than the call has would break mid-decode or clamp
    its histograms silently; bad fused-loop settings are named as the caller wrote them (`mara_...`)."""
    from mara_hf import AutoSchedule

    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    agent = decisive_agent(reject_bias=3.0)  # top_k 40 from its config
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, custom_generate=mara_generate, mara_agent=agent)
    stats = MaraStats(10)
    with pytest.raises(ValueError, match=r"`mara_stats` counts decisions among at most 10 candidates, but this call "
                                         r"has up to 40 \(its top_k\): create it as `MaraStats\(40\)`"):
        model.generate(ids, **common, mara_stats=stats)
    assert stats.tokens == 0
    with pytest.raises(TypeError, match="`mara_stats` has to be a `MaraStats` to accumulate into, but is a int"):
        model.generate(ids, **common, mara_stats=5)
    model.generate(ids, **common, mara_stats=stats, mara_top_k=10)  # as many candidates as it counts: fine
    assert stats.tokens == 4
    auto = AutoSchedule(25.0, batch_size=1, width=40)
    message = r"is an AutoSchedule for 40 candidates per row, but this call has 10 \(its top_k\): build it with " \
              r"`width=10`, or pass \"auto\""
    with pytest.raises(ValueError, match="`mara_schedule` " + message):
        model.generate(ids, **common, mara_top_k=10, mara_schedule=auto)
    with pytest.raises(ValueError, match="`schedule` " + message):
        MaraLogitsProcessor(agent, model, top_k=10, schedule=auto)
    for setting, value in (("top_k", 0), ("top_p", 1.5), ("min_p", 1.0), ("fallback", "middle"),
                           ("accept_threshold", 1.0)):
        with pytest.raises(ValueError, match=f"`mara_{setting}` has to be"):
            model.generate(ids, **common, **{f"mara_{setting}": value})
        with pytest.raises(ValueError, match=f"^`{setting}` has to be"):
            MaraLogitsProcessor(agent, model, **{setting: value})
    with pytest.raises(ValueError, match="`mara_schedule` is \"auto\" or increasing chunk boundaries"):
        model.generate(ids, **common, mara_schedule=(8, 1))
    with pytest.raises(ValueError, match="`mara_schedule` is \"auto\" or a tuple"):
        model.generate(ids, **common, mara_schedule="lazy")
    assert_model_untouched(model)


def test_hub_custom_generate_layout_from_a_local_directory(tmp_path):
    from huggingface_hub import ModelCard

    from mara_hf import export_custom_generate

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    agent.save_pretrained(tmp_path / "agent")
    generate_py = export_custom_generate(tmp_path / "agent")
    assert generate_py.read_text().count("def generate(model") == 1
    assert (tmp_path / "agent" / "custom_generate" / "requirements.txt").read_text().strip() == "mara-hf"
    card = ModelCard.load(tmp_path / "agent" / "README.md")
    assert "custom_generate" in card.data.tags and "trust_remote_code=True" in card.text

    ids = torch.tensor([random_prompts(1, seed=5)[0]])
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **common, custom_generate=mara_generate, mara_agent=agent)
    got = model.generate(ids, **common, custom_generate=str(tmp_path / "agent"), trust_remote_code=True)
    assert torch.equal(got, expected)
    with pytest.raises(FileNotFoundError, match="not a native MARA agent folder"):
        export_custom_generate(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_prompt_given_as_inputs_embeds_decodes_as_its_ids(arch):
    """`input_ids` then holds none of the prompt, which only the cache does: positions, the static cache's scratch
    slots and the processor's checks must come from the cache (they came from `input_ids` and went wrong)."""
    model = tiny_model(arch)
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(5, 11, 8), seed=3))
    embeds = model.get_input_embeddings()(ids).detach()
    common = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, **common, custom_generate=mara_generate, mara_agent=agent)
    expected = expected[:, ids.shape[1]:]
    paths = {
        "processor": dict(logits_processor=[MaraLogitsProcessor(agent, model)]),
        "fused": dict(custom_generate=mara_generate, mara_agent=agent),
    }
    if arch == "llama":  # full attention: a static cache too
        paths["fused, static cache"] = dict(custom_generate=mara_generate, mara_agent=agent,
                                            cache_implementation="static")
    for path, extra in paths.items():
        assert torch.equal(model.generate(inputs_embeds=embeds, **common, **extra), expected), path


def test_a_torch_compiled_model_is_used_through_its_original():
    """`torch.compile(model)` wraps the model in an `OptimizedModule` whose `generate` is the original's."""
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(2, seed=4))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(**common, custom_generate=mara_generate, mara_agent=agent)
    wrapped = torch.compile(model)
    assert torch.equal(wrapped.generate(**common, logits_processor=[MaraLogitsProcessor(agent, wrapped)]), expected)
    assert torch.equal(wrapped.generate(**common, custom_generate=mara_generate, mara_agent=agent), expected)
    add_mara_generation(wrapped)
    assert isinstance(model, MaraGenerationMixin)
    assert torch.equal(wrapped.generate(**common, mara_agent=agent), expected)


def one_character_tokenizer():
    """A tokenizer of one character per token id (the tiny models' 96 ids), for stop strings."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = list(string.ascii_letters + string.digits + string.punctuation) + ["§", "¶"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(characters)}, unk_token=characters[0]))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=characters[0], eos_token=characters[2])


def test_stop_strings_stop_the_mixin_and_hub_paths(tmp_path):
    """A callable `custom_generate` never gets `generate`'s tokenizer, so `stop_strings` failed there ("could not
    locate a tokenizer"); the mixin and the Hub layout turn them into a `StopStringCriteria` first."""
    from mara_hf import export_custom_generate

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    tokenizer = one_character_tokenizer()
    ids = torch.tensor([random_prompts(1, seed=5)[0]])
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    full = model.generate(ids, **common, custom_generate=mara_generate, mara_agent=agent)[0, ids.shape[1]:].tolist()
    stop = full[6]
    expected = full[: full.index(stop) + 1]
    assert len(expected) < len(full)
    stops = dict(stop_strings=[tokenizer.convert_ids_to_tokens(stop)], tokenizer=tokenizer)
    processor = MaraLogitsProcessor(agent, model)
    assert model.generate(ids, **common, **stops, logits_processor=[processor])[0, ids.shape[1]:].tolist() == expected
    agent.save_pretrained(tmp_path / "agent")
    export_custom_generate(tmp_path / "agent")
    hub = model.generate(ids, **common, **stops, custom_generate=str(tmp_path / "agent"), trust_remote_code=True)
    assert hub[0, ids.shape[1]:].tolist() == expected
    add_mara_generation(model)
    assert model.generate(ids, **common, **stops, mara_agent=agent)[0, ids.shape[1]:].tolist() == expected
    # stop strings of a generation config (passed by keyword or positionally; the caller's is left as it was)
    config = GenerationConfig(**common, stop_strings=stops["stop_strings"])
    for call in (lambda: model.generate(ids, generation_config=config, tokenizer=tokenizer, mara_agent=agent),
                 lambda: model.generate(ids, config, tokenizer=tokenizer, mara_agent=agent),
                 lambda: model.generate(ids, config, tokenizer=tokenizer, custom_generate=str(tmp_path / "agent"),
                                        trust_remote_code=True)):
        assert call()[0, ids.shape[1]:].tolist() == expected
    assert config.stop_strings == stops["stop_strings"]


def test_text_generation_pipeline_passes_mara_to_generate():
    """`pipeline("text-generation")` hands MARA's keywords to `generate`: its answers, one chat at a time and
    batched (the pipeline pads on the left), are those of the fused loop and of the processor on the same ids."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = tiny_model("llama")
    agent = decisive_agent(seed=1)
    chats = [[{"role": "user", "content": " ".join(f"t{i}" for i in prompt)}]
             for prompt in random_prompts(2, lengths=(4, 11), seed=5)]
    common = dict(max_new_tokens=8, do_sample=False)

    def answer(chat, **kwargs):
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, **common, **kwargs)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    expected = [answer(chat, custom_generate=mara_generate, mara_agent=agent) for chat in chats]
    assert expected != [answer(chat) for chat in chats]  # the agent changes the answers

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def contents(outputs):
        return [out[0]["generated_text"][-1]["content"] for out in outputs]

    fused = contents(pipe(chats, **common, batch_size=2, custom_generate=mara_generate, mara_agent=agent))
    dropin = contents([pipe(chat, **common, logits_processor=[MaraLogitsProcessor(agent, model)]) for chat in chats])
    assert fused == dropin == expected
    add_mara_generation(model)
    assert contents([pipe(chats[1], **common, mara_agent=agent)]) == expected[1:]
