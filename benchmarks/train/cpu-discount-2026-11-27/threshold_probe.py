"""The greedy fallback rate of an agent at several decision thresholds (`accept_threshold`), from
`mara_hf.train.probe.greedy_probe` (the fused loop, greedy, as at inference) on the first N prompts of a file.

    python benchmarks/train/cpu-discount-2026-11-27/threshold_probe.py --prompts runs/validation.json \
        --agent smollm2-fluent --limit 32 --thresholds 0.5 0.4 0.3 0.2
"""

from __future__ import annotations

import argparse
import json

import torch

from mara_hf.data import eos_token_ids, load_prompts
from mara_hf.models import load_agent, load_base_model
from mara_hf.train import TrainConfig
from mara_hf.train.probe import greedy_probe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="prompt file (JSON list of {instruction} or JSON Lines)")
    parser.add_argument("--agent", default="smollm2-fluent", help="agent name or folder")
    parser.add_argument("--limit", type=int, default=32, help="first N prompts")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.4, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model("smollm2")
    agent = load_agent(args.agent)
    prompts = load_prompts(args.prompts, limit=args.limit)
    config = TrainConfig(rollout_batch_size=16, max_new_tokens=64, top_k=agent.top_k, top_p=agent.top_p,
                         fallback=agent.fallback)
    for threshold in args.thresholds:
        probe = greedy_probe(model, tokenizer, agent, prompts, config, eos_token_ids(model, tokenizer), threshold)
        print(json.dumps({"threshold": threshold, **probe}), flush=True)


if __name__ == "__main__":
    main()
