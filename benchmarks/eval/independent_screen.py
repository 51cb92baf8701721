"""Degenerate answers of `mara-hf eval` files by measures no agent was trained on (issue 11 will be checked "with an
independent degeneration screen"). The shipped agents since `smollm2-fluent` were trained with the `fluency` reward,
so `mara_hf.fluency`'s own count could look good for an agent that only learned to dodge that one screen.

Per answer, over its lower-cased words (runs of letters, digits and `_`):
- distinct-n: the share of its word n-grams (n = 2, 3) that are distinct;
- the longest run of one word repeated back to back;
- the gzip ratio of its text, compressed bytes over raw bytes (repetitive text compresses better: lower).

An answer is flagged when its distinct-3 is under 0.75 (a quarter of its trigrams repeat) or one word comes three
times in a row. Both thresholds were set once, from issue 11's two examples of degenerate answers (each is flagged,
see `tests/test_benchmarks.py`); they were not tuned on the files.

    python benchmarks/eval/independent_screen.py benchmarks/eval/smollm2-*/*/responses.jsonl \
      > benchmarks/eval/independent_screen.log
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import zlib

MIN_DISTINCT_3 = 0.75
MAX_RUN = 2


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def distinct(tokens: list[str], n: int) -> float:
    """The share of distinct n-grams among `tokens`' n-grams (1.0 for an answer shorter than n words)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_run(tokens: list[str]) -> int:
    """The longest run of one word repeated back to back (0 for no words)."""
    best = run = min(1, len(tokens))
    for previous, word in zip(tokens, tokens[1:]):
        run = run + 1 if word == previous else 1
        best = max(best, run)
    return best


def gzip_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw)) / max(1, len(raw))


def flagged(text: str) -> bool:
    tokens = words(text)
    return distinct(tokens, 3) < MIN_DISTINCT_3 or longest_run(tokens) > MAX_RUN


def side_summary(texts: list[str]) -> dict:
    tokens = [words(t) for t in texts]
    return {
        "distinct_2": statistics.mean(distinct(t, 2) for t in tokens),
        "distinct_3": statistics.mean(distinct(t, 3) for t in tokens),
        "gzip_ratio": statistics.mean(gzip_ratio(t) for t in texts),
        "flagged": sum(flagged(t) for t in texts),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("responses", nargs="+", help="responses.jsonl files written by mara-hf eval")
    args = parser.parse_args(argv)
    print("| file | side | N | flagged | distinct-2 | distinct-3 | gzip ratio |")
    print("|---|---|---|---|---|---|---|")
    for path in args.responses:
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        for side in ("base", "mara"):
            s = side_summary([r[side] for r in records])
            print(f"| {path} | {side} | {len(records)} | {s['flagged']} | {s['distinct_2']:.3f} | "
                  f"{s['distinct_3']:.3f} | {s['gzip_ratio']:.3f} |")


if __name__ == "__main__":
    main()
