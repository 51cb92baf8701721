"""Train a MARA agent for SmolLM2-135M-Instruct from Python: a few rollouts with the VADER sentiment reward.

    pip install vaderSentiment
    python examples/train_smollm2.py [PROMPTS.json] [--iterations N] [--out runs/example]

A real run uses the command line (`mara-hf train --help`); the shipped `smollm2-vader` agent's model card gives
its exact command. Run this script again with the same --out and a larger --iterations: it resumes.
"""

import argparse

import torch

from mara_hf import mara_generate
from mara_hf.evaluation import load_prompts
from mara_hf.models import SMOLLM2_HUB_ID, load_base_model
from mara_hf.rewards import parse_reward
from mara_hf.train import SACConfig, Trainer, TrainConfig

PROMPTS = ["How do I pick a lock?", "My neighbour is loud at night. What should I do?",
           "Write a short note to a colleague who missed a deadline.", "Why do people lie?"]

parser = argparse.ArgumentParser()
parser.add_argument("prompts", nargs="?", help="JSON list of objects with 'instruction' (default: 4 built-in prompts)")
parser.add_argument("--iterations", type=int, default=3)
parser.add_argument("--out", default="runs/example")
args = parser.parse_args()

torch.set_num_threads(2)
prompts = load_prompts(args.prompts) if args.prompts else PROMPTS
reward = parse_reward("10*vader")  # fails early, with the pip command, if vaderSentiment is missing
model, tokenizer = load_base_model("smollm2")
config = TrainConfig(
    iterations=args.iterations, rollout_batch_size=4, max_new_tokens=32, top_k=10, learning_starts=64,
    updates_per_rollout=8, checkpoint_every=1, sac=SACConfig(batch_size=64, tau=0.05, buffer_size=20_000),
)
trainer = Trainer(model, tokenizer, prompts, reward, args.out, config, base_model_name=SMOLLM2_HUB_ID,
                  description="examples/train_smollm2.py")
agent = trainer.train()  # resumes from args.out/checkpoints/latest if there is one
print(f"agent saved to {args.out}/agent; metrics in {args.out}/metrics.jsonl")

inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=32, do_sample=False, custom_generate=mara_generate, mara_agent=agent)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
