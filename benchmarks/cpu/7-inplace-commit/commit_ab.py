"""The fused commit written over the decode step's cache entry ("in-place") against restore + append, in one run.

`bench_generate.py` times what users run (in-place wherever the cache allows it); this A/B switches it off for the
same model by dropping the kept decode-step cache after each first chunk (`DynamicSiblings.decoded`, patched here
only), so both variants run interleaved on the same machine state. SmolLM2-135M float32, one thread, the default
agent, greedy, 32 new tokens; batch 1 (4 prompts one by one) and one batch of 16; a warm-up per variant, then
`--rounds` rounds (default 3) in rotated order. Besides wall-clock seconds it records each round's process CPU
seconds and minor page faults (`getrusage`): a new cache tensor is fresh memory that the kernel maps page by page,
and the fault count does not depend on what else the machine runs. Writes `commit_ab.json` beside this script.

    python benchmarks/cpu/7-inplace-commit/commit_ab.py --rounds 5
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import torch  # noqa: E402

import common  # noqa: E402
from mara_hf import MaraStats, mara_generate  # noqa: E402
from mara_hf.states import DynamicSiblings  # noqa: E402

TOKENS, VARIANTS = 32, ("plain", "in-place", "append")
_forward = DynamicSiblings.forward


def _append_forward(self, *args, **kwargs):
    """`DynamicSiblings.forward` that keeps no decode-step cache, so `commit` restores and appends."""
    out = _forward(self, *args, **kwargs)
    self.decoded = None
    return out


def main() -> dict:
    rounds_count, model, tokenizer, agent, base, record = common.default_agent_ab(
        "benchmarks/cpu/7-inplace-commit/commit_ab.py", __doc__.splitlines()[0], TOKENS)
    for batch_size, batches in ((1, 4), (16, 1)):
        inputs = common.make_batches(model, tokenizer, batch_size, batches, 0, 0, "cpu")

        def run(variant):
            outputs, stats = [], MaraStats(agent.top_k)
            DynamicSiblings.forward = _append_forward if variant == "append" else _forward
            faults, cpu, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
            try:
                for batch in inputs:
                    if variant == "plain":
                        outputs.append(model.generate(**batch, **base))
                    else:
                        outputs.append(model.generate(**batch, **base, custom_generate=mara_generate,
                                                      mara_agent=agent, mara_stats=stats))
            finally:
                DynamicSiblings.forward = _forward
            wall = time.perf_counter() - start
            return {"wall": wall, "cpu": time.process_time() - cpu,
                    "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}, outputs, stats

        warm, timed = common.interleaved(run, VARIANTS, rounds_count)
        rounds = {v: [result[0] for result in timed[v]] for v in VARIANTS}
        same = all(torch.equal(a, b) for a, b in zip(warm["in-place"][1], warm["append"][1]))
        steps = TOKENS * batches
        plain = statistics.median(m["wall"] for m in rounds["plain"])
        result = {"batch_size": batch_size, "prompts": batch_size * batches, "identical_tokens": same,
                  "forwards_per_step": warm["in-place"][2].to_dict()["forwards"] / steps}
        for v in VARIANTS:
            wall = [m["wall"] for m in rounds[v]]
            med = statistics.median(wall)
            result[v] = {"rounds": rounds[v], "ms_per_step": 1e3 * med / steps, "ratio_vs_plain": plain / med,
                         "paired_ratios": [p["wall"] / m["wall"] for p, m in zip(rounds["plain"], rounds[v])],
                         "faults_per_step": statistics.median(m["faults"] for m in rounds[v]) / steps,
                         "cpu_ms_per_step": 1e3 * statistics.median(m["cpu"] for m in rounds[v]) / steps}
            print(f"batch {batch_size:2d} {v:8s} {result[v]['ms_per_step']:7.1f} ms/step "
                  f"(cpu {result[v]['cpu_ms_per_step']:6.1f})  vs plain {result[v]['ratio_vs_plain']:.3f}  "
                  f"faults/step {result[v]['faults_per_step']:8.0f}  rounds {[round(s, 2) for s in wall]}", flush=True)
        # The two MARA variants ran next to each other in every round: their paired ratio is the least noisy figure.
        paired = [a["wall"] / i["wall"] for a, i in zip(rounds["append"], rounds["in-place"])]
        result["in_place_speedup_paired"] = {"median": statistics.median(paired), "rounds": paired}
        print(f"batch {batch_size:2d} in-place vs append, paired by round: median {statistics.median(paired):.3f}x, "
              f"rounds {[round(x, 3) for x in paired]}; identical tokens: {same}", flush=True)
        record["results"].append(result)
    (HERE / "commit_ab.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
