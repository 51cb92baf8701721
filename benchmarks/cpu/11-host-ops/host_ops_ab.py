"""What the fused loop adds to a host-bound step, now and before three cuts of its host work.

On an H100 an eager 8B decode step is bound by the host (about 8 GPU-ms of work under 38 ms of host time,
`../../gpu/h100-2026-11-27/`): what MARA adds there is host work. This A/B measures that on the CPU with
`deep-tiny-random` (Llama-3-8B's 32 layers at tiny widths, float32, one thread, random 32-token prompts; its matrix
work is negligible, so a step costs its host work), greedy, 32 new tokens, batch 1 and 16: plain greedy `generate()`
and the fused loop with the `accept-all` and `calibrated` agents (the latter rejects 30% of plain greedy's top-1),
each as it is now and as it was before (`before` variants, patched here only): the decode step sliced and gathered
its kept keys/values on every layer (`DynamicSiblings.forward` patched to do so again), ran the decision rule on its
one sibling per row and gathered its state (`keepable` and `picked_states` as used by `decide` and `states`
patched), and the `"auto"` schedule re-planned after steps 1, 2, 4 and then every 8 (`AutoSchedule._next_plan`
patched). A warm-up per variant, then
`--rounds` rounds in rotated order. Besides the times, whether the tokens are identical and, for plain greedy and
the accept-all variants, the aten ops dispatched per decode step (`common.ops_per_step`: a 17-token call less a
9-token one, over 8; the calibrated agent's count depends on which chunks the `"auto"` schedule has learnt to run by
then, so it is not counted). Writes `host_ops_ab.json` beside this script.

    python benchmarks/cpu/11-host-ops/host_ops_ab.py --rounds 7
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import torch  # noqa: E402

import common  # noqa: E402
from mara_hf import decide, mara_generate, states  # noqa: E402
from mara_hf import hf_internals as hf  # noqa: E402
from mara_hf.candidates import first_accepted  # noqa: E402
from mara_hf.schedule import AutoSchedule  # noqa: E402
from mara_hf.states import DynamicSiblings  # noqa: E402

TOKENS = 32
VARIANTS = ("plain", "accept-all", "accept-all before", "calibrated", "calibrated before")
NOW = {(DynamicSiblings, "forward"): DynamicSiblings.forward, (AutoSchedule, "_next_plan"): AutoSchedule._next_plan,
       (decide, "keepable"): decide.keepable, (decide, "picked_states"): decide.picked_states,
       (states, "picked_states"): states.picked_states}


def _gather(part, index):
    """The gather of one entry per row that the old code ran even when there was only one."""
    return part.gather(-2, index.view(-1, 1, 1, 1).expand(-1, part.shape[1], 1, part.shape[-1]))


def _gather_forward(self, tokens, position_ids, start, rows=None, *, logits="none", pick=None, keep_kv=False):
    """`DynamicSiblings.forward` as before: the decode step (one sibling for every row) sliced and gathered its
    kept entry on every layer."""
    out = NOW[DynamicSiblings, "forward"](self, tokens, position_ids, start, rows, logits=logits, pick=pick,
                                          keep_kv=keep_kv)
    if keep_kv and pick is not None and tokens.shape[1] == 1 and rows is None:
        self.kv_parts[-1] = [(_gather(k, pick.index), _gather(v, pick.index)) for k, v in hf.appended_kv(self.cache, 1)]
    return out


def _old_keepable(p_accept, thresholds, valid, target, start):
    """`candidates.keepable` as before: the decision rule also on a chunk of one sibling per row."""
    any_accepted, first = first_accepted((p_accept > thresholds) & valid)
    in_chunk = (target >= start) & (target < start + p_accept.shape[-1])
    return torch.where(any_accepted | ~in_chunk, first, (target - start).clamp(0, p_accept.shape[-1] - 1))


def _always_gather(tensor, index):
    """`states.picked_states` as before: a gather even of the only sibling."""
    return tensor.gather(1, index.view(-1, 1, 1).expand(-1, 1, tensor.shape[-1]))


def _every_8(self):
    """`AutoSchedule._next_plan` as before: after steps 1, 2, 4, then every 8."""
    return {0: 1, 1: 2, 2: 4}.get(self.steps, (self.steps // 8 + 1) * 8)


BEFORE = {(DynamicSiblings, "forward"): _gather_forward, (AutoSchedule, "_next_plan"): _every_8,
          (decide, "keepable"): _old_keepable, (decide, "picked_states"): _always_gather,
          (states, "picked_states"): _always_gather}


def _use(code):
    for (owner, name), value in code.items():
        setattr(owner, name, value)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size (default 3)")
    args = parser.parse_args()
    common.set_threads(None, "cpu")
    model, _ = common.load_model("deep-tiny-random", "cpu", torch.float32)
    record = {"command": " ".join(["python benchmarks/cpu/11-host-ops/host_ops_ab.py", *sys.argv[1:]]),
              "model": "deep-tiny-random", "max_new_tokens": TOKENS, "rounds": args.rounds,
              "environment": common.environment("cpu"), "results": []}
    for batch_size in (1, 16):
        batch = common.random_batch(model.config.vocab_size, batch_size, 32, batch_size, "cpu")
        agents = {"accept-all": common.accept_all_agent(common.hidden_size(model)),
                  "calibrated": common.calibrated_agent(model, batch)[0]}

        def call(variant, tokens=TOKENS):
            kwargs = common.base_generate_kwargs(model, tokens)
            if variant == "plain":
                return model.generate(**batch, **kwargs)
            _use(BEFORE if variant.endswith("before") else NOW)
            try:
                return model.generate(**batch, **kwargs, custom_generate=mara_generate,
                                      mara_agent=agents[variant.split()[0]])
            finally:
                _use(NOW)

        def run(variant):
            start = time.perf_counter()
            tokens = call(variant)
            return time.perf_counter() - start, tokens

        def ops_per_step(variant):
            return common.ops_per_step(lambda tokens: call(variant, tokens), short=9, long=17)

        warm, timed = common.interleaved(run, VARIANTS, args.rounds)
        seconds = {v: [t for t, _ in timed[v]] for v in VARIANTS}
        plain = statistics.median(seconds["plain"])
        result = {"batch_size": batch_size, "prompt_tokens": 32}
        for v in VARIANTS:
            med = statistics.median(seconds[v])
            result[v] = {"seconds": seconds[v], "ms_per_step": 1e3 * med / TOKENS, "ratio_vs_plain": plain / med,
                         "paired_ratios": [p / s for p, s in zip(seconds["plain"], seconds[v])],
                         "ops_per_step": None if v.startswith("calibrated") else ops_per_step(v)}
            ops = "" if result[v]["ops_per_step"] is None else f"  ops/step {result[v]['ops_per_step']:.1f}"
            print(f"batch {batch_size:2d} {v:18s} {result[v]['ms_per_step']:6.2f} ms/step  vs plain "
                  f"{result[v]['ratio_vs_plain']:.3f} (rounds {min(result[v]['paired_ratios']):.3f}-"
                  f"{max(result[v]['paired_ratios']):.3f}){ops}", flush=True)
        for agent in ("accept-all", "calibrated"):
            paired = [g / n for g, n in zip(seconds[f"{agent} before"], seconds[agent])]
            same = torch.equal(warm[agent][1], warm[f"{agent} before"][1])
            result[f"{agent} speedup_paired"] = {"median": statistics.median(paired), "rounds": paired,
                                                 "identical_tokens": same}
            print(f"batch {batch_size:2d} {agent}: now vs before, paired by round: median "
                  f"{statistics.median(paired):.3f}x, rounds {min(paired):.3f}-{max(paired):.3f}; identical tokens: "
                  f"{same}", flush=True)
        result["accept-all identical to plain"] = torch.equal(warm["plain"][1], warm["accept-all"][1])
        record["results"].append(result)
    (HERE / "host_ops_ab.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
