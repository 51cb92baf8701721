"""Which of issue 11's targets each `mara-hf eval` run meets, read from its results.json.

Per run (one prompt set): the gain under the agent's card reward is at least +30 (preference rate: wins - losses
over N); degenerate answers (the `fluency` screen in results.json) are no more than the base model's + 2% of N;
KL per token to the base model is at most 1.2x that of the base model's own answers; the fallback rate (every
candidate rejected) is at most 5% of the agent's decisions. A figure the file lacks (runs written before the screen)
counts as not met and shows as "n/a".

Two more columns, not targets: the share of MARA's tokens that differ from the base model's top-1 (`changed tokens`),
and the card gain per percent of them. Over the committed runs the KL ratio follows the first (about 1.1x at 5-9%
changed tokens, 1.2-1.5x at 12-17%, 1.5-1.8x at 20-28%), so the KL target allows about 10%, and +30 within it asks about
3 points of gain per percent (`targets.log` beside this script: every committed run).

    python benchmarks/eval/targets.py benchmarks/eval/smollm2-steady/saferlhf/results.json \
        benchmarks/eval/smollm2-steady/beavertails/results.json
    python benchmarks/eval/targets.py $(find benchmarks/eval benchmarks/train -name '*results.json' | sort) \
        > benchmarks/eval/targets.log                                                        # every committed run
"""

from __future__ import annotations

import argparse
import json

CARD_REWARD = "10*vader+10*fluency"
MIN_GAIN = 30.0
DEGENERATE_MARGIN = 0.02
MAX_KL_RATIO = 1.2
MAX_FALLBACK = 0.05


def judge(results: dict, reward: str = CARD_REWARD) -> dict:
    """Each target's figure and whether it is met (`None` figures: the file lacks them, not met)."""
    n = results["n_prompts"]
    gain = results.get("rewards", {}).get(reward, {}).get("gain")
    degenerate = results.get("fluency", {}).get("degenerate")
    kl = results["kl_per_token"]
    ratio = kl["mara"] / kl["base_reference"]
    fallback = results["agent"]["fallback_rate"]
    return {
        "gain": (gain, gain is not None and gain >= MIN_GAIN),
        "degenerate": (degenerate, degenerate is not None
                       and degenerate["mara"] <= degenerate["base"] + DEGENERATE_MARGIN * n + 1e-9),
        "kl_ratio": (ratio, ratio <= MAX_KL_RATIO + 1e-9),
        "fallback": (fallback, fallback <= MAX_FALLBACK + 1e-9),
    }


def changed_share(results: dict) -> float | None:
    """Percent of MARA's tokens that differ from the base model's top-1 (None: a file written before it was kept)."""
    rate = results["agent"].get("changed_rate")
    return None if rate is None else 100 * rate


def row(path: str, verdict: dict, changed: float | None = None) -> str:
    gain, degenerate, ratio, fallback = (figure for figure, _ in verdict.values())
    cells = [
        "n/a" if gain is None else f"{gain:+.1f}",
        "n/a" if degenerate is None else f"{degenerate['mara']} / {degenerate['base']}",
        f"{ratio:.2f}x",
        f"{100 * fallback:.1f}%",
    ]
    marked = [cell + (" ✓" if met else "") for cell, (_, met) in zip(cells, verdict.values())]
    met = sum(ok for _, ok in verdict.values())
    per_changed = "n/a" if gain is None or not changed else f"{gain / changed:.2f}"
    share = "n/a" if changed is None else f"{changed:.1f}%"
    return f"| {path} | " + " | ".join(marked) + f" | {met} / 4 | {share} | {per_changed} |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files of `mara-hf eval` runs")
    parser.add_argument("--reward", default=CARD_REWARD, help=f"the card reward's name (default {CARD_REWARD!r})")
    args = parser.parse_args(argv)
    print(f"| results | {args.reward} gain (>= +{MIN_GAIN:g}) | degenerate MARA / base (<= base + "
          f"{100 * DEGENERATE_MARGIN:g}% of N) | KL / base KL (<= {MAX_KL_RATIO}x) | fallback (<= "
          f"{100 * MAX_FALLBACK:g}%) | met | changed tokens | gain per % changed |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.results:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        print(row(path, judge(results, args.reward), changed_share(results)))


if __name__ == "__main__":
    main()
