"""Whether two `mara-hf eval` runs on the same prompts differ in gain by more than the prompts' spread allows.

Per prompt, each run's outcome under a reward is +1 (MARA's answer scored above the base answer), 0 (tie) or -1;
its gain is 100 x their mean. The difference of the two gains is the mean of the per-prompt differences of
outcomes (both runs answer the same prompts, so they are paired); its 95% interval is +-1.96 standard errors of
that mean.

    python benchmarks/eval/paired_gain.py benchmarks/eval/smollm2-steady/saferlhf/responses.jsonl \
        benchmarks/eval/smollm2-steady/min-p/saferlhf_minp0.1_responses.jsonl --reward '10*vader+10*fluency'
"""

from __future__ import annotations

import argparse
import json
import math


def outcomes(path: str, reward: str) -> dict[int, int]:
    """Prompt index -> +1 / 0 / -1: MARA's reward above, equal to or below the base answer's."""
    found = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            record = json.loads(line)
            delta = record["rewards"]["mara"][reward] - record["rewards"]["base"][reward]
            found[record["index"]] = (delta > 0) - (delta < 0)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="responses.jsonl of the first run")
    parser.add_argument("second", help="responses.jsonl of the second run, on the same prompts")
    parser.add_argument("--reward", action="append", help="reward name inside the files (repeatable; default: vader)")
    args = parser.parse_args(argv)
    print(f"{args.first} -> {args.second}")
    for reward in args.reward or ["vader"]:
        first, second = outcomes(args.first, reward), outcomes(args.second, reward)
        if set(first) != set(second):
            raise SystemExit(f"The two files answer different prompts ({len(first)} and {len(second)}).")
        diffs = [second[i] - first[i] for i in first]
        n = len(diffs)
        mean = sum(diffs) / n
        spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
        print(f"{reward}: N={n}, gain {100 * sum(first.values()) / n:+.1f} -> {100 * sum(second.values()) / n:+.1f}, "
              f"difference {100 * mean:+.1f} +- {196 * spread / math.sqrt(n):.1f} (95% interval, paired by prompt)")


if __name__ == "__main__":
    main()
