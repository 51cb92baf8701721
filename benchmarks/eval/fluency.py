"""How many `mara-hf eval` answers of each side look degenerate, by the screen `mara-hf eval` and the `fluency` reward
use (`mara_hf.fluency`): an answer is degenerate when its fluency is <= -0.5, i.e. when a fifth of its word trigrams
repeat earlier ones, a word or short phrase comes three times in a row ("eco-friendly, eco-friendly, eco-friendly"),
or it drifts out of the prompt's language (letters of another script, or another language's function words). It is
a screen for gross failures, not a fluency score: it misses bland or incoherent text.

    python benchmarks/eval/fluency.py benchmarks/eval/smollm2-vader/saferlhf/responses.jsonl [--reward vader]

Prints, per file, `mara-hf eval`'s own summary of the file's records: N, wins / ties / losses and gain under the
reward, per-token KL, degenerate answers of both sides and MARA's fallback rate.
"""

from __future__ import annotations

import argparse
import json

from mara_hf.evaluation import summarize


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("responses", nargs="+", help="responses.jsonl files written by mara-hf eval")
    parser.add_argument("--reward", default="vader", help="reward name inside the files (default: vader)")
    args = parser.parse_args(argv)
    for path in args.responses:
        records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        summary = summarize(records, [args.reward])
        r, kl = summary["rewards"][args.reward], summary["kl_per_token"]
        degenerate, agent = summary["fluency"]["degenerate"], summary["agent"]
        print(f"{path}: N={len(records)} {r['wins']}/{r['ties']}/{r['losses']} gain {r['gain']:+.1f}; KL/token MARA "
              f"{kl['mara']:.2f} (base {kl['base_reference']:.2f}); degenerate answers MARA {degenerate['mara']} / "
              f"base {degenerate['base']}; fallback rate {agent['fallback_rate']:.1%}")


if __name__ == "__main__":
    main()
