"""A crude fluency check of `mara-hf eval` answers: how many answers of each side look degenerate.

An answer counts as degenerate when one word trigram occurs 3 or more times in it (loops such as "and highly
effective and highly ...") or when more than 10% of its characters are non-ASCII (SmolLM2 drifting into
pseudo-Polish and similar). It is a screen for gross failures, not a fluency score: it misses bland or
incoherent text and flags legitimate lists.

    python benchmarks/eval/fluency.py benchmarks/eval/smollm2-vader/saferlhf/responses.jsonl [--reward vader]

Prints, per file: N, wins / ties / losses and gain under the reward (from the file's own scores), per-token
KL (-log p_base) of both sides, and the degenerate answers of both sides.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def degenerate(text: str) -> bool:
    words = text.split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    loops = max(trigrams.values(), default=0) >= 3
    foreign = sum(ord(ch) > 127 for ch in text) > 0.1 * max(len(text), 1)
    return loops or foreign


def summarize(path: str, reward: str = "vader") -> dict:
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    wins = sum(r["rewards"]["mara"][reward] > r["rewards"]["base"][reward] for r in records)
    losses = sum(r["rewards"]["mara"][reward] < r["rewards"]["base"][reward] for r in records)
    kl = {side: sum(r["nll_sum"][side] for r in records) / sum(r["tokens"][side] for r in records)
          for side in ("base", "mara")}
    return {
        "file": path,
        "n": len(records),
        "wins": wins,
        "ties": len(records) - wins - losses,
        "losses": losses,
        "gain": 100 * (wins - losses) / len(records),
        "kl_per_token": kl,
        "degenerate": {side: sum(degenerate(r[side]) for r in records) for side in ("base", "mara")},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("responses", nargs="+", help="responses.jsonl files written by mara-hf eval")
    parser.add_argument("--reward", default="vader", help="reward name inside the files (default: vader)")
    args = parser.parse_args(argv)
    for path in args.responses:
        s = summarize(path, args.reward)
        print(f"{path}: N={s['n']} {s['wins']}/{s['ties']}/{s['losses']} gain {s['gain']:+.1f}; KL/token MARA "
              f"{s['kl_per_token']['mara']:.2f} (base {s['kl_per_token']['base']:.2f}); degenerate answers MARA "
              f"{s['degenerate']['mara']} / base {s['degenerate']['base']}")


if __name__ == "__main__":
    main()
