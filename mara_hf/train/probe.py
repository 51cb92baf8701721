"""The greedy probe: what a training actor does and costs at inference.

A rollout *samples* the actor's decisions, while inference takes them greedily (accept when p(accept) > 0.5). An
actor trained to keep some entropy often holds accept probabilities of 0.1-0.4: a sampled walk over up to 40
candidates then almost always accepts one, while the greedy rule rejects them all and falls back. So the forced
rate of the rollouts says little about the fallback rate (and the cost) at inference. The probe decodes a fixed
set of prompts greedily with the fused loop, as `mara-hf eval` does, and reports the decision rule's statistics;
given the training reward it also scores the answers and reports the *greedy return*: the MDP's return (sentence
reward, token-level KL penalty, reject and repeat costs; `mara_hf.train.rollout`) of the policy inference runs, by
which the trainer keeps its best actor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import hf_internals as hf
from ..data import decode_answers, encode_chat_prompts, pad_token_id
from ..generation import mara_generate
from ..stats import MaraStats
from .rollout import repeated_ngrams
from .scoring import answer_scores

PROBE_METRICS = ("fallback_rate", "top1_accept_rate", "agent_decided_rate", "forwards_per_token",
                 "mean_search_length")
"""The [`MaraStats`] rates a probe reports (see `MaraStats.to_dict`)."""
SCORED_METRICS = ("kl_per_token", "rejects_per_answer", "repeat_rate", "reward", "return")
"""What a probe with the training reward adds: the per-token KL penalty `log p_base(top-1) - log p_base(taken)`
(as the rollouts' `kl_per_token`), reject decisions per answer, the share of tokens repeating a 4-gram of their
answer (as the rollouts' `repeat_rate`), the mean sentence reward and the mean greedy return
`reward - kl_coef * sum(KL penalties) - reject_cost * rejects - repeat_cost * repeats` of an answer."""


def greedy_probe(model, tokenizer, actor, prompts: Sequence[str], config, eos_ids: list[int],
                 threshold: float = 0.5, reward: Callable | None = None) -> dict[str, float]:
    """Decode `prompts` greedily with `actor` (accepting where p(accept) > `threshold`) under the candidate
    settings of `config` (a `TrainConfig`: `top_k`, `top_p`, `min_p`, `fallback`, `max_new_tokens`, and
    `rollout_batch_size` prompts per batch); returns `PROBE_METRICS` of the decisions and `prompts`, their
    number; with `reward` (the training reward, `(prompts, responses) -> scores`) also `SCORED_METRICS` under
    `config.kl_coef`, `config.reject_cost` and `config.repeat_cost`."""
    if not prompts:
        raise ValueError("`prompts` is empty: give the probe at least one prompt.")
    stats = MaraStats(config.top_k)
    device = hf.input_device(model)
    was_training = actor.training
    actor.eval()
    # tokens, KL penalties, rejects, repeats, repeats the agent decided (what the repeat cost charges), rewards
    totals = torch.zeros(6, dtype=torch.float64)
    try:
        for start in range(0, len(prompts), config.rollout_batch_size):
            batch = list(prompts[start:start + config.rollout_batch_size])
            encoded = encode_chat_prompts(tokenizer, batch, device)
            out = model.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=False, top_k=None,
                                 top_p=None, temperature=None, eos_token_id=eos_ids,
                                 pad_token_id=pad_token_id(tokenizer), custom_generate=mara_generate,
                                 mara_agent=actor, mara_top_k=config.top_k, mara_top_p=config.top_p,
                                 mara_min_p=config.min_p, mara_fallback=config.fallback,
                                 mara_accept_threshold=threshold, mara_stats=stats,
                                 return_dict_in_generate=True, output_logits=True)
            if reward is not None:
                totals += _score(out, encoded["input_ids"].shape[1], batch, tokenizer, reward, eos_ids, config)
    finally:
        actor.train(was_training)
    rates = stats.to_dict()
    probe = {**{name: rates[name] for name in PROBE_METRICS}, "prompts": len(prompts)}
    if reward is not None:
        tokens, kl, rejects, repeats, charged, rewards = totals.tolist()
        count = len(prompts)
        costs = config.kl_coef * kl + config.reject_cost * rejects + config.repeat_cost * charged
        # The return is linear in its parts, so its mean over answers is made of their means.
        probe.update(kl_per_token=kl / max(tokens, 1.0), rejects_per_answer=rejects / count,
                     repeat_rate=repeats / max(tokens, 1.0), reward=rewards / count,
                     **{"return": (rewards - costs) / count})
    return probe


def _score(out, prompt_length: int, prompts: list[str], tokenizer, reward: Callable, eos_ids: list[int],
           config) -> torch.Tensor:
    """One probe batch's sums `(tokens, KL penalties, rejects, repeats, charged repeats, sentence rewards)`
    (float64), from `out`: `mara_generate`'s output with the base model's logits of every step. A repeat is charged
    (`--repeat-cost`) where a decision took its token, as `rollout.build_transitions` charges it: a token at a
    lone-candidate position is taken without one; every repeat counts in `repeat_rate`."""
    tokens = out.sequences[:, prompt_length:]
    steps = out.mara_steps
    # Positions up to and including each row's first EOS are the answer (later ones are padding).
    eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    active = (eos.long().cumsum(dim=1) - eos.long()) == 0
    # log p(top-1) - log p(taken) = logit(top-1) - logit(taken): no softmax, and one step's logits at a time.
    penalty = torch.stack([logits.float().amax(dim=-1) - logits.float().gather(1, tokens[:, i, None]).squeeze(1)
                           for i, logits in enumerate(out.logits)], dim=1)
    # Reject decisions of a step: the candidates before the taken one; on a fallback every candidate the agent
    # could refuse (with "last" the last one is forced without a decision).
    refusable = steps["num_candidates"] - (1 if config.fallback == "last" else 0)
    rejects = torch.where(steps["fallback"], refusable, steps["index"]) * steps["asked"]
    lengths = active.sum(dim=1)  # `active` is a prefix of each row: up to and including its first EOS
    scores = answer_scores(reward, prompts, decode_answers(tokenizer, tokens, lengths))
    repeated = repeated_ngrams(tokens, lengths)
    charged = (repeated & steps["asked"].to(repeated.device)).sum()
    sums = torch.stack([active.sum(), (penalty * active).sum(), (rejects * active).sum(), repeated.sum(), charged])
    return torch.cat([sums.to("cpu", torch.float64), scores.sum()[None]])
