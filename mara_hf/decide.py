"""One MARA step: candidates -> sibling states -> agent -> decision. Shared by the processor, the fused loop and
training rollouts.

Candidates are evaluated in chunks along the probability order (a schedule of boundaries, see
`mara_hf.schedule`): with `(1, 8)` the top-1 of every row first, then the next candidates only while some row has
rejected everything so far; with `(40,)` all of them in one forward. A step whose first chunk is the top-1 alone
and whose rows all take it costs a single one-token forward; in the fused loop that forward *is* the decode step.
On a dynamic cache a later chunk runs only for the rows still looking, on a narrowed copy of their cache rows; on
a static cache every chunk runs for all rows (fixed shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .candidates import CandidateSet, build_candidates, fallback_index, first_accepted, keepable
from .schedule import LAZY_SCHEDULE
from .states import DynamicSiblings, StaticSiblings, picked_states, select_kv, select_picked, widen
from .stats import StepDecision


@dataclass
class StepEvaluation:
    """Everything one step learned. `accepted` is meaningful where a candidate was evaluated; `probabilities` holds
    each chunk's `(p_accept, valid)`."""

    candidates: CandidateSet
    accepted: torch.BoolTensor
    evaluated_width: int
    decision: StepDecision | None
    forwards: int
    siblings: DynamicSiblings | StaticSiblings
    committed: bool = False
    logits_parts: list = field(default_factory=list)
    bounds: list = field(default_factory=list)
    picked: bool = False
    deferred: bool = False
    head_inputs: list = field(default_factory=list)
    states_parts: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)

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
        # Picking chunks kept one sibling per row each (keys/values, and lm_head's input or logits): the row's
        # choice is the one kept by the chunk that holds it.
        chunk = sum((index >= start).long() for start, _ in self.bounds[1:]) if self.picked else None
        if isinstance(self.siblings, StaticSiblings):
            self.siblings.commit_index(index)
        elif self.picked:
            self.siblings.commit(select_picked(self.siblings.kept_kv(), chunk))
        else:
            self.siblings.commit(select_kv(self.siblings.kept_kv(), index))
        self.committed = True
        if self.deferred:
            head = self.siblings.model.get_output_embeddings()
            return head(select_picked(self.head_inputs, chunk))[:, 0]
        if self.picked:
            return select_picked([logits[:, 0] for logits in self.logits_parts], chunk)
        logits = torch.cat(self.logits_parts, dim=1) if len(self.logits_parts) > 1 else self.logits_parts[0]
        return picked_states(logits, index).squeeze(1)

    def next_logits(self) -> torch.Tensor:
        """Fused loop, after `commit` or when the first chunk already committed the step: the taken token's logits."""
        return self.logits_parts[0][:, 0]


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
    min_p: float = 0.0,
    schedule: tuple[int, ...] = LAZY_SCHEDULE,
    lazy: bool = True,
    for_commit: bool = False,
    thresholds: torch.Tensor | float = 0.5,
    keep_states: bool = False,
    static_length: int | None = None,
    compiled=None,
    defer_head: bool = False,
    active: torch.Tensor | None = None,
) -> StepEvaluation:
    """Build the candidates of `scores` `(B, vocab)`, ask the agent, decide.

    With `lazy=True` candidates are evaluated chunk by chunk along `schedule` until every row has accepted one (or
    has no candidates left); with `lazy=False` all of them are evaluated in one forward (a sampler needs every
    accept flag). With `for_commit=False` the cache is left exactly as it was; with `for_commit=True` the taken
    candidate can be kept with `StepEvaluation.commit`, and when every row takes its top-1 after a first chunk of
    one candidate, the cache already holds the committed step (`committed=True`, logits in `next_logits()`).
    `static_length`: the cache is a static cache filled up to this length (siblings go to scratch slots);
    `compiled` (a `compiled.CompiledStep`) then runs its picking chunks and commit compiled.

    A candidate is accepted when its p(accept) exceeds its threshold: `thresholds`, one number for all (0.5: the
    agent's greedy decision; an agent may be calibrated to another, `MaraAgent.accept_threshold`) or one per
    candidate `(B, >= width)`: uniform random ones *sample* the agent's policy (training rollouts).
    `active` `(B,)` (nonzero: the row is still generating; `generate`'s `unfinished_sequences`): with `lazy=True`,
    a finished row (whose token `generate` replaces with padding) takes its top-1 as a lone candidate would, so it
    never costs the step a later chunk.
    `keep_states=True` keeps the evaluated candidates' states (`StepEvaluation.states`).

    `defer_head=True` (fused, lazy, dynamic cache; only for models whose logits are lm_head's output as it is,
    `states.plain_head`): when a step needs more than its first chunk, no chunk projects through lm_head; `commit`
    projects each row's taken sibling once. A step costs one vocabulary projection, as a plain decode step does,
    instead of one per chunk (on a CPU lm_head is a fifth of a small model's weights read per forward).
    """
    cands = build_candidates(scores, top_k, top_p, min_p)
    batch, width = cands.counts.shape[0], cands.width
    device = cands.tokens.device
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.expand(batch, -1)
    static = static_length is not None
    lone = cands.counts == 1
    target = fallback_index(cands.counts, fallback)  # taken where every candidate is rejected: 0, or the last
    if active is not None and lazy:  # finished rows: decided by their first chunk, on their top-1, as lone ones
        lone = lone | (active.to(device) == 0)
        if fallback == "last":
            target = target.masked_fill(lone, 0)
    decided = lone
    accepted = torch.zeros(batch, width, dtype=torch.bool, device=device)
    if static:
        siblings = StaticSiblings(model, cache, context_mask, static_length, compiled=compiled)
    else:
        siblings = DynamicSiblings(model, cache, context_mask)
    evaluation = StepEvaluation(cands, accepted, 0, None, 0, siblings)
    bounds = tuple(schedule) if lazy else (width,)
    first = min(bounds[0], width)

    if static or (for_commit and first == 1):
        max_count = width  # no host read before the first chunk: fixed shapes, or the fused loop's decode step
    else:
        # Host read: is any row asked at all, and how many candidates can a row have (the chunk is cut to that).
        any_asked, max_count = torch.stack([(~lone).any().long(), cands.counts.max()]).tolist()
        if not any_asked and not for_commit:
            evaluation.decision = _decide(cands, accepted, lone, fallback, target)
            return evaluation  # every row has a lone candidate: nothing to ask, no forward
    # Fused steps let lm_head project only the sibling each row may keep (see `Picker`), or none (`defer_head`).
    evaluation.picked = picking = for_commit and lazy
    defer = defer_head and picking and not static
    logits_mode = "pick" if picking else ("all" if for_commit else "none")
    start, end = 0, min(first, max_count)
    rows = None  # the rows a chunk runs for (None: all)
    try:
        while True:
            at = slice(None) if rows is None else rows
            pick = None
            if picking:
                # A later chunk only runs after a deferring first one; a first chunk that may be the last projects.
                defers = defer and (start > 0 or (lazy and end < max_count))
                pick = Picker(agent, cands, start, end, target, thresholds, at, defer=defers, decided=decided)
            out = siblings.forward(cands.tokens[at, start:end], position_ids[at], start, rows, logits=logits_mode,
                                   pick=pick, keep_kv=for_commit and not static)
            evaluation.forwards += 1
            evaluation.evaluated_width = end
            evaluation.bounds.append((start, end))
            p = pick.p_accept if picking else agent.accept_probability(out.states)
            p = p.to(device)
            valid = cands.valid[at, start:end]
            evaluation.probabilities.append((p, valid))  # for MaraStats.nonfinite, counted when read
            if keep_states:
                evaluation.states_parts.append(widen(out.states, rows, batch))
            chunk_accepted = (p > _chunk_thresholds(thresholds, at, start, end)) & valid
            accepted[at, start:end] = chunk_accepted
            if rows is None:
                decided = decided | chunk_accepted.any(dim=-1)
            else:
                decided = decided.index_put((rows,), decided[rows] | chunk_accepted.any(dim=-1))
            if lazy and end < max_count:
                # The host read of a chunk: how many rows still need candidates, and how many can those rows have
                # (the next chunk is cut to that, not to the widest row of the batch)? (When only some rows need more,
                # `nonzero` below reads which.) A deferring picker made it already, before lm_head.
                need = ~decided & (cands.counts > end)
                if pick is not None and pick.read is not None:
                    needed, max_count = pick.read
                elif static:  # fixed shapes: chunks are never cut to the largest count
                    needed = int(need.sum())
                else:
                    needed, max_count = _read_need(need, cands.counts)
            else:
                needed = 0
            if pick is not None and pick.deferred:
                evaluation.deferred = True
                evaluation.head_inputs.append(widen(pick.kept, rows, batch))
            elif for_commit:
                evaluation.logits_parts.append(widen(out.logits, rows, batch))
                if end == 1 and not needed:
                    # Every row takes its top-1 (accepted, or a lone candidate): the cache already holds the step.
                    evaluation.committed = True
                    break
            if not static:
                siblings.restore()
            if not needed:
                break
            if not static:
                rows = need.nonzero().squeeze(1) if needed < batch else None
            start = end
            end = min(next((b for b in bounds if b > start), max_count), max_count)
    except BaseException:
        siblings.restore()  # a failed step (the agent, a later chunk's memory) leaves the cache as it found it
        raise

    if static and not for_commit:
        siblings.restore()
    evaluation.decision = _decide(cands, accepted, lone, fallback, target)
    return evaluation


class Picker:
    """The sibling of chunk `[start, end)` each of `rows` may keep, chosen from the chunk's states before lm_head
    projects: its first accepted one; the fallback candidate (`target` `(B,)`, absolute: the top-1, or the row's
    last with `"last"`) if it lies in this chunk and none was accepted. Keeps p(accept) for the caller
    (`p_accept`) and the kept sibling's index (`index`, `(R,)`).

    With `defer=True` it keeps that sibling's lm_head input (`kept`, `(R, 1, d)`) and lets lm_head project nothing
    (`deferred`), except in a first chunk after which no row needs more candidates: it makes the chunk's host read
    there (`read`: rows needing more, their largest candidate count; `decided`: the rows decided before the chunk)
    and, when none does, lets lm_head project as without `defer` (the fused loop's decode step)."""

    def __init__(self, agent, cands: CandidateSet, start: int, end: int, target: torch.LongTensor,
                 thresholds: torch.Tensor | float, rows=slice(None), *, defer: bool = False, decided=None):
        self.agent, self.start, self.end = agent, start, end
        self.thresholds = _chunk_thresholds(thresholds, rows, start, end)
        self.valid = cands.valid[rows, start:end]
        self.counts = cands.counts[rows]
        self.target = target[rows]
        self.defer, self.decided = defer, decided
        self.p_accept = self.index = self.kept = self.read = None
        self.deferred = False

    def __call__(self, states: torch.Tensor) -> torch.LongTensor | None:
        self.p_accept = p = self.agent.accept_probability(states)
        p = p.to(self.valid.device)
        self.index = index = keepable(p, self.thresholds, self.valid, self.target, self.start).to(states.device)
        if not self.defer:
            return index
        self.kept = picked_states(states, index)
        if self.start == 0:
            decided = self.decided | ((p > self.thresholds) & self.valid).any(dim=-1)
            need = ~decided & (self.counts > self.end)
            self.read = _read_need(need, self.counts)
            if not self.read[0]:
                return index
        self.deferred = True
        return None


def _read_need(need: torch.BoolTensor, counts: torch.LongTensor) -> list[int]:
    """The host read after a chunk: `[rows needing more candidates, the most candidates one of them has]`."""
    return torch.stack([need.sum(), torch.where(need, counts, 0).max()]).tolist()


def _chunk_thresholds(thresholds: torch.Tensor | float, rows, start: int, end: int):
    """The thresholds of chunk `[start, end)` of `rows`: the one number, or that part of the per-candidate ones."""
    return thresholds[rows, start:end] if isinstance(thresholds, torch.Tensor) else thresholds


def _decide(cands: CandidateSet, accepted: torch.BoolTensor, lone: torch.BoolTensor, fallback: str,
            target: torch.LongTensor) -> StepDecision:
    """First accepted candidate in probability order; the fallback `target` where all were rejected; lone ones as
    they are.

    `first_accepted` gives 0 where nothing was accepted, which is the `"first"` fallback; a lone candidate can only
    be accepted at 0 and its `target` is 0 too. With `"last"` the last candidate is the forced fallback, as in the
    training MDP (which never asks about it): an accept flag of its own does not count, so a step that rejected all
    the others is a fallback whatever the agent said of the last one (the token is the same)."""
    if fallback == "last":
        refusable = torch.arange(accepted.shape[-1], device=accepted.device) < (cands.counts - 1)[:, None]
        accepted = accepted & refusable
    any_accepted, index = first_accepted(accepted)
    if fallback == "last":
        index = torch.where(any_accepted, index, target)
    return StepDecision(
        index=index,
        token=cands.tokens.gather(1, index[:, None]).squeeze(1),
        num_candidates=cands.counts,
        asked=~lone,
        fallback=~(lone | any_accepted),
    )
