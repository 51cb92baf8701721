"""The fused loop with lm_head deferred to the commit against projecting in every chunk, in one process.

`bench_generate.py` times what users run (deferral on wherever the model allows it); this A/B switches it off for
the same model by marking it as a model whose logits are post-processed (`mara_hf.states._PLAIN_HEAD`), so both
variants run interleaved on the same machine state. SmolLM2-135M float32, one thread, the default agent, greedy,
32 new tokens; batch 1 (4 prompts one by one) and one batch of 16; a warm-up per variant, then `--rounds` rounds
(default 3) in rotated order. Writes `defer_ab.json` beside this script.

    python benchmarks/cpu/6-deferred-head/defer_ab.py --rounds 7
"""

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import torch  # noqa: E402

import common  # noqa: E402
from mara_hf import MaraStats, mara_generate  # noqa: E402
from mara_hf.states import _PLAIN_HEAD  # noqa: E402

TOKENS, VARIANTS = 32, ("plain", "deferred", "per-chunk")


def main() -> dict:
    rounds, model, tokenizer, agent, base, record = common.default_agent_ab(
        "benchmarks/cpu/6-deferred-head/defer_ab.py", __doc__.splitlines()[0], TOKENS)
    for batch_size, batches in ((1, 4), (16, 1)):
        inputs = common.make_batches(model, tokenizer, batch_size, batches, 0, 0, "cpu")

        def run(variant):
            outputs, stats = [], MaraStats(agent.top_k)
            start = time.perf_counter()
            for batch in inputs:
                if variant == "plain":
                    outputs.append(model.generate(**batch, **base))
                else:
                    _PLAIN_HEAD[model] = variant == "deferred"
                    outputs.append(model.generate(**batch, **base, custom_generate=mara_generate, mara_agent=agent,
                                                  mara_stats=stats))
            return time.perf_counter() - start, outputs, stats

        warm, timed = common.interleaved(run, VARIANTS, rounds)
        seconds = {v: [result[0] for result in timed[v]] for v in VARIANTS}
        same = all(torch.equal(a, b) for a, b in zip(warm["deferred"][1], warm["per-chunk"][1]))
        plain = statistics.median(seconds["plain"])
        result = {"batch_size": batch_size, "prompts": batch_size * batches, "identical_tokens": same,
                  "forwards_per_step": warm["deferred"][2].to_dict()["forwards"] / (TOKENS * batches)}
        for v in VARIANTS:
            med = statistics.median(seconds[v])
            result[v] = {"seconds_per_round": seconds[v], "ms_per_step": 1e3 * med / (TOKENS * batches),
                         "ratio_vs_plain": plain / med,
                         "paired_ratios": [p / s for p, s in zip(seconds["plain"], seconds[v])]}
            print(f"batch {batch_size:2d} {v:9s} {result[v]['ms_per_step']:7.1f} ms/step  "
                  f"vs plain {result[v]['ratio_vs_plain']:.3f}  rounds {[round(s, 2) for s in seconds[v]]}", flush=True)
        # The two MARA variants ran next to each other in every round: their paired ratio is the least noisy figure.
        paired = [c / d for c, d in zip(seconds["per-chunk"], seconds["deferred"])]
        result["deferred_speedup_paired"] = {"median": statistics.median(paired), "rounds": paired}
        print(f"batch {batch_size:2d} deferred vs per-chunk, paired by round: median {statistics.median(paired):.3f}x, "
              f"rounds {[round(x, 3) for x in paired]}; identical tokens: {same}", flush=True)
        record["results"].append(result)
    _PLAIN_HEAD.pop(model, None)
    (HERE / "defer_ab.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
