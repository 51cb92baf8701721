"""Sibling chunks on the key/value heads as they are ("packed") against transformers' `repeat_kv` copy, in one run.

`mara_hf.hf_internals.packed_sibling_attention` lets a chunk of several siblings attend on a grouped-query model's
key/value heads directly (its queries laid out per key/value head, as transformers' `pack_gqa` does for one token).
Without it, transformers' sdpa attention copies every layer's keys and values once per query head before each
chunk (`repeat_kv`: SmolLM2-135M has 9 query heads on 3 key/value heads). This A/B switches the packing off for
the same model (the context manager replaced by a no-op, here only), so both variants run interleaved on the same
machine state. SmolLM2-135M float32, one thread, the default agent, greedy.

1. `forwards`: one chunk of K siblings per row on a cache of C random tokens (`profile_step.make_cases`: the sibling
   mask, the forward, `lm_head` on one picked sibling per row, the cache put back), C 256 / 1024, batch 4 / 16,
   K 4 / 8; a warm-up per variant, then 7 rounds in rotated order, medians.
2. `generate`: the README's CPU protocol (`../15-other-prompts/`): BeaverTails test prompts with the chat template,
   32 new tokens, batch 1 (4 prompts one by one) and one batch of 16; plain greedy, fused packed, fused repeated.
3. `long`: the same with a long conversation: 4 of those prompts after a system message of about 950 tokens (the
   SafeRLHF test prompts 100 to 139, joined), batch 4, 32 new tokens.

Parts 2 and 3: a warm-up per variant, then `--rounds` rounds (default 3) in rotated order; ratios are medians of the
whole calls (prompt included) against plain greedy's, and both fused variants' tokens are compared. Writes
`packed_ab.json` beside this script.

    python benchmarks/cpu/16-packed-siblings/packed_ab.py --rounds 5 > benchmarks/cpu/16-packed-siblings/packed_ab.log
"""

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import torch  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import common  # noqa: E402
import profile_step  # noqa: E402
from mara_hf import MaraStats, hf_internals, mara_generate  # noqa: E402
from mara_hf.data import pad_token_id  # noqa: E402
from mara_hf.hf_internals import cache_keyword  # noqa: E402

TOKENS = 32
_packing = hf_internals.packed_sibling_attention


@contextlib.contextmanager
def packing(on: bool):
    """The library as it is (`on`), or with transformers' own sdpa attention for every chunk."""
    hf_internals.packed_sibling_attention = _packing if on else contextlib.nullcontext
    try:
        yield
    finally:
        hf_internals.packed_sibling_attention = _packing


def forwards(model, record: dict) -> None:
    vocab = model.config.vocab_size
    for context in (256, 1024):
        for batch_size in (4, 16):
            ids = torch.randint(3, vocab, (batch_size, context), generator=torch.Generator().manual_seed(context))
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
            for k in (4, 8):
                call = profile_step.make_cases(model, cache, batch_size, context, [k], "pick", "cpu", vocab, 0)[
                    f"siblings-{k}"]

                def run(variant):
                    with packing(variant == "packed"), torch.no_grad():
                        start = time.perf_counter()
                        call()
                        return time.perf_counter() - start

                _, timed = common.interleaved(run, ("packed", "repeated"), 7)
                ms = {v: 1e3 * statistics.median(t) for v, t in timed.items()}
                row = {"context": context, "batch_size": batch_size, "siblings": k,
                       **{f"{v}_ms": ms[v] for v in ms}, **{f"{v}_rounds_ms": [1e3 * t for t in timed[v]] for v in ms},
                       "speedup": ms["repeated"] / ms["packed"]}
                record["forwards"].append(row)
                print(f"forward  context {context:4d}  batch {batch_size:2d}  K {k}  packed {ms['packed']:7.1f} ms  "
                      f"repeated {ms['repeated']:7.1f} ms  x{row['speedup']:.2f}", flush=True)


def generate_ab(model, agent, base, inputs, rounds_count: int, label: str) -> dict:
    variants = ("plain", "packed", "repeated")

    def run(variant):
        outputs, stats = [], MaraStats(agent.top_k)
        with packing(variant == "packed"), torch.no_grad():
            start = time.perf_counter()
            for batch in inputs:
                if variant == "plain":
                    outputs.append(model.generate(**batch, **base))
                else:
                    outputs.append(model.generate(**batch, **base, custom_generate=mara_generate, mara_agent=agent,
                                                  mara_stats=stats))
            return time.perf_counter() - start, outputs, stats

    warm, timed = common.interleaved(run, variants, rounds_count)
    seconds = {v: [t[0] for t in timed[v]] for v in variants}
    plain = statistics.median(seconds["plain"])
    steps = TOKENS * len(inputs)
    result = {"label": label, "batch_size": inputs[0]["input_ids"].shape[0], "batches": len(inputs),
              "prompt_tokens": [int(b["input_ids"].shape[1]) for b in inputs],
              "identical_tokens": all(torch.equal(a, b) for a, b in zip(warm["packed"][1], warm["repeated"][1])),
              "forwards_per_step": warm["packed"][2].to_dict()["forwards"] / steps}
    for v in variants:
        med = statistics.median(seconds[v])
        result[v] = {"rounds_s": seconds[v], "ms_per_step": 1e3 * med / steps, "ratio_vs_plain": plain / med,
                     "paired_ratios": [p / m for p, m in zip(seconds["plain"], seconds[v])]}
        print(f"generate {label:18s} {v:8s} {result[v]['ms_per_step']:7.1f} ms/step  vs plain "
              f"{result[v]['ratio_vs_plain']:.3f}  rounds {[round(s, 2) for s in seconds[v]]}", flush=True)
    print(f"generate {label:18s} identical tokens: {result['identical_tokens']}, forwards/step "
          f"{result['forwards_per_step']:.2f}", flush=True)
    return result


def long_batch(tokenizer, count: int) -> dict:
    """`count` BeaverTails prompts after one long system message (SafeRLHF test prompts 100-139, joined), left-padded
    as `mara_hf.data.encode_chat_prompts` pads."""
    system = " ".join(common.load_prompts(140, "saferlhf_test")[100:])
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": text}],
                                           tokenize=False, add_generation_prompt=True)
             for text in common.load_prompts(count, "beavertails_test")]
    rows = [torch.tensor(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return {"input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_token_id(tokenizer), padding_side="left"),
            "attention_mask": pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")}


def main() -> dict:
    rounds_count, model, tokenizer, agent, base, record = common.default_agent_ab(
        "benchmarks/cpu/16-packed-siblings/packed_ab.py", __doc__.splitlines()[0], TOKENS)
    record.update(forwards=[], generate=[])
    forwards(model, record)
    for batch_size, batches in ((1, 4), (16, 1)):
        inputs = common.make_batches(model, tokenizer, batch_size, batches, 0, 0, "cpu", "beavertails_test")
        record["generate"].append(generate_ab(model, agent, base, inputs, rounds_count, f"beavertails b{batch_size}"))
    record["generate"].append(generate_ab(model, agent, base, [long_batch(tokenizer, 4)], rounds_count, "long b4"))
    (HERE / "packed_ab.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
