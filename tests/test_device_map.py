"""Base models split across devices: `from_pretrained(..., device_map=...)` with layers and lm_head offloaded (their
weights on `meta`, moved in by accelerate's hooks for each forward), a model under `accelerate.cpu_offload`, and
tensor parallelism (`tp_plan="auto"` under torchrun, two CPU processes on gloo). MARA's output in both decoding
paths and training rollouts equal the undispatched model's: the states are read where lm_head gets them, the agent
runs on lm_head's execution device, candidates and cache stay on their devices."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from conftest import assert_model_untouched, decisive_agent, left_padded, random_prompts, tiny_model
from mara_hf import MaraLogitsProcessor, mara_generate
from mara_hf.hf_internals import execution_device
from mara_hf.train import rollout

TESTS = Path(__file__).resolve().parent


def saved(arch, tmp_path):
    path = tmp_path / arch
    tiny_model(arch).save_pretrained(path)
    return path


def offloaded(path, tmp_path, head="disk"):
    """The model with its second decoder layer and lm_head offloaded to disk, the rest on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": head}
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map,
                                                offload_folder=tmp_path / "offload").eval()


def both_paths(model, agent, ids, mask, **kwargs):
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    fused = model.generate(ids, custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True,
                           **settings)
    processor = model.generate(ids, logits_processor=[MaraLogitsProcessor(agent, model)], **settings)
    return fused, processor


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_offloaded_layers_and_head_decode_as_the_whole_model(arch, tmp_path):
    path = saved(arch, tmp_path)
    whole = AutoModelForCausalLM.from_pretrained(path).eval()
    split = offloaded(path, tmp_path, head="cpu" if arch == "gemma2" else "disk")
    assert split.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    # Gemma2 ties lm_head to the input embeddings (on the CPU); Llama's own lm_head is offloaded.
    assert split.lm_head.weight.device.type == ("cpu" if arch == "gemma2" else "meta")
    assert execution_device(split.lm_head) == torch.device("cpu")
    agent = decisive_agent(32, seed=7)  # rejects some top-1 tokens: later chunks and narrowed caches run too
    ids, mask = left_padded(random_prompts(3))
    fused, processor = both_paths(split, agent, ids, mask)
    ref_fused, ref_processor = both_paths(whole, agent, ids, mask)
    assert torch.equal(fused.sequences, ref_fused.sequences) and torch.equal(processor, ref_processor)
    assert torch.equal(fused.sequences, processor)
    assert (fused.mara_steps["index"] > 0).any()  # the agent changed tokens
    for key in ("index", "top1", "asked", "fallback"):
        assert torch.equal(fused.mara_steps[key], ref_fused.mara_steps[key]), key
    assert_model_untouched(split)  # MARA's state hook is gone (accelerate's hooks are not torch hooks)


def test_static_cache_on_an_offloaded_model(tmp_path):
    path = saved("llama", tmp_path)
    whole = AutoModelForCausalLM.from_pretrained(path).eval()
    split = offloaded(path, tmp_path)
    agent = decisive_agent(32, seed=7)
    ids, mask = left_padded(random_prompts(2))
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                    custom_generate=mara_generate, mara_agent=agent, cache_implementation="static")
    assert torch.equal(split.generate(ids, **settings), whole.generate(ids, **settings))


def test_cpu_offload_hooks_decode_and_roll_out_as_the_whole_model():
    """`accelerate.cpu_offload`: every weight on `meta`, streamed in from CPU memory for each module's forward."""
    whole = tiny_model("qwen3")
    hooked = cpu_offload(tiny_model("qwen3"), execution_device="cpu")
    assert hooked.lm_head.weight.device.type == "meta"
    agent = decisive_agent(32, seed=7)
    ids, mask = left_padded(random_prompts(3))
    fused, processor = both_paths(hooked, agent, ids, mask)
    ref_fused, ref_processor = both_paths(whole, agent, ids, mask)
    assert torch.equal(fused.sequences, ref_fused.sequences) and torch.equal(processor, ref_processor)

    sampler = decisive_agent(32, seed=3, sharpness=3.0)
    runs = [rollout(model, sampler, ids, mask, max_new_tokens=5, eos_token_ids=[2], pad_token_id=0,
                    generator=torch.Generator().manual_seed(1)) for model in (hooked, whole)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].actions, runs[1].actions)
    torch.testing.assert_close(runs[0].states, runs[1].states)


TP_SCRIPT = """
import json, os, sys
import torch
from transformers import AutoModelForCausalLM
sys.path.insert(0, {tests!r})
from conftest import decisive_agent, left_padded, random_prompts
from mara_hf import MaraLogitsProcessor, mara_generate

path = sys.argv[1]
agent = decisive_agent(32, seed=7)
ids, mask = left_padded(random_prompts(3))
settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
try:  # newer transformers releases
    from transformers import DistributedConfig
    tp = {{"distributed_config": DistributedConfig(tp_plan="auto")}}
except ImportError:
    tp = {{"tp_plan": "auto"}}
out = {{}}
for name, kwargs in (("whole", {{}}), ("tp", tp)):
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    out[name] = {{
        "tp_size": getattr(model, "tp_size", None),
        "fused": model.generate(ids, custom_generate=mara_generate, mara_agent=agent, **settings).tolist(),
        "processor": model.generate(ids, logits_processor=[MaraLogitsProcessor(agent, model)], **settings).tolist(),
    }}
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".json"), "w") as f:  # not stdout: the two
    json.dump(out, f)                                                                    # ranks' lines interleave
"""


def test_tensor_parallel_under_torchrun_decodes_as_the_whole_model(tmp_path):
    """Two processes on gloo, each holding half of every attention and MLP weight (`tp_plan="auto"`): both ranks
    decode what the unsplit model decodes, in both paths."""
    from torch.distributed.tensor import distribute_tensor

    if "src_data_rank" not in inspect.signature(distribute_tensor).parameters:  # torch < 2.7
        pytest.skip("transformers' tensor parallelism calls distribute_tensor(src_data_rank=...), which this torch "
                    "lacks")
    path = saved("llama", tmp_path)
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(path), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["tp"]["tp_size"] == 2 and result["whole"]["tp_size"] is None
        assert result["tp"]["fused"] == result["whole"]["fused"] == result["tp"]["processor"]
        assert result["tp"]["processor"] == result["whole"]["processor"]


def test_training_on_an_offloaded_model_learns_what_the_whole_model_teaches(tmp_path):
    """The trainer reads the states where lm_head computes (its execution device, not its `meta` weights) and
    keeps the learner there."""
    from mara_hf.train import Trainer
    from test_train import even_token_rate, small_config, word_prompts, word_tokenizer

    agents = [Trainer(model, word_tokenizer(), word_prompts(8), even_token_rate, tmp_path / name,
                      small_config(iterations=2, learning_starts=8), progress=False).train()
              for name, model in (("hooked", cpu_offload(tiny_model(), execution_device="cpu")),
                                  ("whole", tiny_model()))]
    for (name, a), (_, b) in zip(agents[0].state_dict().items(), agents[1].state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
