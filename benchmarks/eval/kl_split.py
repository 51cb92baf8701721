"""Where MARA's per-token KL to the base model comes from: the gap on the tokens that differ from the top-1, or
the contexts its answers lead into.

`mara-hf eval` reports KL per token as the mean of -log p_base(token) over MARA's tokens (and over the base model's
own greedy tokens, for reference). Per token that is -log p_base(top-1) (how uncertain the base model is in this
context) plus log p_base(top-1) - log p_base(taken) (the gap, zero where MARA took the top-1). This script splits a
`responses.jsonl` of `mara-hf eval` (SmolLM2, as `mara-hf eval` loads it) into the two, re-tokenising the answers'
text (so its totals differ a little from the file's own, which scored the generated ids):

    python benchmarks/eval/kl_split.py benchmarks/eval/smollm2-steady/saferlhf/responses.jsonl

Prints per file: tokens, -log p(top-1) per token, the gap per token, their sum (the KL), the share of tokens that
differ from the top-1, the gap's mean and quartiles over those tokens, and the base answers' own KL.
"""

from __future__ import annotations

import argparse
import json

import torch

from mara_hf.data import encode_chat_prompts
from mara_hf.models import load_base_model


@torch.no_grad()
def token_logprobs(model, tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_base of each token of `answer` after the chat-formatted `prompt`, and log p_base of each position's
    top-1."""
    context = encode_chat_prompts(tokenizer, [prompt], model.device)["input_ids"]
    tokens = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    logits = model(input_ids=torch.cat([context, tokens], dim=1)).logits[0, context.shape[1] - 1:-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, tokens[0][:, None]).squeeze(1), logprobs.max(dim=-1).values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("responses", nargs="+", help="responses.jsonl files written by mara-hf eval (SmolLM2)")
    args = parser.parse_args(argv)
    model, tokenizer = load_base_model("smollm2")
    for path in args.responses:
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        top1_nll, gaps, base_nll, base_tokens = [], [], 0.0, 0
        for record in records:
            taken, top1 = token_logprobs(model, tokenizer, record["prompt"], record["mara"])
            top1_nll.append(-top1)
            gaps.append(top1 - taken)
            base, _ = token_logprobs(model, tokenizer, record["prompt"], record["base"])
            base_nll, base_tokens = base_nll - float(base.sum()), base_tokens + base.numel()
        top1_nll, gaps = torch.cat(top1_nll), torch.cat(gaps)
        changed = gaps[gaps > 1e-6]
        n = gaps.numel()
        quartiles = torch.quantile(changed, torch.tensor([0.25, 0.5, 0.75])).tolist() if changed.numel() else []
        print(f"{path}: {n} MARA tokens; -log p(top-1) {float(top1_nll.mean()):.3f} + gap {float(gaps.sum()) / n:.3f} "
              f"= KL {float(top1_nll.mean()) + float(gaps.sum()) / n:.3f} per token; {changed.numel() / n:.1%} of "
              f"tokens differ from the top-1, gap on them mean {float(changed.mean()):.2f} nats, quartiles "
              f"{', '.join(f'{q:.2f}' for q in quartiles)}; base answers' KL {base_nll / max(base_tokens, 1):.3f}")


if __name__ == "__main__":
    main()
