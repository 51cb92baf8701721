"""Chunk schedules: in which groups a step's candidates are evaluated, fixed or chosen by cost.

A schedule is a tuple of increasing chunk boundaries: `(1, 8)` evaluates candidate 0 (the top-1) of every row
first, candidates 1..7 only for rows that rejected it, then the rest only for rows that rejected those too.
`(40,)` ("one-shot") evaluates every candidate in the step's single forward, whatever the agent does.

Which is cheaper depends on the hardware. A forward of `T` sibling tokens costs about `F + g * T`: a fixed part
`F` (reading the weights, launching kernels) and a part per token `g`. Their ratio `tokens_per_forward = F / g` is
how many tokens a forward takes before its cost grows noticeably: about 16 on a 2-core CPU with a 135M model (a
40-token forward costs 3x a 1-token one), hundreds to thousands on a GPU (where weights are read once for all
tokens and kernel launches dominate). [`AutoSchedule`] picks, for the batch size and the agent's observed
behaviour, the boundaries that minimise the expected cost of a step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

DEFAULT_SCHEDULE = "auto"
"""`mara_schedule` / `schedule` default: [`AutoSchedule`], chosen by cost."""

LAZY_SCHEDULE = (1, 8)
"""The fixed schedule of earlier releases: the top-1 first, then candidates 2-8, then the rest."""

TOKENS_PER_FORWARD = {"cpu": 16, "cuda": 1024, "cuda-compiled": 384}
"""Default `F / g` by device (see the module docstring). CPU: measured on the 2-core dev VM with SmolLM2-135M in
float32 (1-token forward 82 ms, 40 tokens 242 ms, 640 tokens 2.6 s). CUDA: modelled for an 8B model on one H100:
eager forwards are bound by kernel launches (a 40-sibling forward cost about what a 16-row decode step costs); a
compiled forward by the weights read (about 11 ms) against about 0.03 ms of matrix work per token. Other devices
use the CUDA values."""


def validate_schedule(schedule) -> tuple[int, ...]:
    """Check explicit chunk boundaries: increasing positive integers, e.g. `(1, 8)` or `(40,)`."""
    try:
        bounds = tuple(schedule)
    except TypeError:
        bounds = None
    if (
        not bounds
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        or bounds[0] < 1
        or any(b <= a for a, b in zip(bounds, bounds[1:]))
    ):
        raise ValueError(
            "`schedule` is \"auto\" or increasing chunk boundaries of positive integers, e.g. (1, 8) (the top-1 "
            f"first, then candidates 2-8, then the rest) or (40,) (every candidate at once), but is {schedule!r}."
        )
    return bounds


_OBSERVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Search-length counts seen so far, per agent and model (both held weakly: nothing is attached to either)."""


def observed_counts(agent, model, width: int) -> list[float] | None:
    """The search-length counts of earlier calls with this agent and model (a list updated in place), or None."""
    if agent is None or model is None:
        return None
    per_model = _OBSERVED.setdefault(agent, weakref.WeakKeyDictionary())
    counts = per_model.get(model)
    if counts is None or len(counts) != width + 1:
        counts = per_model[model] = [0.0] * (width + 1)
    return counts


def make_schedule(schedule, *, device, batch_size: int, width: int, compiled: bool = False, static: bool = False,
                  first_for_all: bool = True, agent=None, model=None):
    """A [`FixedSchedule`] or [`AutoSchedule`] from what a user passed (`"auto"`, a tuple, or a schedule object).
    With `agent` and `model`, `"auto"` starts from what earlier calls observed of this agent on this model."""
    if isinstance(schedule, (FixedSchedule, AutoSchedule)):
        return schedule
    if isinstance(schedule, str):
        if schedule != "auto":
            raise ValueError(f"`schedule` is \"auto\" or a tuple of chunk boundaries, but is {schedule!r}.")
        kind = torch.device(device).type
        key = "cpu" if kind == "cpu" else ("cuda-compiled" if compiled else "cuda")
        # Compiled steps record one graph per distinct chunk: choose among a few schedules instead of any.
        menu = compiled_menu(width) if compiled else None
        return AutoSchedule(TOKENS_PER_FORWARD[key], batch_size=batch_size, width=width, narrows=not static,
                            first_for_all=first_for_all, menu=menu, memory=observed_counts(agent, model, width))
    return FixedSchedule(validate_schedule(schedule))


def compiled_menu(width: int) -> tuple[tuple[int, ...], ...]:
    """The schedules a compiled step chooses from: one-shot, the top-1 then the rest, the top-1 then candidates
    2-8 then the rest, and the first 8 then the rest (at most six distinct chunks, so six compiled graphs)."""
    menu = {(width,), (1, width), (min(8, width), width), (1, min(8, width), width)}
    return tuple(sorted({tuple(sorted(set(m))) for m in menu}))


@dataclass
class FixedSchedule:
    """The same boundaries at every step."""

    boundaries: tuple[int, ...]

    def current(self) -> tuple[int, ...]:
        return self.boundaries

    def start(self, stats) -> None:
        pass

    def observe(self, stats) -> None:
        pass


class AutoSchedule:
    """Boundaries that minimise a step's expected cost, re-planned from the agent's behaviour as decoding goes.

    The cost of a forward of `T` sibling tokens is modelled as `1 + T / tokens_per_forward` (in units of the
    fixed part). A row needs `l` candidates evaluated: `index + 1` when it accepts candidate `index`, all of them
    when it rejects everything, none for a lone candidate. With `S(b)` the share of rows needing more than `b`
    candidates, the chunk `[b, e)` runs when any of the `B` rows needs it (probability `1 - (1 - S(b))^B`) for
    about `B * S(b)` rows (all `B` without row narrowing, i.e. on a static cache); in the fused loop a step whose
    first chunk is not the top-1 alone, or in which a row rejects it, also pays `COMMIT_COST`. A dynamic programme
    over the boundaries minimises the sum. `S` starts from a prior (70% of rows accept their top-1, 20% one of the next 7,
    10% reject all; weight 8 decisions) plus what earlier calls saw of the same agent (`memory`), and is updated
    from the search lengths in [`MaraStats`] after steps 1, 2, 4 and then every `replan_every` steps (one host read
    each).

    Args:
        tokens_per_forward (`float`): `F / g` of the device (see the module docstring).
        batch_size (`int`): rows decoded together.
        width (`int`): candidates per row at most (`top_k`).
        narrows (`bool`): later chunks run for the rows that need them only (dynamic cache); False: for all rows.
        first_for_all (`bool`): the first chunk runs for every row (the fused loop's first chunk is its decode
            step); False: only when some row has more than one candidate (the processor).
        replan_every (`int`): steps between re-plans.
        menu (`tuple[tuple[int, ...]]`, *optional*): choose the cheapest of these schedules instead of any
            (compiled steps, which record a graph per distinct chunk).
        memory (`list[float]`, *optional*): search-length counts of earlier calls, updated in place.
    """

    PRIOR = ((1, 0.7), (2, 0.06), (3, 0.04), (4, 0.03), (5, 0.025), (6, 0.02), (7, 0.015), (8, 0.01), (None, 0.1))
    PRIOR_WEIGHT = 8.0
    COMMIT_COST = 0.05
    """Cost of committing the taken siblings (keys/values of every layer gathered and stored), in forwards."""

    def __init__(self, tokens_per_forward: float, *, batch_size: int, width: int, narrows: bool = True,
                 first_for_all: bool = True, replan_every: int = 8, menu=None, memory: list[float] | None = None):
        if not tokens_per_forward > 0:
            raise ValueError(f"`tokens_per_forward` has to be positive, but is {tokens_per_forward!r}.")
        self.tokens_per_forward = float(tokens_per_forward)
        self.batch_size, self.width = batch_size, width
        self.narrows, self.first_for_all, self.replan_every = narrows, first_for_all, replan_every
        self.menu = None if menu is None else tuple(validate_schedule(m) for m in menu)
        self.prior = [0.0] * (width + 1)
        for length, share in self.PRIOR:
            self.prior[width if length is None else min(length, width)] += share * self.PRIOR_WEIGHT
        self.memory = memory
        self.counts = [p + m for p, m in zip(self.prior, memory)] if memory else list(self.prior)
        self.steps = 0
        self.seen = None  # the stats' histogram at the last read
        self.boundaries = self.plan(self.counts)

    def current(self) -> tuple[int, ...]:
        return self.boundaries

    def start(self, stats) -> None:
        """Remember what `stats` holds before this call (a [`MaraStats`] passed in may hold earlier calls)."""
        self.seen = stats.search_length_histogram[: self.width + 1] if stats is not None else None

    def observe(self, stats) -> None:
        """Count one step; after steps 1, 2, 4 and every `replan_every`, re-plan from `stats` (a [`MaraStats`])."""
        self.steps += 1
        due = self.steps in (1, 2, 4) or self.steps % self.replan_every == 0
        if not due or stats is None:
            return
        histogram = stats.search_length_histogram[: self.width + 1]  # one host read
        seen = self.seen or [0] * len(histogram)
        new = [h - s for h, s in zip(histogram, seen)]
        self.seen = histogram
        self.counts = [c + n for c, n in zip(self.counts, new)]
        if self.memory is not None:
            for length, n in enumerate(new):
                self.memory[length] += n
        self.boundaries = self.plan(self.counts)

    def expected_cost(self, boundaries: tuple[int, ...], counts: list[float] | None = None) -> float:
        """Expected cost of one step with `boundaries` (in units of a forward's fixed part)."""
        survival = self._survival(counts or self.counts)
        cost, start = 0.0, 0
        for end in boundaries + ((self.width,) if boundaries[-1] < self.width else ()):
            cost += self._chunk_cost(survival, start, end)
            start = end
        return cost

    def plan(self, counts: list[float]) -> tuple[int, ...]:
        """The cheapest boundaries for search-length counts `counts[l]` (l = 0 .. width)."""
        if self.menu is not None:
            return min(self.menu, key=lambda bounds: (round(self.expected_cost(bounds, counts), 9), len(bounds)))
        survival = self._survival(counts)
        width = self.width
        best = [0.0] * (width + 1)
        step = [width] * (width + 1)
        for start in range(width - 1, -1, -1):
            # Ties (chunks no row ever needs cost nothing) go to the larger chunk: fewer boundaries.
            cost, neg_end = min(
                (round(self._chunk_cost(survival, start, end) + best[end], 9), -end) for end in range(start + 1, width + 1)
            )
            best[start], step[start] = cost, -neg_end
        bounds, start = [], 0
        while start < width:
            start = step[start]
            bounds.append(start)
        return tuple(bounds)

    def _survival(self, counts: list[float]) -> list[float]:
        total = sum(counts) or 1.0
        survival, remaining = [], total
        for c in counts:  # survival[b] = share of rows needing more than b candidates
            remaining -= c
            survival.append(max(remaining, 0.0) / total)
        return survival

    def _chunk_cost(self, survival: list[float], start: int, end: int) -> float:
        rows = self.batch_size
        commit = 0.0
        if start == 0 and self.first_for_all:
            runs, share = 1.0, 1.0
            # The fused loop's step is already in the cache when its first chunk is the top-1 alone and every row
            # takes it; otherwise the taken siblings are committed.
            commit = self.COMMIT_COST * (1.0 if end > 1 else 1.0 - (1.0 - survival[1]) ** rows)
        else:
            share = survival[start]
            runs = 1.0 - (1.0 - share) ** rows
        width = end - start
        tokens = rows * (share if self.narrows else runs) * width
        return runs + tokens / self.tokens_per_forward + commit

    def __repr__(self) -> str:
        return (f"AutoSchedule(tokens_per_forward={self.tokens_per_forward:g}, batch_size={self.batch_size}, "
                f"width={self.width}, boundaries={self.boundaries})")
