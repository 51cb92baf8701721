"""The greedy fallback rate of an agent at several decision thresholds (`accept_threshold`), from
`mara_hf.train.probe.greedy_probe` (the fused loop, greedy, as at inference) on the first N prompts of a file;
with `--reward SPEC` also the probe's reward, KL penalty, rejects, repeated 4-gram tokens and greedy return (under
`--kl-coef`, `--reject-cost` and `--repeat-cost`, the training run's values).

    python benchmarks/train/cpu-discount-2026-11-27/threshold_probe.py --prompts runs/validation.json \
        --agent smollm2-fluent --limit 32 --thresholds 0.5 0.4 0.3 0.2
"""

from __future__ import annotations

import argparse
import json

import torch

from mara_hf.data import eos_token_ids, load_prompts
from mara_hf.models import load_agent, load_base_model
from mara_hf.rewards import parse_reward
from mara_hf.train import TrainConfig
from mara_hf.train.probe import greedy_probe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="prompt file (JSON list of {instruction} or JSON Lines)")
    parser.add_argument("--agent", default="smollm2-fluent", help="agent name or folder")
    parser.add_argument("--limit", type=int, default=32, help="first N prompts")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.4, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reward", default=None, help="training reward spec, e.g. '10*vader+10*fluency'")
    parser.add_argument("--kl-coef", type=float, default=0.2, help="the run's --kl-coef (of the greedy return)")
    parser.add_argument("--reject-cost", type=float, default=0.01, help="the run's --reject-cost (of the return)")
    parser.add_argument("--repeat-cost", type=float, default=0.0, help="the run's --repeat-cost (of the return)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model("smollm2")
    agent = load_agent(args.agent)
    prompts = load_prompts(args.prompts, limit=args.limit)
    config = TrainConfig(rollout_batch_size=16, max_new_tokens=64, top_k=agent.top_k, top_p=agent.top_p,
                         fallback=agent.fallback, kl_coef=args.kl_coef, reject_cost=args.reject_cost,
                         repeat_cost=args.repeat_cost)
    reward = None if args.reward is None else parse_reward(args.reward)
    for threshold in args.thresholds:
        probe = greedy_probe(model, tokenizer, agent, prompts, config, eos_token_ids(model, tokenizer), threshold,
                             reward=reward)
        print(json.dumps({"threshold": threshold, **probe}), flush=True)


if __name__ == "__main__":
    main()
