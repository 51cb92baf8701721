"""The summary of an evaluation's records: per reward, MARA against the base model (means, wins / ties / losses,
preference rate, gain); per-token KL to the base model; the agent's decisions and decoding cost; degenerate answers
of both sides; speed. Each measure's definition is recorded next to it."""

from __future__ import annotations

import math

from ..fluency import FLUENCY_DEFINITION, degenerate_summary

KL_DEFINITION = (
    "Mean over generated tokens of -log p_base(y_t | prompt, y_<t), in nats, from a teacher-forced forward of the "
    "base model (raw next-token distribution, no warpers) on prompt + response; EOS counts, padding does not. "
    "For MARA's greedy tokens this is the per-token KL(delta_y || p_base) of its deterministic output; "
    "'base_reference' is the same quantity for the base model's own output. With sampling it is the cross-"
    "entropy of the samples under the base model, not a KL."
)
COST_DEFINITION = (
    "MARA's decoding cost, from the fused loop's own counts (MaraStats). forwards: model forwards of the decode "
    "steps (each evaluates one chunk of candidates; the first chunk of a step is also its greedy forward, so plain "
    "greedy decoding runs 1 per step). forwards_per_step = forwards / decode steps (1.0 = no step needed a second "
    "chunk); forwards_per_token = forwards / MARA's generated tokens (MaraStats.forwards / MaraStats.tokens; at batch "
    "size B plain greedy runs about 1 / B). A batch's forwards and steps are shared equally by its prompts. "
    "fallback_rate = agent decisions where every candidate was rejected and the fallback token was taken / agent "
    "decisions (tokens with more than one candidate)."
)


# Sums of floats use `math.fsum` (correctly rounded): the built-in `sum` adds floats with compensation since Python
# 3.12, so its last bits, and a summary's, would depend on the Python version.


def mean(values) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _std(values) -> float | None:
    if len(values) < 2:
        return 0.0 if values else None
    average = mean(values)
    return math.sqrt(math.fsum((v - average) ** 2 for v in values) / (len(values) - 1))


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if denominator else None


def summarize(records: list[dict], reward_names: list[str], *, top_k: int = 40, tie_tolerance: float = 0.0) -> dict:
    """The summary of response records (see [`mara_hf.evaluation.evaluate`] for the fields)."""
    n = len(records)
    rewards = {}
    for name in reward_names:
        base = [r["rewards"]["base"][name] for r in records]
        mara = [r["rewards"]["mara"][name] for r in records]
        wins = sum(1 for r, b, m in zip(records, base, mara) if r["mara"] != r["base"] and m - b > tie_tolerance)
        losses = sum(1 for r, b, m in zip(records, base, mara) if r["mara"] != r["base"] and b - m > tie_tolerance)
        ties = n - wins - losses
        rewards[name] = {
            "mean_base": mean(base),
            "mean_mara": mean(mara),
            "std_base": _std(base),
            "std_mara": _std(mara),
            "mean_difference": mean([m - b for b, m in zip(base, mara)]),
            "wins": wins,
            "ties": ties,
            "losses": losses,
            "preference_rate": 100.0 * wins / n if n else None,
            "gain": 100.0 * (wins - losses) / n if n else None,
        }

    tokens_base = sum(r["tokens"]["base"] for r in records)
    tokens_mara = sum(r["tokens"]["mara"] for r in records)
    seconds_base = math.fsum(r["seconds"]["base"] for r in records)
    seconds_mara = math.fsum(r["seconds"]["mara"] for r in records)

    histogram = [0] * top_k
    for record in records:
        for index, count in record["agent"]["accepted_index"].items():
            index = int(index)
            histogram.extend([0] * (index + 1 - len(histogram)))
            histogram[index] += count
    decided = sum(r["agent"]["agent_decided"] for r in records)
    fallbacks = sum(r["agent"]["fallbacks"] for r in records)
    agent_tokens = sum(r["agent"]["tokens"] for r in records)
    changed = sum(len(r["changed"]) for r in records)
    costed = [r for r in records if "batch" in r]  # files written before the cost was recorded lack it
    forwards = math.fsum(r["batch"]["forwards"] / r["batch"]["rows"] for r in costed) if costed else None
    steps = math.fsum(r["batch"]["steps"] / r["batch"]["rows"] for r in costed) if costed else None
    costed_tokens = sum(r["agent"]["tokens"] for r in costed)
    screened = {side: degenerate_summary([r["prompt"] for r in records], [r[side] for r in records])
                for side in ("base", "mara")}
    return {
        "n_prompts": n,
        "rewards": rewards,
        "kl_per_token": {
            "mara": _ratio(math.fsum(r["nll_sum"]["mara"] for r in records), tokens_mara),
            "base_reference": _ratio(math.fsum(r["nll_sum"]["base"] for r in records), tokens_base),
            "definition": KL_DEFINITION,
        },
        "agent": {
            "tokens": agent_tokens,
            "agent_decided": decided,
            "fallbacks": fallbacks,
            "accepted_index_histogram": histogram,
            "agent_decided_rate": _ratio(decided, agent_tokens),
            "fallback_rate": _ratio(fallbacks, decided),
            "top1_accept_rate": _ratio(histogram[0], decided),
            "changed_tokens": changed,
            "changed_rate": _ratio(changed, agent_tokens),
            "answers_changed": sum(1 for r in records if r["mara"] != r["base"]),
            "forwards": forwards,
            "decode_steps": steps,
            "forwards_per_step": _ratio(forwards, steps) if costed else None,
            "forwards_per_token": _ratio(forwards, costed_tokens) if costed else None,
            "cost_prompts": len(costed),
            "cost_definition": COST_DEFINITION,
        },
        "fluency": {
            "degenerate": {side: s["count"] for side, s in screened.items()},
            "degenerate_rate": {side: s["rate"] for side, s in screened.items()},
            "mean_fluency": {side: s["mean_fluency"] for side, s in screened.items()},
            "definition": FLUENCY_DEFINITION,
        },
        "speed": {
            "base_tokens": tokens_base,
            "mara_tokens": tokens_mara,
            "base_seconds": seconds_base,
            "mara_seconds": seconds_mara,
            "base_tokens_per_s": _ratio(tokens_base, seconds_base),
            "mara_tokens_per_s": _ratio(tokens_mara, seconds_mara),
        },
        "mean_tokens": {"base": _ratio(tokens_base, n), "mara": _ratio(tokens_mara, n)},
    }
