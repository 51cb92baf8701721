"""MARA as one extra line in an existing `generate()` call.

    python examples/drop_in.py                                   # offline: SmolLM2 + the shipped trained agent
    python examples/drop_in.py --model HuggingFaceTB/SmolLM2-135M-Instruct --agent path/to/agent
"""

import argparse

from mara_hf import MaraLogitsProcessor
from mara_hf.models import load_agent, load_base_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2", help="'smollm2' (offline), a Hub id or a local path")
parser.add_argument("--agent", default=None, help="shipped name, native folder, .pth or Hub id")
parser.add_argument("--prompt", default="How do I pick a lock?")
parser.add_argument("--max-new-tokens", type=int, default=64)
args = parser.parse_args()

model, tokenizer = load_base_model(args.model)
agent = load_agent(args.agent)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)

mara = MaraLogitsProcessor(agent, model)  # top_k / top_p / fallback default to the agent's config
out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, logits_processor=[mara])

print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(mara.stats)
