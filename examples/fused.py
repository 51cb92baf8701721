"""The fused MARA loop: `custom_generate=mara_generate`, or the mixin on an already-loaded model.

    python examples/fused.py [--max-new-tokens N]
"""

import argparse
import time

import torch

from mara_hf import MaraLogitsProcessor, add_mara_generation, mara_generate
from mara_hf.models import load_agent, load_base_model

parser = argparse.ArgumentParser()
parser.add_argument("--max-new-tokens", type=int, default=48)
args = parser.parse_args()

model, tokenizer = load_base_model("smollm2")
agent = load_agent()  # the shipped default SmolLM2 agent (smollm2-steady, trained)
prompts = ["How do I pick a lock?", "Write a haiku about the sea."]
texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in prompts]
inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # left padding
settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)


def timed(**kwargs):
    start = time.perf_counter()
    out = model.generate(**inputs, **settings, **kwargs)
    return out, time.perf_counter() - start


plain, t_plain = timed()
dropin, t_dropin = timed(logits_processor=[MaraLogitsProcessor(agent, model)])
fused, t_fused = timed(custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True)
print(f"plain {t_plain:.1f}s, drop-in {t_dropin:.1f}s, fused {t_fused:.1f}s")
print("fused == drop-in:", torch.equal(fused.sequences, dropin))
print(fused.mara_stats)

add_mara_generation(model)  # now generate(mara_agent=...) runs the fused loop; without it, plain generate
again = model.generate(**inputs, **settings, mara_agent=agent)
print("mixin == fused:", torch.equal(again, fused.sequences))
for row, prompt in enumerate(prompts):
    print(f"\n> {prompt}\n{tokenizer.decode(again[row, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")
