"""Added after the first run: the BeaverTails batch-16 part of `packed_ab.py` alone, with more rounds.

In `packed_ab.json` that part's paired rounds put packed 5% behind repeated (median of repeated/packed 0.948) while
the two medians were equal (13.75 s / 13.79 s) and plain greedy's own rounds spread 7.65-9.76 s. This run repeats
only that part (same model, agent, prompts and variants) with `--rounds` rounds (default 7). Writes `b16_rerun.json`.

    python benchmarks/cpu/16-packed-siblings/b16_rerun.py --rounds 7 > benchmarks/cpu/16-packed-siblings/b16_rerun.log
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import common  # noqa: E402
import packed_ab  # noqa: E402


def main() -> dict:
    rounds_count, model, tokenizer, agent, base, record = common.default_agent_ab(
        "benchmarks/cpu/16-packed-siblings/b16_rerun.py", __doc__.splitlines()[0], packed_ab.TOKENS)
    inputs = common.make_batches(model, tokenizer, 16, 1, 0, 0, "cpu", "beavertails_test")
    record["generate"] = [packed_ab.generate_ab(model, agent, base, inputs, rounds_count, "beavertails b16")]
    (HERE / "b16_rerun.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
