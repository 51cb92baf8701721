"""The fused loop on a static cache (siblings in scratch slots), eager and compiled: the same decisions and tokens as
on the dynamic cache and as the naive reference."""

import logging

import pytest
import torch
from transformers import StaticCache

from conftest import (assert_model_untouched, constant_agent, decisive_agent, eager_compile_config, left_padded,
                      needs_compiled_generate, random_prompts, scaled_logits_model, tiny_model)
from mara_hf import MaraLogitsProcessor, MaraStats, mara_generate
from mara_hf import hf_internals as hf
from mara_hf.compiled import _COMPILED
from reference import naive_mara_greedy

STATIC_ARCHS = ["llama", "qwen3"]  # full attention only: sliding-window layers are refused on a static cache


def fused(model, agent, ids, mask, n=12, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True, **kwargs)
    return out


@pytest.mark.parametrize("arch", STATIC_ARCHS)
@pytest.mark.parametrize("schedule", ["auto", (1, 8), (40,), (1, 2, 4)])
@pytest.mark.parametrize("fallback", ["first", "last"])
def test_static_equals_dynamic_on_padded_batches(arch, schedule, fallback):
    model = tiny_model(arch)
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    dynamic = fused(model, agent, ids, mask, mara_schedule=schedule, mara_fallback=fallback)
    static = fused(model, agent, ids, mask, mara_schedule=schedule, mara_fallback=fallback,
                   cache_implementation="static")
    assert isinstance(getattr(static, hf.OUTPUT_CACHE_FIELD), StaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    for key in ("index", "fallback", "asked", "num_candidates"):
        assert torch.equal(static.mara_steps[key], dynamic.mara_steps[key]), key
    assert (static.mara_steps["index"] > 0).any() and static.mara_steps["fallback"].any()


@pytest.mark.parametrize("fallback", ["first", "last"])
def test_static_equals_naive_reference(fallback):
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    expected, records = naive_mara_greedy(model, agent, prompt, 10, fallback=fallback, eos_token_id=2)
    assert any(r["fallback"] for r in records) and any(r["index"] > 0 and not r["fallback"] for r in records)
    out = fused(model, agent, torch.tensor([prompt]), None, n=10, mara_fallback=fallback,
                cache_implementation="static")
    assert out.sequences[0, len(prompt):].tolist()[: len(expected)] == expected


def test_accept_all_static_is_plain_greedy_with_one_forward_per_step():
    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(2, seed=3))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    plain_static = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                                  pad_token_id=0, cache_implementation="static")
    out = fused(model, constant_agent(accept=True), ids, mask, n=9, mara_schedule=(1, 8),
                cache_implementation="static")
    assert torch.equal(out.sequences, plain) and torch.equal(plain_static, plain)
    assert out.mara_steps["forwards"].tolist() == [1] * 9


@pytest.mark.parametrize("schedule", [(1, 8), (40,), "auto"])
def test_compiled_static_step_traces_as_one_graph_and_decides_the_same(schedule):
    needs_compiled_generate()
    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    dynamic = fused(model, agent, ids, mask, mara_schedule=schedule)
    compiled = fused(model, agent, ids, mask, mara_schedule=schedule, cache_implementation="static",
                     compile_config=eager_compile_config())
    assert torch.equal(compiled.sequences, dynamic.sequences)
    for key in ("index", "fallback"):
        assert torch.equal(compiled.mara_steps[key], dynamic.mara_steps[key]), key
    assert_model_untouched(model)
    assert not any("compiled" in name.lower() for name in vars(model))  # compiled steps are kept beside the model


def test_static_cache_too_small_is_refused_and_generate_grows_its_own():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=1)[0]])
    small = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, custom_generate=mara_generate,
                  mara_agent=constant_agent())
    with pytest.raises(ValueError, match=r"has \d+ slots, but MARA needs \d+: .*max_cache_len=\d+"):
        model.generate(ids, **{hf.cache_keyword(model): small}, **kwargs)
    # generate's own static cache (cache_implementation="static") is replaced by one with scratch room.
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert hf.static_capacity(getattr(out, hf.OUTPUT_CACHE_FIELD)) >= ids.shape[1] + 5 - 1 + 40


def test_sliding_window_static_cache_and_processor_static_are_refused():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer"):
        tiny_model("mistral").generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0,
                                       custom_generate=mara_generate, mara_agent=constant_agent())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="MaraLogitsProcessor cannot use a StaticCache"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0,
                       logits_processor=[MaraLogitsProcessor(constant_agent(), model)])


def test_static_stats_match_dynamic():
    model = tiny_model("qwen3")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(2, lengths=(6, 11), seed=8))
    a, b = MaraStats(40), MaraStats(40)
    fused(model, agent, ids, mask, mara_stats=a, mara_schedule=(1, 8))
    fused(model, agent, ids, mask, mara_stats=b, mara_schedule=(1, 8), cache_implementation="static")
    for key in ("tokens", "agent_decided", "fallbacks", "accepted_index_histogram", "search_length_histogram"):
        assert a.to_dict()[key] == b.to_dict()[key], key


def test_a_second_call_replays_the_compiled_step_without_compiling_again():
    needs_compiled_generate(replay=True)
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    kwargs = dict(mara_schedule=(1, 8), cache_implementation="static", compile_config=eager_compile_config())
    first = fused(model, agent, ids, mask, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    second = fused(model, agent, ids, mask, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs and torch.equal(first.sequences, second.sequences)


def test_compiled_step_inputs_keep_their_shapes_and_strides_from_step_to_step():
    """With `mode="reduce-overhead"` a CUDA graph is recorded for every distinct input stride the compiled step
    sees: an input whose stride grows with the sequence (a slice of generate's position ids) would record a new
    graph at every step. Dynamo without automatic dynamic shapes shows the same as recompilations: the graphs
    compiled must not depend on how many steps are decoded."""
    needs_compiled_generate()
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    graphs = {}
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        for steps in (3, 12):
            torch._dynamo.reset()
            before = counters["stats"]["unique_graphs"]
            out = fused(model, agent, ids, mask, n=steps, mara_schedule=(1, 8), cache_implementation="static",
                        compile_config=eager_compile_config())
            graphs[steps] = counters["stats"]["unique_graphs"] - before
            assert (out.mara_steps["forwards"] > 1).any()
    torch._dynamo.reset()
    assert graphs[12] == graphs[3], graphs


def test_every_chunk_of_several_siblings_shares_one_compiled_graph():
    """Whatever chunks the schedules ask for (`"auto"` re-plans among four), one batch size compiles three graphs:
    the chunk of one sibling, one for every chunk of several (its width marked dynamic, its first candidate passed
    as a tensor, its slices contiguous), and the commit; later calls compile none, and the tokens equal the
    dynamic cache's. Left to automatic dynamic shapes, each new (start, width) compiled another graph, some of them
    inside a later call: about a minute each on an 8B model."""
    needs_compiled_generate(replay=True)  # counts graphs across calls
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    agent = decisive_agent(reject_bias=9.0)
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))
    torch._dynamo.reset()
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for schedule in ((1, 40), (1, 8, 40), (8, 40), (40,), (1, 2, 4), (1, 40)):
            before = counters["stats"]["unique_graphs"]
            out = fused(model, agent, ids, mask, n=6, mara_schedule=schedule, cache_implementation="static",
                        compile_config=eager_compile_config())
            graphs.append(counters["stats"]["unique_graphs"] - before)
            dynamic = fused(model, agent, ids, mask, n=6, mara_schedule=schedule)
            assert torch.equal(out.sequences, dynamic.sequences), schedule
            assert (out.mara_steps["forwards"] > 1).any() or schedule == (40,)
    torch._dynamo.reset()
    assert sum(graphs) == 3 and graphs[2:] == [0] * 4, graphs


def test_a_model_that_scales_its_logits_runs_the_static_step_uncompiled(caplog):
    """The compiled chunk projects the picked sibling with lm_head itself; a model that scales lm_head's output
    (here by 1.0005, which a tolerance would let through) must run the static step uncompiled, and decode as on the
    dynamic cache."""
    needs_compiled_generate()
    model = scaled_logits_model()
    agent = decisive_agent(seed=1, reject_bias=6.0)  # rejects top-1s on this model, and falls back sometimes
    ids, mask = left_padded(random_prompts(2, seed=4))
    dynamic = fused(model, agent, ids, mask, mara_schedule=(1, 8), mara_fallback="last")
    with caplog.at_level(logging.WARNING, logger="mara_hf.generation"):
        static = fused(model, agent, ids, mask, mara_schedule=(1, 8), mara_fallback="last",
                       cache_implementation="static", compile_config=eager_compile_config())
    assert "CohereForCausalLM post-processes lm_head's output" in caplog.text
    assert "runs uncompiled" in caplog.text
    assert model not in _COMPILED
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (static.mara_steps["index"] > 0).any() and static.mara_steps["fallback"].any()
    plain_model = tiny_model("llama")  # the same call on a model with plain logits compiles its step
    fused(plain_model, agent, ids, mask, mara_schedule=(1, 8), cache_implementation="static",
          compile_config=eager_compile_config())
    assert plain_model in _COMPILED


def test_the_static_sibling_mask_of_a_flex_attention_model_is_additive():
    """transformers' flex attention adds a mask tensor to the scores (`score + score_mask`, it builds no BlockMask
    from it): the static cache path gave it the boolean sdpa mask, which added 0 or 1 and masked nothing (wrong
    tokens on GPT-NeoX, Phi-3, Mixtral, DeepSeek-V3, ... on the CPU). Flex attention itself is not run here: torch's
    CPU code generation for it fails on some of these tiny shapes."""
    from mara_hf.states import _direct_mask

    model = tiny_model("llama")
    _, mask = left_padded(random_prompts(2, lengths=(4, 7), seed=1))
    args = (mask, 7, 0, 3, 12, 2, torch.device("cpu"))
    boolean = _direct_mask(model, *args)
    model.set_attn_implementation("flex_attention")
    additive = _direct_mask(model, *args)
    assert boolean.dtype == torch.bool and additive.dtype == model.dtype
    assert torch.equal(additive == 0, boolean)
    assert (additive[~boolean] == torch.finfo(model.dtype).min).all()
