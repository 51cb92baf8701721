"""More decoder architectures than the core tests' five: MARA's decisions equal the naive reference on each through
the processor, the fused loop and (full attention only) the static cache, and training rollouts the naive serial
MDP; architectures whose positions or states cannot hold candidates side by side are refused before anything runs,
in a message that says why."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import COMMON, assert_model_untouched, constant_agent, decisive_agent, left_padded, random_prompts
from mara_hf import MaraLogitsProcessor, mara_generate
from mara_hf.train.rollout import rollout
from reference import naive_mara_greedy
from test_train import naive_rollout

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT2_LIKE = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=512, **IDS)

# name: (config class, arguments, static cache supported). Each brings a mechanism the core five lack.
SUPPORTED = {
    "gpt2": ("GPT2Config", GPT2_LIKE, True),  # learned absolute positions, Conv1D projections
    "gpt_bigcode": ("GPTBigCodeConfig", GPT2_LIKE, True),  # multi-query attention
    "opt": ("OPTConfig", dict(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=512, **IDS), True),  # offset positions
    "gpt_neox": ("GPTNeoXConfig", COMMON, True),  # partial rotary, parallel residual
    "falcon": ("FalconConfig", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2, **IDS), True),
    "phi3": ("Phi3Config", COMMON, True),  # fused qkv projection
    "mixtral": ("MixtralConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2), True),  # mixture of experts
    # multi-head latent attention: keys and values of different head sizes
    "deepseek_v3": ("DeepseekV3Config", dict(COMMON, hidden_size=64, num_key_value_heads=4, n_routed_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=None,
                                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                             head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1), True),
    # sliding and global layers (a static cache's sliding layers are a ring buffer: refused there)
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, head_dim=8, sliding_window=8), False),
}

REFUSED = {
    "bloom": ("BloomConfig", dict(vocab_size=96, hidden_size=32, n_layer=2, n_head=4, **IDS), "takes none"),
    "mpt": ("MptConfig", dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=512, **IDS),
            "takes none"),
    "falcon_alibi": ("FalconConfig", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          alibi=True, **IDS), "alibi=True"),
    "mamba": ("MambaConfig", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, **IDS), "takes none"),
    "jamba": ("JambaConfig", dict(COMMON, num_experts=2, attn_layer_period=2, attn_layer_offset=1),
              "recurrent state"),
}


def build(config_class: str, arguments: dict):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**arguments)).eval()


def trim_at_eos(tokens, eos=2):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_decisions_equal_the_naive_reference(name):
    config_class, arguments, static = SUPPORTED[name]
    model = build(config_class, arguments)
    hidden = model.get_output_embeddings().weight.shape[-1]
    prompt = random_prompts(1, lengths=(10,), seed=5)[0]
    # The first reject bias whose agent takes a later candidate on this model.
    for bias in (6.0, 9.0, 12.0, 15.0, 20.0):
        agent = decisive_agent(state_dim=hidden, reject_bias=bias)
        expected, records = naive_mara_greedy(model, agent, prompt, 12, eos_token_id=2)
        if any(r["index"] > 0 for r in records):
            break
    else:
        pytest.fail("no agent takes a later candidate")
    common = dict(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    paths = {
        "processor": dict(logits_processor=[MaraLogitsProcessor(agent, model)]),
        "fused": dict(custom_generate=mara_generate, mara_agent=agent),
    }
    if static:
        paths["fused, static cache"] = dict(custom_generate=mara_generate, mara_agent=agent,
                                            cache_implementation="static")
    for path, extra in paths.items():
        got = model.generate(**common, **extra)[0, len(prompt):].tolist()
        assert trim_at_eos(got) == expected, path
    # Left-padded rows decode as each prompt alone.
    prompts = random_prompts(3, lengths=(4, 11, 7), seed=7)
    ids, mask = left_padded(prompts)
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           custom_generate=mara_generate, mara_agent=agent)[:, ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        alone, _ = naive_mara_greedy(model, agent, prompt, 8, eos_token_id=2)
        assert batch[row, : len(alone)].tolist() == alone, row
    assert_model_untouched(model)


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_that_cannot_hold_siblings_are_refused_and_left_as_they_were(name):
    config_class, arguments, message = REFUSED[name]
    model = build(config_class, arguments)
    hidden = model.get_output_embeddings().weight.shape[-1]
    agent = constant_agent(state_dim=hidden)
    common = dict(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                  use_cache=True)
    before = model.generate(**common)
    with pytest.raises(ValueError, match=message):
        model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model)])
    with pytest.raises(ValueError, match=message):
        model.generate(**common, custom_generate=mara_generate, mara_agent=agent)
    assert torch.equal(model.generate(**common), before)
    assert_model_untouched(model)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_an_agent_that_accepts_everything_gives_plain_greedy(name):
    config_class, arguments, static = SUPPORTED[name]
    model = build(config_class, arguments)
    agent = constant_agent(state_dim=model.get_output_embeddings().weight.shape[-1])
    ids, mask = left_padded(random_prompts(2, lengths=(5, 9), seed=3))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(**common)
    assert torch.equal(model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model)]), plain)
    assert torch.equal(model.generate(**common, custom_generate=mara_generate, mara_agent=agent), plain)
    if static:
        assert torch.equal(model.generate(**common, custom_generate=mara_generate, mara_agent=agent,
                                          cache_implementation="static"), plain)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_training_rollouts_match_the_naive_serial_mdp(name):
    config_class, arguments, _ = SUPPORTED[name]
    model = build(config_class, arguments)
    agent = decisive_agent(model.get_output_embeddings().weight.shape[-1], seed=3, sharpness=3.0)
    prompts = random_prompts(3)
    ids, mask = left_padded(prompts)
    out = rollout(model, agent, ids, mask, max_new_tokens=6, eos_token_ids=[2], pad_token_id=0,
                  generator=torch.Generator().manual_seed(5), fallback="last")
    tokens, events = naive_rollout(model, agent, prompts, 6, torch.Generator().manual_seed(5), 2, "last")
    for row in range(3):
        assert out.tokens[row, : out.lengths[row]].tolist() == tokens[row]
    events = sorted(events, key=lambda e: e[:3])
    assert [(r, p, c, a) for r, p, c, a, _ in events] == list(zip(
        out.rows.tolist(), out.positions.tolist(), out.candidates.tolist(), out.actions.tolist()))
    torch.testing.assert_close(out.states, torch.stack([s for *_, s in events]), atol=1e-4, rtol=1e-4)
