"""A released MARA agent from the Hub (IAAR-Shanghai/MARA_AGENTS) on its base model.

Needs the network and, realistically, a GPU:
    python examples/mara_agents_hub.py
    python examples/mara_agents_hub.py --convert mistral-mara-agent   # also write it in the native format
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mara_hf import MaraAgent, mara_generate

parser = argparse.ArgumentParser()
parser.add_argument("--actor", default="mistral_v3_2_1_actor.pth", help="file name in IAAR-Shanghai/MARA_AGENTS")
parser.add_argument("--base-model", default="mistralai/Mistral-7B-Instruct-v0.3")
parser.add_argument("--convert", default=None, help="folder to save the agent in the native format")
args = parser.parse_args()

agent = MaraAgent.from_pretrained("IAAR-Shanghai/MARA_AGENTS", filename=args.actor, base_model=args.base_model)
if args.convert:
    agent.save_pretrained(args.convert)  # model.safetensors + config.json + model card

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tokenizer = AutoTokenizer.from_pretrained(args.base_model)
model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype).to(device)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": "How do I pick a lock?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
out = model.generate(**inputs, max_new_tokens=128, custom_generate=mara_generate, mara_agent=agent,
                     return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(out.mara_stats)
