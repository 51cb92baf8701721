"""A crude fluency check of `mara-hf eval` answers: how many answers of each side look degenerate.

An answer counts as degenerate when one word trigram occurs 3 or more times in it (loops such as "and highly
effective and highly ...") or when more than 10% of its characters are non-ASCII (SmolLM2 drifting into
pseudo-Polish and similar). It is a screen for gross failures, not a fluency score: it misses bland or
incoherent text and flags legitimate lists.

    python benchmarks/eval/fluency.py benchmarks/eval/smollm2-vader/saferlhf/responses.jsonl [--reward vader]

Prints, per file: N, wins / ties / losses and gain under the reward and per-token KL (`mara-hf eval`'s own
summary of the file's records), and the degenerate answers of both sides.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from mara_hf.evaluation import summarize


def degenerate(text: str) -> bool:
    words = text.split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    loops = max(trigrams.values(), default=0) >= 3
    foreign = sum(ord(ch) > 127 for ch in text) > 0.1 * max(len(text), 1)
    return loops or foreign


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("responses", nargs="+", help="responses.jsonl files written by mara-hf eval")
    parser.add_argument("--reward", default="vader", help="reward name inside the files (default: vader)")
    args = parser.parse_args(argv)
    for path in args.responses:
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        summary = summarize(records, [args.reward])
        r, kl = summary["rewards"][args.reward], summary["kl_per_token"]
        flagged = {side: sum(degenerate(record[side]) for record in records) for side in ("base", "mara")}
        print(f"{path}: N={len(records)} {r['wins']}/{r['ties']}/{r['losses']} gain {r['gain']:+.1f}; KL/token MARA "
              f"{kl['mara']:.2f} (base {kl['base_reference']:.2f}); degenerate answers MARA {flagged['mara']} / "
              f"base {flagged['base']}")


if __name__ == "__main__":
    main()
