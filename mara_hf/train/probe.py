"""The greedy probe: what a training actor costs at inference.

A rollout *samples* the actor's decisions, while inference takes them greedily (accept when p(accept) > 0.5). An
actor trained to keep some entropy often holds accept probabilities of 0.1-0.4: a sampled walk over up to 40
candidates then almost always accepts one, while the greedy rule rejects them all and falls back. So the forced
rate of the rollouts says little about the fallback rate (and the cost) at inference. The probe decodes a fixed
set of prompts greedily with the fused loop, as `mara-hf eval` does, and reports the decision rule's statistics.
"""

from __future__ import annotations

from typing import Sequence

from .. import hf_internals as hf
from ..data import encode_chat_prompts
from ..generation import mara_generate
from ..stats import MaraStats

PROBE_METRICS = ("fallback_rate", "top1_accept_rate", "agent_decided_rate", "forwards_per_token",
                 "mean_search_length")
"""The [`MaraStats`] rates a probe reports (see `MaraStats.to_dict`)."""


def greedy_probe(model, tokenizer, actor, prompts: Sequence[str], config, eos_ids: list[int],
                 threshold: float = 0.5) -> dict[str, float]:
    """Decode `prompts` greedily with `actor` (accepting where p(accept) > `threshold`) under the candidate
    settings of `config` (a `TrainConfig`: `top_k`, `top_p`, `fallback`, `max_new_tokens`, and
    `rollout_batch_size` prompts per batch); returns `PROBE_METRICS` of the decisions and `prompts`, their
    number."""
    if not prompts:
        raise ValueError("`prompts` is empty: give the probe at least one prompt.")
    stats = MaraStats(config.top_k)
    device = hf.input_device(model)
    was_training = actor.training
    actor.eval()
    try:
        for start in range(0, len(prompts), config.rollout_batch_size):
            encoded = encode_chat_prompts(tokenizer, list(prompts[start:start + config.rollout_batch_size]), device)
            model.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=False, top_k=None, top_p=None,
                           temperature=None, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                           custom_generate=mara_generate, mara_agent=actor, mara_top_k=config.top_k,
                           mara_top_p=config.top_p, mara_fallback=config.fallback,
                           mara_accept_threshold=threshold, mara_stats=stats)
    finally:
        actor.train(was_training)
    rates = stats.to_dict()
    return {**{name: rates[name] for name in PROBE_METRICS}, "prompts": len(prompts)}
