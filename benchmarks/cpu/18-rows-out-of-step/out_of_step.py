r"""How many forwards a fused loop whose rows run out of step would run at batch 16, counted from the lockstep loop's
own decisions, and what its decode step would cost by a cost model fitted in the same process (`plan.txt`).

Greedy decisions do not depend on timing: each row's tokens and search lengths would be the lockstep loop's. So the
lockstep loop decodes once with `return_dict_in_generate` (its `"auto"` schedule's boundaries recorded per step), and
both loops are counted from those traces:

- lockstep (as `mara_hf.decide.evaluate_step` runs a fused step): a first chunk for every row, then each
  chunk `[b, e)` of the step's boundaries for the rows still looking (search length `l > b`), each padded to the
  widest of them (`min(e, n) - b`, `n` the row's candidate count); the count is checked against the forwards the
  loop itself reported.
- out of step: each row's actions in sequence (its top-1, then its chunks while `l > b`, each `min(e, n) - b` wide);
  forward `f` holds action `f` of every row that has one, unpadded (one flat forward).

A forward of `T` tokens is modelled as `F + g * T` (least squares over later-chunk forwards of a few shapes, timed on
the prompts' cache), plus `h` per row projected by lm_head (the same for both loops: one projection per row and step).
Plain greedy's decode forward at batch 16 is timed beside them, so the modelled ratio is against it.

    python benchmarks/cpu/18-rows-out-of-step/out_of_step.py --rounds 5 \
      > benchmarks/cpu/18-rows-out-of-step/out_of_step.log
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import common  # noqa: E402
from mara_hf import mara_generate  # noqa: E402
from mara_hf.hf_internals import DynamicSnapshot  # noqa: E402
from mara_hf.schedule import make_schedule  # noqa: E402
from mara_hf.states import DynamicSiblings, cache_keyword  # noqa: E402
from mara_hf.stats import search_lengths  # noqa: E402
from profile_step import Timer  # noqa: E402

SETS = ("saferlhf_test", "beavertails_test", "hhrlhf_test")
BATCH, TOKENS = 16, 32
CHUNK_SHAPES = ((4, 2), (4, 8), (8, 4), (16, 4), (16, 8))  # (rows, siblings per row) of the timed later chunks


def traces(model, agent, inputs, base):
    """Per step: the boundaries `"auto"` used, and per row the search length `l` and candidate count `n`; plus the
    forwards the loop reported per step."""
    # A warm-up call first: "auto" remembers what it saw, as before the timed rounds of bench_generate.py.
    model.generate(**inputs, **base, custom_generate=mara_generate, mara_agent=agent)
    schedule = make_schedule("auto", device="cpu", batch_size=BATCH, width=agent.top_k, agent=agent, model=model)
    used, current = [], schedule.current
    schedule.current = lambda: used.append(current()) or used[-1]
    out = model.generate(**inputs, **base, custom_generate=mara_generate, mara_agent=agent, mara_schedule=schedule,
                         return_dict_in_generate=True)
    steps = out.mara_steps
    n = steps["num_candidates"]
    length = search_lengths(steps["index"], steps["fallback"], steps["asked"], n)
    return used, length.T.tolist(), n.T.tolist(), steps["forwards"].tolist()  # lists per step, then per row


def chunks(bounds, width: int):
    """`[(b, e), ...]` of a step's boundaries, ending at `width`."""
    ends = [min(e, width) for e in bounds] + ([width] if bounds[-1] < width else [])
    return list(zip([0] + ends[:-1], ends))


def lockstep(used, lengths, counts, width):
    """Per step, the token count of each forward the lockstep loop runs."""
    per_step = []
    for bounds, l_row, n_row in zip(used, lengths, counts):
        # The first chunk runs for every row: the top-1 alone (the decode step), or cut at the largest count.
        first = 1 if bounds[0] == 1 else min(bounds[0], max(n_row))
        forwards = [len(l_row) * first]
        for b, e in chunks(bounds, width)[1:]:
            need = [n for l, n in zip(l_row, n_row) if l > b]
            if not need:
                break
            forwards.append(len(need) * (min(e, max(need)) - b))
        per_step.append(forwards)
    return per_step


def out_of_step(used, lengths, counts, width):
    """The token count of each forward when every forward takes the next action of each row, and each row's number
    of actions (the slowest row sets the number of forwards)."""
    actions = [[] for _ in lengths[0]]
    for bounds, l_row, n_row in zip(used, lengths, counts):
        for row, (l, n) in enumerate(zip(l_row, n_row)):
            actions[row].append(min(bounds[0], n))
            actions[row].extend(min(e, n) - b for b, e in chunks(bounds, width)[1:] if l > b)
    longest = max(len(a) for a in actions)
    return [sum(a[f] for a in actions if f < len(a)) for f in range(longest)], sorted(len(a) for a in actions)


def timed_cases(model, inputs):
    """name -> a call running one forward on the prompts' cache and putting it back."""
    cache = DynamicCache(config=model.config)
    mask = inputs["attention_mask"]
    model(**inputs, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    positions = mask.sum(-1, keepdim=True)
    tokens = torch.randint(3, model.config.vocab_size, (BATCH, 8), generator=torch.Generator().manual_seed(0))
    states = torch.randn(BATCH, 1, model.config.hidden_size)
    head = model.get_output_embeddings()
    full_mask = torch.cat([mask, mask.new_ones(BATCH, 1)], dim=-1)

    def plain_decode():
        snapshot = DynamicSnapshot(cache)
        model(input_ids=tokens[:, :1], attention_mask=full_mask, position_ids=positions, use_cache=True,
              **{cache_keyword(model): cache})
        snapshot.restore()

    def chunk(rows, k):
        picked = torch.arange(rows) if rows < BATCH else None

        def call():
            siblings = DynamicSiblings(model, cache, mask)
            at = slice(None) if picked is None else picked
            siblings.forward(tokens[at, :k], positions[at], 1, picked, logits="none")
            siblings.restore()
        return call

    cases = {"plain decode, 16 x 1": plain_decode, "lm_head, 16 rows": lambda: head(states)}
    cases.update({f"chunk {r} x {k}": chunk(r, k) for r, k in CHUNK_SHAPES})
    return cases


def fit(medians: dict) -> tuple[float, float]:
    """`F, g` (ms, ms per token) of `F + g * T` over the chunk timings."""
    xs = [r * k for r, k in CHUNK_SHAPES]
    ys = [medians[f"chunk {r} x {k}"] for r, k in CHUNK_SHAPES]
    g, big_f = statistics.linear_regression(xs, ys)
    return big_f, g


@torch.no_grad()
def main() -> dict:
    rounds, model, tokenizer, agent, base, record = common.default_agent_ab(
        "benchmarks/cpu/18-rows-out-of-step/out_of_step.py", __doc__.splitlines()[0], TOKENS)
    record["batch_size"] = BATCH
    timer = Timer("cpu")
    print(record["command"])
    for name in SETS:
        inputs = common.make_batches(model, tokenizer, BATCH, 1, 0, 0, "cpu", name)[0]
        used, lengths, counts, reported = traces(model, agent, inputs, base)
        lock = lockstep(used, lengths, counts, agent.top_k)
        if [len(f) for f in lock] != reported:
            raise SystemExit(f"{name}: the lockstep count ({[len(f) for f in lock]}) differs from the forwards the "
                             f"loop reported ({reported}).")
        flat, row_actions = out_of_step(used, lengths, counts, agent.top_k)
        cases = timed_cases(model, inputs)
        _, timed = common.interleaved(lambda case: timer(cases[case]), tuple(cases), rounds)
        medians = {case: 1e3 * statistics.median(values) for case, values in timed.items()}
        big_f, g = fit(medians)
        h = medians["lm_head, 16 rows"]
        steps = len(lock)
        lock_ms = (sum(big_f + g * t for f in lock for t in f) + h * steps) / steps
        flat_ms = (sum(big_f + g * t for t in flat) + h * steps) / steps
        plain_ms = medians["plain decode, 16 x 1"]
        result = {
            "prompts": name, "steps": steps, "boundaries_used": sorted({tuple(b) for b in used}),
            "lockstep": {"forwards_per_step": sum(map(len, lock)) / steps,
                         "tokens_per_step": sum(map(sum, lock)) / steps, "modelled_ms_per_step": lock_ms},
            "out_of_step": {"forwards_per_step": len(flat) / steps, "tokens_per_step": sum(flat) / steps,
                            "modelled_ms_per_step": flat_ms, "actions_per_row": row_actions},
            "timed_ms": {case: {"median": m, "min": 1e3 * min(timed[case]), "max": 1e3 * max(timed[case])}
                         for case, m in medians.items()},
            "fit": {"F_ms": big_f, "g_ms_per_token": g, "h_ms_lm_head_16_rows": h},
            "plain_decode_ms": plain_ms,
            "modelled_ratio_vs_plain": {"lockstep": plain_ms / lock_ms, "out_of_step": plain_ms / flat_ms},
        }
        record["results"].append(result)
        print(f"\n{name}: boundaries used {result['boundaries_used']}")
        for case, m in medians.items():
            print(f"  {case:22s} {m:8.1f} ms (min {1e3 * min(timed[case]):.1f}, max {1e3 * max(timed[case]):.1f})")
        print(f"  actions per row, out of step (sorted): {row_actions}")
        print(f"  fit: F = {big_f:.1f} ms, g = {g:.2f} ms per token; lm_head h = {h:.1f} ms per 16 rows")
        for loop in ("lockstep", "out_of_step"):
            r = result[loop]
            print(f"  {loop:12s} forwards/step {r['forwards_per_step']:.2f}, tokens/step {r['tokens_per_step']:.1f}, "
                  f"modelled {r['modelled_ms_per_step']:.1f} ms/step, "
                  f"{result['modelled_ratio_vs_plain'][loop]:.3f}x of plain's decode forward ({plain_ms:.1f} ms)")
    common.write_json(HERE / "out_of_step.json", record)
    return record


if __name__ == "__main__":
    main()
