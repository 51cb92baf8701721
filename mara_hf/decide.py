"""One MARA step: candidates -> sibling states -> agent -> decision. Shared by the processor and the fused loop.

Candidates are evaluated in chunks along the probability order (``schedule``): the top-1 of every row first,
then the next candidates only while some row has rejected everything so far. A step whose top-1 is accepted by
every row therefore costs a single one-token forward; in the fused loop that forward *is* the decode step.
A later chunk runs only for the rows still looking, on a narrowed copy of their cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .candidates import CandidateSet, build_candidates, fallback_index, first_accepted
from .states import CacheCheckpoint, appended_kv, narrow_cache, select_kv, sibling_forward, widen
from .stats import StepDecision

DEFAULT_SCHEDULE = (1, 8)
"""Chunk boundaries: candidates [0, 1) first, then [1, 8), then the rest. See README ("chunk schedule")."""


def validate_schedule(schedule) -> tuple[int, ...]:
    schedule = tuple(schedule)
    if not schedule or schedule[0] != 1 or any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(
            f"`schedule` lists increasing chunk boundaries starting with 1 (the top-1 alone), e.g. (1, 8), "
            f"but is {schedule!r}."
        )
    return schedule


@dataclass
class StepEvaluation:
    """Everything one step learned. `accepted` is meaningful where `evaluated` is True."""

    candidates: CandidateSet
    accepted: torch.BoolTensor
    evaluated_width: int
    decision: StepDecision
    forwards: int
    checkpoint: CacheCheckpoint
    committed: bool = False
    kv_parts: list = field(default_factory=list)
    logits_parts: list = field(default_factory=list)
    bounds: list = field(default_factory=list)
    picked: bool = False
    states_parts: list = field(default_factory=list)

    @property
    def states(self) -> torch.Tensor:
        """`(B, evaluated_width, d)`: the faithful states of the evaluated candidates (`keep_states=True` only)."""
        return torch.cat(self.states_parts, dim=1) if len(self.states_parts) > 1 else self.states_parts[0]

    def allowed(self) -> torch.BoolTensor:
        """`(B, width)`: the candidates a sampler may take: every accepted one, or the decided one alone where the
        agent was not asked or every candidate was rejected."""
        cands = self.candidates
        keep = self.accepted & cands.valid
        only_decided = ~self.decision.asked | self.decision.fallback
        decided = torch.nn.functional.one_hot(self.decision.index, cands.width).bool()
        return torch.where(only_decided[:, None], decided, keep)

    def restrict(self, scores: torch.Tensor, allowed: torch.BoolTensor) -> torch.Tensor:
        """`scores` `(B, vocab)` with every token at -inf except the `allowed` `(B, width)` candidates (a new
        tensor). `amax` keeps a token if any of its slots is allowed (padded slots repeat the top-1 token)."""
        tokens = self.candidates.tokens.to(scores.device)
        keep = torch.zeros(scores.shape, dtype=torch.long, device=scores.device).scatter_reduce(
            1, tokens, allowed.long().to(scores.device), reduce="amax"
        )
        return scores.masked_fill(keep == 0, -float("inf"))

    def commit(self, index: torch.LongTensor) -> torch.Tensor:
        """Fused loop: keep candidate `index[b]` of each row in the cache and return its logits `(B, vocab)`."""
        if self.committed:
            raise RuntimeError("This step was already committed to the cache.")
        self.checkpoint.commit(select_kv(self.kv_parts, index))
        self.committed = True
        if self.picked:
            # One projected sibling per chunk and row: the one in the chunk that holds the row's choice.
            chunk = sum((index >= start).long() for start, _ in self.bounds[1:])
            picked = torch.stack([logits[:, 0] for logits in self.logits_parts])
            return picked[chunk, torch.arange(index.shape[0], device=index.device)]
        logits = torch.cat(self.logits_parts, dim=1) if len(self.logits_parts) > 1 else self.logits_parts[0]
        return logits.gather(1, index.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)


def evaluate_step(
    model,
    agent,
    cache,
    scores: torch.Tensor,
    position_ids: torch.LongTensor,
    context_mask: torch.Tensor | None,
    *,
    top_k: int,
    top_p: float,
    fallback: str,
    schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
    lazy: bool = True,
    for_commit: bool = False,
    thresholds: torch.Tensor | None = None,
    keep_states: bool = False,
) -> StepEvaluation:
    """Build the candidates of `scores` `(B, vocab)`, ask the agent, decide.

    With `lazy=True` candidates are evaluated chunk by chunk until every row has accepted one (or has no
    candidates left); with `lazy=False` all of them are evaluated in one forward (a sampler needs every accept
    flag). With `for_commit=False` the cache is left exactly as it was; with `for_commit=True` the siblings'
    keys/values and logits are kept for `StepEvaluation.commit`, and when every row takes its top-1 after the
    first chunk the cache already holds the committed step (`committed=True`, logits in `logits_parts[0]`).

    A candidate is accepted when its p(accept) exceeds its threshold: 0.5 (the agent's greedy decision) unless
    `thresholds` `(B, >= width)` are given; uniform random thresholds *sample* the agent's policy (training
    rollouts). `keep_states=True` keeps the evaluated candidates' states (`StepEvaluation.states`).
    """
    cands = build_candidates(scores, top_k, top_p)
    batch = cands.counts.shape[0]
    if thresholds is None:
        thresholds = torch.full((1, cands.width), 0.5, device=cands.tokens.device)
    thresholds = thresholds.expand(batch, -1)
    device = cands.tokens.device
    lone = cands.counts == 1
    decided = lone.clone()
    accepted = torch.zeros(batch, cands.width, dtype=torch.bool, device=device)
    evaluation = StepEvaluation(cands, accepted, 0, None, 0, CacheCheckpoint(cache))

    if lazy and for_commit:
        start, end = 0, 1  # the fused loop's decode step: no host read before it
    else:
        any_asked, max_count = torch.stack([(~lone).any().long(), cands.counts.max()]).tolist()
        if not any_asked and not for_commit:
            evaluation.decision = _decide(cands, accepted, lone, fallback)
            return evaluation  # every row has a lone candidate: nothing to ask, no forward
        start, end = 0, 1 if lazy else max_count
    # Greedy fused steps let lm_head project only the sibling each row may keep (see `_pick`).
    picking = for_commit and lazy
    evaluation.picked = picking
    rows = None  # the rows a later chunk runs for (None: all)
    while True:
        if end - start > 1:
            evaluation.checkpoint.keep_appended()
        # A later chunk runs only for the rows still looking for a candidate, on a narrowed copy of their cache.
        chunk_cache = cache if rows is None else narrow_cache(cache, rows)
        at = slice(None) if rows is None else rows
        p_accept = {}
        pick = _pick(agent, cands, start, end, fallback, thresholds, p_accept, at) if picking else None
        out = sibling_forward(
            model, chunk_cache, cands.tokens[at, start:end], position_ids[at],
            None if context_mask is None else context_mask[at], return_logits=for_commit, pick=pick,
        )
        evaluation.forwards += 1
        evaluation.evaluated_width = end
        evaluation.bounds.append((start, end))
        if "value" not in p_accept:
            p_accept["value"] = agent.accept_probability(out.states)
        if keep_states:
            evaluation.states_parts.append(widen(out.states, rows, batch))
        chunk_accepted = (p_accept["value"].to(device) > thresholds[at, start:end]) & cands.valid[at, start:end]
        accepted[at, start:end] = chunk_accepted
        decided[at] |= chunk_accepted.any(dim=-1)
        if lazy:
            # The host read of a chunk: how many rows still need candidates, and how many can there be? (When
            # only some do, `nonzero` below reads which.)
            need = ~decided & (cands.counts > end)
            needed, max_count = torch.stack([need.sum(), cands.counts.max()]).tolist()
        else:
            needed = 0
        if for_commit:
            evaluation.logits_parts.append(widen(out.logits, rows, batch))
            if end == 1 and not needed:
                # Every row takes its top-1 (accepted, or a lone candidate): the cache already holds the step.
                evaluation.committed = True
                break
            evaluation.kv_parts.append(
                [(widen(k, rows, batch), widen(v, rows, batch)) for k, v in appended_kv(chunk_cache, end - start)]
            )
        evaluation.checkpoint.restore()
        if not needed:
            break
        rows = need.nonzero().squeeze(1) if needed < batch else None
        start = end
        end = min(next((b for b in schedule if b > start), max_count), max_count)

    evaluation.decision = _decide(cands, accepted, lone, fallback)
    return evaluation


def _pick(agent, cands: CandidateSet, start: int, end: int, fallback: str, thresholds: torch.Tensor, p_accept: dict,
          rows=slice(None)):
    """The sibling of chunk `[start, end)` each of `rows` may keep: its first accepted one; with the `"last"`
    fallback, the row's last candidate if it lies in this chunk and none was accepted (the `"first"` fallback and
    the top-1 live in the first chunk, whose only sibling is the top-1). Stores p(accept) for the caller."""

    def pick(states):
        p_accept["value"] = p = agent.accept_probability(states)
        accepted = (p.to(cands.counts.device) > thresholds[rows, start:end]) & cands.valid[rows, start:end]
        any_accepted, first = first_accepted(accepted)
        if fallback == "last":
            last = cands.counts[rows] - 1 - start
            in_chunk = (last >= 0) & (last < end - start)
            first = torch.where(any_accepted | ~in_chunk, first, last.clamp(0, end - start - 1))
        return first.to(states.device)

    return pick


def _decide(cands: CandidateSet, accepted: torch.BoolTensor, lone: torch.BoolTensor, fallback: str) -> StepDecision:
    """First accepted candidate in probability order; the fallback where all were rejected; lone ones as they are."""
    any_accepted, first = first_accepted(accepted)
    index = torch.where(any_accepted, first, fallback_index(cands.counts, fallback))
    index = torch.where(lone, 0, index)
    return StepDecision(
        index=index,
        token=cands.tokens.gather(1, index[:, None]).squeeze(1),
        num_candidates=cands.counts,
        asked=~lone,
        fallback=~lone & ~any_accepted,
    )
