import functools
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CompileConfig,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.utils import logging as hf_logging

from mara_hf import MaraAgent

hf_logging.set_verbosity_error()
# Tiny models are fastest on one thread (thread hand-offs cost more than their matmuls); the real LLM uses two.
TINY_THREADS, LLM_THREADS = 1, max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(TINY_THREADS)


@pytest.fixture(autouse=True)
def _threads(request):
    uses_llm = any(name in request.fixturenames for name in ("smollm2", "setup", "real_model"))
    torch.set_num_threads(LLM_THREADS if uses_llm else TINY_THREADS)
    yield
    torch.set_num_threads(TINY_THREADS)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Several architectures: plain full attention (Llama, Qwen3), all-sliding (Mistral, window 8 so contexts
# overflow it), hybrid full/sliding with a dict of masks (Qwen2, Gemma2 with eager attention and softcapping).
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma2": lambda: Gemma2Config(**COMMON, sliding_window=8, head_dim=8),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    return model.to(dtype)


def scaled_logits_model(scale: float = 1.0005, seed: int = 0):
    """A tiny Cohere (full attention): its logits are lm_head's output times `logit_scale`, nearly the identity at
    1.0005, so only an exact check tells them from lm_head's output."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CohereConfig(**COMMON, logit_scale=scale)).eval()


def decisive_agent(state_dim: int = 32, seed: int = 0, reject_bias: float = 0.0, sharpness: float = 30.0):
    """A random agent with sharp decisions (p_accept far from 0.5); `reject_bias` > 0 makes it reject more."""
    torch.manual_seed(seed)
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.mul_(sharpness)
        agent.output_linear.bias.copy_(torch.tensor([reject_bias, 0.0]))
    return agent.eval()


def constant_agent(state_dim: int = 32, accept: bool = True):
    """Accepts (or rejects) every candidate."""
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.zero_()
        agent.output_linear.bias.copy_(torch.tensor([-10.0, 10.0] if accept else [10.0, -10.0]))
    return agent.eval()


def eager_compile_config():
    """Compile through dynamo with the eager backend: checks the step traces as one graph without code generation
    (fast on CPU); `_compile_all_devices` makes generate compile on CPU as it does on CUDA."""
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True
    return config


@functools.lru_cache(maxsize=None)
def transformers_compiled_generate() -> tuple[str | None, str | None]:
    """What this torch does with transformers' own compiled static-cache `generate`, which MARA's compiled step
    follows: `(why it cannot compile, why it compiles again at a second call)`, each None when it does not.
    Seen here with transformers 5.25: torch 2.6's dynamo cannot trace the models' forward; torch 2.7 and 2.8 guard
    on the cache tensors' identity, so every call compiles again; torch 2.9 and newer do neither."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(3, lengths=(4, 13, 8), seed=21))  # as the tests of the compiled step
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static", compile_config=eager_compile_config())
    try:
        model.generate(ids, **kwargs)
    except Exception as error:  # dynamo's `Unsupported`, raised from deep in transformers
        return f"torch {torch.__version__} cannot compile transformers' own static-cache generate " \
               f"({type(error).__name__})", None
    graphs = counters["stats"]["unique_graphs"]
    assert graphs, "transformers' static-cache generate compiled nothing"
    model.generate(ids, **kwargs)
    if counters["stats"]["unique_graphs"] != graphs:
        return None, f"torch {torch.__version__} compiles transformers' own static-cache generate again at each call"
    return None, None


def needs_compiled_generate(replay: bool = False) -> None:
    """Skip a test of MARA's compiled step where transformers' own compiled `generate` cannot compile (or, with
    `replay`, compiles again at every call): MARA can do no better than the path it follows."""
    cannot, again = transformers_compiled_generate()
    if cannot or (replay and again):
        pytest.skip(cannot or again)


def left_padded(prompts: list[list[int]], pad: int = 0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def random_prompts(count: int, lengths=(5, 9, 3, 12), seed: int = 0, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def assert_model_untouched(model):
    """No hook left on any module, as before MARA touched the model."""
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'model'}"
        assert not module._forward_hooks, f"forward hook left on {name or 'model'}"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer, loaded once."""
    from mara_hf.models import load_base_model

    try:
        return load_base_model("smollm2")
    except FileNotFoundError as err:
        pytest.fail(f"The real SmolLM2 test model is missing: {err} (see README).")
