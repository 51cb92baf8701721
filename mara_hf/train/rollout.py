"""Training rollouts: the paper's accept/reject MDP, played by the actor over a batch of prompts.

At position i the candidates t_1..t_n are the inference candidate set (top-k, then top-p, most probable first).
The state of t_k is its faithful state (the final hidden state at t_k's own position). The actor samples
accept/reject for t_1, t_2, ... in order: **reject** moves to t_{k+1} (same position); **accept** appends t_k and
moves to the first candidate of position i+1. When every candidate the agent may refuse is rejected, the fallback
token is taken without a decision (`"last"`: t_n is *forced*, the paper's MDP; `"first"`: the top-1, the released
evaluation rule, after t_1..t_n were all rejected). A lone candidate is taken without a decision, as at inference.
An episode ends at EOS or after `max_new_tokens` tokens.

Rollouts run through the same step as inference (`decide.evaluate_step`, lazy chunks, fused commit): sampling the
actor is "accept when p(accept) > u" with one uniform `u` per candidate, so a step whose top-1 is accepted by
every row costs one one-token forward, exactly like greedy MARA decoding.

Every decision is an *event* with its state and action. `build_transitions` turns the events of a rollout into
replay transitions `(s, a, r, s', done)`:

- `s'` is the state of the row's next event; the row's last event has `done = True` (and `s' = 0`);
- `advances` marks the transitions across which a token was taken (an accept, the last reject before a forced or
  fallback token, the row's last event), for `SACConfig.discount="token"`;
- the terminal (sentence-level) reward is added once, to the row's last event, and is never bootstrapped past it;
- the token-level KL penalty of a position, `kl_coef * (log p_base(t_1) - log p_base(taken))`, is added to the
  event that chose the token (the accept, or the last reject before a forced / fallback token);
- with `reject_cost > 0` every reject decision pays that cost (a compute-aware MDP: rejecting candidates costs
  sibling forwards at inference, and rejecting all of them changes nothing with the "first" fallback); the
  paper's MDP has none (0, the default);
- with `repeat_cost > 0` the event that chose a token pays that cost when the token completes a token 4-gram the
  answer already holds ([`repeated_ngrams`]): a loop pays at every token of it, on the decision that made it,
  where a sentence-level fluency score pays once at the end (0, the default: the paper's MDP);
- a row whose states hold a NaN or inf is dropped whole, so transitions and rewards cannot shift.

With `deployed_share > 0` that share of the episodes (drawn per row) decide as the agent will at inference: accept
where p(accept) > `deployed_threshold`, the same rule with one fixed threshold instead of uniform ones. SAC learns
off-policy, so their transitions go into the buffer like the others; they show the critic the states, loops and
fallbacks that the thresholded agent meets, which sampled episodes may never reach.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from transformers import DynamicCache

from .. import hf_internals as hf
from ..decide import evaluate_step
from ..schedule import LAZY_SCHEDULE
from ..states import HeadInput, cache_keyword, check_cache, check_model, next_position_ids, plain_head
from .buffer import Batch


@dataclass
class Rollout:
    """The decisions of one batched rollout; events are ordered by (row, position, candidate).

    Attributes:
        states (`(E, d)`): faithful state of each event's candidate.
        rows, positions, candidates, actions (`(E,)` long): the event's prompt row, generated position, candidate
            index (0 = top-1) and action (1 = accept, 0 = reject).
        penalties (`(E,)` float): the per-token KL `log p_base(t_1) - log p_base(taken)` of the event's position
            on the event that chose the token, 0 on the other events.
        tokens (`(B, T)` long): the generated tokens (padding after EOS).
        lengths (`(B,)` long): generated tokens per row, EOS included.
        kl (`(B, T)` float): per-token KL penalty (0 after the end).
        taken_index (`(B, T)` long): index of the taken candidate (0 = top-1).
        asked (`(B, T)` bool): the agent decided the token (more than one candidate).
        forced (`(B, T)` bool): every candidate the agent could refuse was rejected; the fallback token was taken.
        finite (`(B,)` bool): every state of the row was finite (rows with a NaN/inf state give no transitions).
        deployed (`(B,)` bool): the row decided by the deployed rule instead of sampling (`deployed_share`).
    """

    states: torch.Tensor
    rows: torch.LongTensor
    positions: torch.LongTensor
    candidates: torch.LongTensor
    actions: torch.LongTensor
    penalties: torch.Tensor
    tokens: torch.LongTensor
    lengths: torch.LongTensor
    kl: torch.Tensor
    taken_index: torch.LongTensor
    asked: torch.BoolTensor
    forced: torch.BoolTensor
    finite: torch.BoolTensor
    deployed: torch.BoolTensor | None = None

    @cached_property
    def repeated(self) -> torch.BoolTensor:
        """`(B, T)`: generated tokens that repeat a 4-gram of their answer ([`repeated_ngrams`]), computed once."""
        return repeated_ngrams(self.tokens, self.lengths)

    @property
    def active(self) -> torch.BoolTensor:
        """`(B, T)`: positions before each row's end."""
        return torch.arange(self.tokens.shape[1], device=self.lengths.device)[None, :] < self.lengths[:, None]

    def totals(self) -> dict[str, float]:
        """The sums and counts the metrics are ratios of (see [`rollout_metrics`]); totals of several rollouts
        (e.g. the shards of one batch, rolled out by different workers) add up key by key."""
        active = self.active
        return {
            "rows": float(self.lengths.shape[0]),
            "tokens": float(active.sum()),
            "decisions": float(len(self.actions)),
            "accepts": float(self.actions.sum()),
            "asked": float((self.asked & active).sum()),
            "forced": float((self.forced & active).sum()),
            "changed": float(((self.taken_index > 0) & active).sum()),
            "kl": float((self.kl * active).sum()),
            "repeats": float(self.repeated.sum()),
            "dropped_rows": float((~self.finite).sum()),
            "deployed_rows": float(self.deployed.sum()) if self.deployed is not None else 0.0,
        }

    def metrics(self) -> dict[str, float]:
        """Acceptance rate over events, forced rate over decided tokens, changed rate and KL per token."""
        return rollout_metrics(self.totals())


def rollout_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The metrics of [`Rollout.totals`] (of one rollout, or summed over several): mean answer length, decisions,
    acceptance rate over decisions, forced rate over decided tokens, changed rate, KL per token, the share of
    tokens that repeat an earlier 4-gram of their answer ([`repeated_ngrams`]), dropped rows, rows that decided by
    the deployed rule (`deployed_share`)."""
    tokens = max(totals["tokens"], 1.0)
    return {
        "response_tokens": totals["tokens"] / max(totals["rows"], 1.0),
        "decisions": totals["decisions"],
        "accept_rate": totals["accepts"] / totals["decisions"] if totals["decisions"] else 0.0,
        "forced_rate": totals["forced"] / max(totals["asked"], 1.0),
        "changed_rate": totals["changed"] / tokens,
        "kl_per_token": totals["kl"] / tokens,
        "repeat_rate": totals["repeats"] / tokens,
        "dropped_rows": totals["dropped_rows"],
        "deployed_rows": totals.get("deployed_rows", 0.0),
    }


def step_events(candidate_logprobs, accepted, counts, index, asked, fallback: str):
    """The decision events of one step (vectorised over rows and candidates).

    Args:
        candidate_logprobs: `(B, W)` base log-probabilities of the candidates (W >= evaluated width).
        accepted: `(B, w)` the actor's sampled accept flags of the evaluated candidates.
        counts: `(B,)` candidate set sizes; `index`: `(B,)` the taken candidate (the first accepted one, as
            `evaluate_step` decides); `asked`: `(B,)` more than one candidate.
        fallback: `"last"` (t_n is forced, never decided) or `"first"`.

    Returns `(events, actions, chooser, forced, penalty)`: `events` `(B, w)` the candidates the actor decided,
    `actions` `(B, w)` 1 where it accepted, `chooser` `(B, w)` the event that chose the token, `forced` `(B,)`,
    `penalty` `(B,)` = `log p(t_1) - log p(taken)`.
    """
    width = accepted.shape[1]
    slots = torch.arange(width, device=accepted.device)[None, :]
    refusable = counts - 1 if fallback == "last" else counts  # the candidates the actor may decide
    by_agent = (accepted & (slots < refusable[:, None])).any(dim=-1)  # then `index` is the first accepted one
    end = torch.where(by_agent, index + 1, refusable)  # events are candidates 0 .. end-1
    events = (slots < end[:, None]) & asked[:, None]
    actions = (slots == index[:, None]) & by_agent[:, None] & events
    chooser = (slots == (end - 1)[:, None]) & events
    penalty = candidate_logprobs[:, 0] - candidate_logprobs.gather(1, index[:, None]).squeeze(1)
    return events, actions.long(), chooser, asked & ~by_agent, penalty


@torch.no_grad()
def rollout(
    model,
    actor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | Sequence[torch.Generator],
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.0,
    fallback: str = "last",
    schedule: tuple[int, ...] = LAZY_SCHEDULE,
    deployed_share: float = 0.0,
    deployed_threshold: float = 0.5,
) -> Rollout:
    """Play the MDP on a left-padded batch of prompts; the actor's decisions are sampled with `generator` (CPU): one
    generator for the batch, or one per row (see [`row_generators`]), which makes each row's episode independent of
    the rows beside it, so a batch split into shards gives the same episodes. With `deployed_share > 0` each row
    decides by the deployed rule (p(accept) > `deployed_threshold`) instead with that probability, drawn from its
    generator once per episode (no draw at 0, so earlier runs' episodes are unchanged).

    The model is only read (its cache is a fresh `DynamicCache`); the actor is only evaluated.
    """
    check_model(model)
    batch, device = input_ids.shape[0], input_ids.device
    per_row = not isinstance(generator, torch.Generator)
    if per_row and len(generator) != batch:
        raise ValueError(f"`generator` has to be one generator or one per row ({batch}), but {len(generator)} "
                         "were given.")
    cache = DynamicCache(config=model.config)
    check_cache(cache)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with HeadInput(model) as head_input:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    **{cache_keyword(model): cache}, use_cache=True, **kwargs)
    logits = out.logits[:, -1].float()
    defer_head = plain_head(model, head_input.states, out.logits)  # as the fused loop does
    del out
    mask = attention_mask
    eos = torch.tensor(eos_token_ids, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    per_step = {key: [] for key in ("tokens", "active", "kl", "taken_index", "asked", "forced")}
    events = {key: [] for key in ("states", "rows", "positions", "candidates", "actions", "penalties")}
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    if per_row:  # each row's thresholds for the whole episode, drawn once (no loop over rows at every step)
        episode_thresholds = torch.stack([torch.rand((max_new_tokens, top_k), generator=g) for g in generator], dim=1)
        episode_thresholds = episode_thresholds.to(device, non_blocking=True)
    deployed = torch.zeros(batch, dtype=torch.bool)  # rows deciding by the deployed rule, drawn once per episode
    if deployed_share > 0 and per_row:
        deployed = torch.stack([torch.rand((), generator=g) for g in generator]) < deployed_share
    elif deployed_share > 0:
        deployed = torch.rand(batch, generator=generator) < deployed_share
    deployed = deployed.to(device)

    with hf.decode_context(model):  # as `generate` and `mara_generate` decode
        for position in range(max_new_tokens):
            if per_row:
                thresholds = episode_thresholds[position]
            else:
                thresholds = torch.rand((batch, top_k), generator=generator).to(device, non_blocking=True)
            if deployed_share > 0:
                thresholds = torch.where(deployed[:, None], deployed_threshold, thresholds)
            step = evaluate_step(
                model, actor, cache, logits, next_position_ids(None, mask, cache.get_seq_length(), batch, device), mask,
                top_k=top_k, top_p=top_p, min_p=min_p, fallback=fallback, schedule=schedule, lazy=True, for_commit=True,
                thresholds=thresholds, keep_states=True, defer_head=defer_head, active=unfinished,
            )
            decision = step.decision
            next_logits = step.logits_parts[0][:, 0] if step.committed else step.commit(decision.index)
            width = step.evaluated_width
            is_event, actions, chooser, forced, penalty = step_events(
                step.candidates.logprobs, step.accepted[:, :width], step.candidates.counts, decision.index,
                decision.asked, fallback,
            )
            is_event &= unfinished[:, None]
            states = step.states
            finite &= ~(is_event & ~torch.isfinite(states).all(dim=-1)).any(dim=-1)
            rows, candidates = is_event.nonzero(as_tuple=True)
            events["states"].append(states[rows, candidates])
            events["rows"].append(rows)
            events["positions"].append(torch.full_like(rows, position))
            events["candidates"].append(candidates)
            events["actions"].append(actions[rows, candidates])
            events["penalties"].append(torch.where(chooser[rows, candidates], penalty[rows], 0.0))

            tokens = torch.where(unfinished, decision.token, pad_token_id)
            per_step["tokens"].append(tokens)
            per_step["active"].append(unfinished)
            per_step["kl"].append(torch.where(unfinished, penalty, 0.0))
            per_step["taken_index"].append(decision.index)
            per_step["asked"].append(decision.asked & unfinished)
            per_step["forced"].append(forced & unfinished)
            unfinished = unfinished & ~torch.isin(tokens, eos)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            if not unfinished.any():
                break
            logits = next_logits.float()

    order = torch.sort(torch.cat(events["rows"]), stable=True).indices  # (row, position, candidate) order
    flat = {key: torch.cat(values)[order] for key, values in events.items()}
    stacked = {key: torch.stack(values, dim=1) for key, values in per_step.items()}
    return Rollout(
        **flat,
        tokens=stacked["tokens"],
        lengths=stacked["active"].long().sum(dim=1),
        kl=stacked["kl"],
        taken_index=stacked["taken_index"],
        asked=stacked["asked"],
        forced=stacked["forced"],
        finite=finite,
        deployed=deployed,
    )


def row_generators(seed: int, iteration: int, rows: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row of an iteration's rollout batch, seeded by `(seed, iteration, row)` alone: a row's
    decisions do not depend on how the batch is split (one process, or shards on several workers), and a shard
    rolled out again (a worker died) draws the same thresholds.

    ```python
    >>> import torch
    >>> a, b = row_generators(0, 3, [5, 6])
    >>> bool(torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=row_generators(0, 3, [5])[0])))
    True

    ```
    """
    generators = []
    for row in rows:
        digest = hashlib.blake2b(f"mara-hf rollout {seed} {iteration} {row}".encode(), digest_size=8).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
    return generators


REPEAT_NGRAM = 4
"""Token n-grams that `repeat_cost` and the `repeat_rate` metric look at: 4-grams repeat in loops, seldom in fluent
answers (trigrams do: "one of the", list markers)."""


def repeated_ngrams(tokens: torch.LongTensor, lengths: torch.LongTensor, n: int = REPEAT_NGRAM) -> torch.BoolTensor:
    """`(B, T)`: True at position t when the token n-gram ending at t (positions t-n+1..t) already occurs earlier
    in the same row (starting before t-n+1, overlaps included, so a token repeated n+1 times in a row counts),
    and t is before the row's end (`lengths`). Vectorised over rows and positions.

    Greedy 64-token answers of SmolLM2-135M-Instruct hold a median of 0 repeated 4-gram tokens where the `fluency`
    screen passes them, 16-27 on average where it finds them degenerate.

    ```python
    >>> import torch
    >>> tokens = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 9], [1, 1, 1, 1, 1, 1, 0, 0, 0]])
    >>> repeated_ngrams(tokens, torch.tensor([9, 6])).long().tolist()
    [[0, 0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0, 0]]

    ```
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` has to be a positive integer, but is {n!r}.")
    batch, length = tokens.shape
    repeated = torch.zeros(batch, length, dtype=torch.bool, device=tokens.device)
    if length > n:
        windows = tokens.unfold(1, n, 1)  # (B, W, n): the n-gram ending at each position t >= n-1
        same = (windows[:, :, None, :] == windows[:, None, :, :]).all(dim=-1)  # (B, W, W)
        earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=tokens.device).tril(-1)
        repeated[:, n - 1:] = (same & earlier).any(dim=-1)
    return repeated & (torch.arange(length, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None])


def build_transitions(rollout: Rollout, terminal_rewards: torch.Tensor, kl_coef: float,
                      reject_cost: float = 0.0, repeat_cost: float = 0.0) -> Batch:
    """Replay transitions from a rollout's events (see the module docstring for the reward placement).

    `terminal_rewards` `(B,)`: the sentence-level reward of each row's response. `reject_cost`: subtracted from
    the reward of every reject decision (action 0). `repeat_cost`: subtracted from the reward of the event that
    chose a token completing a repeated 4-gram ([`repeated_ngrams`]). Costs of 0 leave the paper's rewards
    exactly as they are.
    """
    keep = rollout.finite.to(rollout.rows.device)[rollout.rows]
    rows = rollout.rows[keep]
    states = rollout.states[keep]
    count = rows.shape[0]
    last = torch.ones(count, dtype=torch.bool, device=rows.device)
    last[:-1] = rows[1:] != rows[:-1]
    terminal = terminal_rewards.to(device=rows.device, dtype=torch.float32)[rows]
    rewards = -kl_coef * rollout.penalties[keep].float() + torch.where(last, terminal, 0.0)
    if reject_cost:
        rewards = rewards - reject_cost * (rollout.actions[keep] == 0).float()
    next_states = torch.roll(states, shifts=-1, dims=0)
    next_states[last] = 0
    positions = rollout.positions[keep]
    advances = last.clone()
    advances[:-1] |= positions[1:] != positions[:-1]  # the next event is at a later position: a token was taken
    if repeat_cost:
        # The event across which a token is taken is the one that chose it (the last event of its position).
        repeats = rollout.repeated.to(rows.device)[rows, positions]
        rewards = rewards - repeat_cost * (repeats & advances).float()
    return Batch(states=states, actions=rollout.actions[keep], rewards=rewards, next_states=next_states, dones=last,
                 advances=advances)
