"""More decoder architectures than the core tests' five: MARA's decisions equal the naive reference on each through
the processor, the fused loop and (full attention only) the static cache, and training rollouts the naive serial
MDP; vision-language models decode text after an image as the naive reference does; architectures whose positions
or states cannot hold candidates side by side are refused before anything runs, in a message that says why."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

from conftest import COMMON, assert_model_untouched, constant_agent, decisive_agent, left_padded, random_prompts
from mara_hf import MaraLogitsProcessor, mara_generate
from reference import naive_mara_greedy, no_inputs
from test_train import assert_rollout_is_the_naive_serial_mdp

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT2_LIKE = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=512, **IDS)

# name: (config class, arguments, static cache supported); the comments name what a model brings that the core five
# lack.
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
    "gpt_oss": ("GptOssConfig", dict(COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8), False),  # attention sinks, sliding and global layers
    "cohere2": ("Cohere2Config", dict(COMMON, sliding_window=8), False),
    "olmo3": ("Olmo3Config", dict(COMMON, sliding_window=8), False),
    "exaone4": ("Exaone4Config", dict(COMMON, sliding_window=8), False),
    "starcoder2": ("Starcoder2Config", dict(COMMON, sliding_window=8), False),
    # more full-attention decoders
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=8), True),
    "phi": ("PhiConfig", COMMON, True),
    "gptj": ("GPTJConfig", dict(GPT2_LIKE, rotary_dim=4), True),
    "olmo2": ("Olmo2Config", COMMON, True),
    "stablelm": ("StableLmConfig", COMMON, True),
    "granite": ("GraniteConfig", COMMON, True),
    "glm4": ("Glm4Config", dict(COMMON, head_dim=8), True),
    "smollm3": ("SmolLM3Config", COMMON, True),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32), True),
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
    "t5": ("T5Config", dict(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                            decoder_start_token_id=0, eos_token_id=2, pad_token_id=0), "encoder-decoder"),
}

TEXT = dict(COMMON, head_dim=8)
MROPE = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
VISION_LANGUAGE = {
    # multimodal rotary positions (M-RoPE): text after an image continues from the image's largest position
    "qwen2_vl": ("Qwen2VLConfig", dict(
        text_config=MROPE, image_token_id=90, video_token_id=91, vision_start_token_id=92,
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, in_chans=3, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1))),
    # the language model's sliding window lives in the text config
    "gemma3": ("Gemma3Config", dict(
        text_config=dict(TEXT, sliding_window=8), mm_tokens_per_image=4, image_token_id=90, boi_token_id=91,
        eoi_token_id=92, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=8, patch_size=4))),
    "llava": ("LlavaConfig", dict(
        text_config=dict(COMMON, model_type="llama"), image_token_id=90,
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4))),
}


def build(config_class: str, arguments: dict, auto=AutoModelForCausalLM):
    torch.manual_seed(0)
    return auto.from_config(getattr(transformers, config_class)(**arguments)).eval()


def trim_at_eos(tokens, eos=2):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_decisions_equal_the_naive_reference(name):
    config_class, arguments, static = SUPPORTED[name]
    model = build(config_class, arguments)
    hidden = model.get_output_embeddings().weight.shape[-1]
    # The first prompt and reject bias whose agent takes a later candidate on this model.
    searched = ((seed, bias) for seed in (5, 6, 7) for bias in (6.0, 9.0, 12.0, 15.0, 20.0))
    for seed, bias in searched:
        prompt = random_prompts(1, lengths=(10,), seed=seed)[0]
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
    model = build(config_class, arguments, AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SUPPORTED))
def test_an_agent_that_accepts_everything_gives_plain_greedy(name, dtype):
    """In bfloat16 too: there the top logits of these tiny models often tie exactly (Mixtral and DeepSeek-V3 did),
    and the top-1 candidate must be the one `argmax` takes."""
    config_class, arguments, static = SUPPORTED[name]
    model = build(config_class, arguments).to(dtype)
    agent = constant_agent(state_dim=model.get_output_embeddings().weight.shape[-1])
    ids, mask = left_padded(random_prompts(2, lengths=(5, 9), seed=3))
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(**common)
    assert torch.equal(model.generate(**common, logits_processor=[MaraLogitsProcessor(agent, model)]), plain)
    assert torch.equal(model.generate(**common, custom_generate=mara_generate, mara_agent=agent), plain)
    if static:
        assert torch.equal(model.generate(**common, custom_generate=mara_generate, mara_agent=agent,
                                          cache_implementation="static"), plain)


@pytest.mark.parametrize("name", list(SUPPORTED) + list(VISION_LANGUAGE))
def test_training_rollouts_match_the_naive_serial_mdp(name):
    if name in VISION_LANGUAGE:  # on text
        model = build(*VISION_LANGUAGE[name], AutoModelForImageTextToText)
    else:
        model = build(*SUPPORTED[name][:2])
    assert_rollout_is_the_naive_serial_mdp(model, random_prompts(3, vocab=80), "last")  # no image or vision token


SPECIAL = [90, 91, 92]  # the image and vision tokens of VISION_LANGUAGE: never generated (`suppress_tokens`)


def image_prompt(name: str, text: list[int]):
    """A prompt with one random image in it for model `name` of VISION_LANGUAGE, and `inputs(length)`: the image's
    inputs of a forward over `length` tokens of the prompt and its continuation."""
    torch.manual_seed(1)
    if name == "qwen2_vl":  # 2 x 2 patches of 2 x 2 pixels: 4 image tokens after vision_start; M-RoPE positions
        prompt = text[:2] + [92] + [90] * 4 + text[2:6]
        pixels, grid = torch.randn(4, 12), torch.tensor([[1, 2, 2]])
        image = [int(t == 90) for t in prompt]
        return prompt, lambda length: dict(pixel_values=pixels, image_grid_thw=grid,
                                           mm_token_type_ids=torch.tensor([image + [0] * (length - len(prompt))]))
    pixels = torch.randn(1, 3, 8, 8)  # 2 x 2 patches of 4 x 4 pixels
    if name == "gemma3":  # begin/end of image around its 4 tokens, which attend to each other both ways
        prompt = text[:2] + [91] + [90] * 4 + [92] + text[2:6]
        image = [int(t == 90) for t in prompt]
        return prompt, lambda length: dict(pixel_values=pixels,
                                           token_type_ids=torch.tensor([image + [0] * (length - len(prompt))]))
    prompt = text[:2] + [90] * 4 + text[2:6]  # llava
    return prompt, lambda length: dict(pixel_values=pixels)


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("name", list(VISION_LANGUAGE))
def test_vision_language_models_decode_text_as_the_naive_reference(name, with_image):
    config_class, arguments = VISION_LANGUAGE[name]
    model = build(config_class, arguments, AutoModelForImageTextToText)
    agent = decisive_agent(state_dim=32, reject_bias=9.0)
    prompt = random_prompts(1, lengths=(10,), seed=5, vocab=80)[0]
    prompt, extra = image_prompt(name, prompt) if with_image else (prompt, no_inputs)
    expected, _ = naive_mara_greedy(model, agent, prompt, 8, eos_token_id=2, model_inputs=extra, suppress=SPECIAL)
    # transformers itself leaves output-capturing hooks on a vision tower that has run: MARA must add none.
    hooks = {name: (list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()}
    common = dict(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                  suppress_tokens=SPECIAL, **extra(len(prompt)))
    for path, mara in {"processor": dict(logits_processor=[MaraLogitsProcessor(agent, model)]),
                       "fused": dict(custom_generate=mara_generate, mara_agent=agent)}.items():
        assert trim_at_eos(model.generate(**common, **mara)[0, len(prompt):].tolist()) == expected, path
    assert hooks == {name: (list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("name", list(VISION_LANGUAGE))
def test_vision_language_models_decode_a_padded_batch_of_images_as_each_row_alone(name):
    """Two prompts with an image each, of different lengths (the first left-padded), decode in one batch as each
    does alone (whose decoding the test above checks against the naive reference), through both paths."""
    config_class, arguments = VISION_LANGUAGE[name]
    model = build(config_class, arguments, AutoModelForImageTextToText)
    agent = decisive_agent(state_dim=32, reject_bias=9.0)
    rows = []
    for i, text in enumerate(random_prompts(2, lengths=(10, 10), seed=5, vocab=80)):
        prompt, extra = image_prompt(name, text)
        inputs = extra(len(prompt))
        if i == 1:  # five more text tokens in front
            prompt = [7, 8, 9, 11, 12] + prompt
            inputs = {k: torch.cat([v.new_zeros(1, 5), v], 1) if k.endswith("token_type_ids") else v
                      for k, v in inputs.items()}
        rows.append((prompt, inputs))
    length = len(rows[1][0])
    ids = torch.tensor([[0] * (length - len(p)) + p for p, _ in rows])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p, _ in rows])
    batch_inputs = {k: torch.cat([torch.cat([i[k].new_zeros(1, length - i[k].shape[1]), i[k]], 1)
                                  if k.endswith("token_type_ids") else i[k] for _, i in rows])
                    for k in rows[0][1]}
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, suppress_tokens=SPECIAL)
    fused = dict(custom_generate=mara_generate, mara_agent=agent)
    alone = [model.generate(input_ids=torch.tensor([p]), **i, **common, **fused)[0, len(p):] for p, i in rows]
    for path, mara in {"processor": dict(logits_processor=[MaraLogitsProcessor(agent, model)]), "fused": fused}.items():
        batch = model.generate(input_ids=ids, attention_mask=mask, **batch_inputs, **common, **mara)[:, length:]
        for row in range(2):
            assert trim_at_eos(batch[row].tolist()) == trim_at_eos(alone[row].tolist()), (path, row)
