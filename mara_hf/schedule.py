"""Chunk schedules: in which groups a step's candidates are evaluated, fixed or chosen by cost.

A schedule is a tuple of increasing chunk boundaries: `(1, 8)` evaluates candidate 0 (the top-1) of every row
first, candidates 1..7 only for rows that rejected it, then the rest only for rows that rejected those too.
`(40,)` ("one-shot") evaluates every candidate in the step's single forward, whatever the agent does.

Which is cheaper depends on the hardware. A forward of `T` sibling tokens costs about `F + g * T`: a fixed part
`F` (reading the weights, launching kernels) and a part per token `g`. Their ratio `tokens_per_forward = F / g` is
how many tokens a forward takes before its cost grows noticeably: about 25 on one core of the dev VM with a 135M
model, hundreds to thousands on a GPU (where weights are read once for all tokens and kernel launches dominate). [`AutoSchedule`] picks, for the batch size and the agent's observed
behaviour, the boundaries that minimise the expected cost of a step.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

DEFAULT_SCHEDULE = "auto"
"""`mara_schedule` / `schedule` default: [`AutoSchedule`], chosen by cost."""

LAZY_SCHEDULE = (1, 8)
"""The fixed schedule of earlier releases: the top-1 first, then candidates 2-8, then the rest."""

COST_MODELS = {"cpu": (25.0, 0.7), "cuda": (1024.0, 0.5), "cuda-compiled": (384.0, 1.0)}
"""Default `(tokens_per_forward, single_token_cost)` by device (see the module docstring and [`AutoSchedule`]).
CPU: fitted to sibling forwards of SmolLM2-135M in float32 on one thread of the 2-core dev VM (`rows x candidates`
from 1x1 to 16x32, median of 5): about 100 ms + 4 ms per token, a one-candidate chunk 70 ms at batch 1 (a
matrix-vector product). CUDA, eager: modelled from issue 10's H100 figures for an 8B model, where forwards are
bound by kernel launches (a one-token decode step 22 ms, 40 siblings 44-52 ms at batch 1 and 16). CUDA, compiled:
modelled from an H100's bandwidth and compute (about 11 ms to read the weights, 0.03 ms of matrix work per token).
Other accelerators use the CUDA values."""


def validate_schedule(schedule, name: str = "schedule") -> tuple[int, ...]:
    """Check explicit chunk boundaries: increasing positive integers, e.g. `(1, 8)` or `(40,)`; `name`: the argument
    the messages name."""
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
            f"`{name}` is \"auto\" or increasing chunk boundaries of positive integers, e.g. (1, 8) (the top-1 "
            f"first, then candidates 2-8, then the rest) or (40,) (every candidate at once), but is {schedule!r}."
        )
    return bounds


_OBSERVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Search-length counts seen so far, per agent and model (both held weakly: nothing is attached to either)."""


def observed_counts(agent, model, width: int) -> list[list[float]] | None:
    """The `(search length, candidate count)` counts of earlier calls with this agent and model (nested lists
    updated in place), or None."""
    if agent is None or model is None:
        return None
    per_model = _OBSERVED.setdefault(agent, weakref.WeakKeyDictionary())
    counts = per_model.get(model)
    if counts is None or len(counts) != width + 1:
        counts = per_model[model] = [[0.0] * (width + 1) for _ in range(width + 1)]
    return counts


def make_schedule(schedule, *, device, batch_size: int, width: int, compiled: bool = False, static: bool = False,
                  first_for_all: bool = True, agent=None, model=None, name: str = "schedule"):
    """A [`FixedSchedule`] or [`AutoSchedule`] from what a user passed (`"auto"`, a tuple, or a schedule object);
    `width`: the call's candidates per row at most. With `agent` and `model`, `"auto"` starts from what earlier calls
    observed of this agent on this model. `name`: the argument the messages name."""
    if isinstance(schedule, AutoSchedule) and schedule.width != width:
        raise ValueError(
            f"`{name}` is an AutoSchedule for {schedule.width} candidates per row, but this call has {width} (its "
            f"top_k): build it with `width={width}`, or pass \"auto\"."
        )
    if isinstance(schedule, (FixedSchedule, AutoSchedule)):
        return schedule
    if isinstance(schedule, str):
        if schedule != "auto":
            raise ValueError(f"`{name}` is \"auto\" or a tuple of chunk boundaries, but is {schedule!r}.")
        kind = torch.device(device).type
        key = "cpu" if kind == "cpu" else ("cuda-compiled" if compiled else "cuda")
        tokens_per_forward, single = COST_MODELS[key]
        # Compiled steps record one graph per distinct chunk: choose among a few schedules instead of any.
        menu = compiled_menu(width) if compiled else None
        return AutoSchedule(tokens_per_forward, batch_size=batch_size, width=width, narrows=not static,
                            first_for_all=first_for_all, menu=menu, memory=observed_counts(agent, model, width),
                            single_token_cost=single)
    return FixedSchedule(validate_schedule(schedule, name))


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

    def finish(self, stats) -> None:
        pass


class AutoSchedule:
    """Boundaries that minimise a step's expected cost, re-planned from the agent's behaviour as decoding goes.

    **Cost of a chunk.** A forward of `T` sibling tokens costs `1 + T / tokens_per_forward` (in units of the fixed
    part), a chunk of one candidate per row `single_token_cost + T / tokens_per_forward` (an ordinary decode step:
    no sibling mask, and on a CPU at batch 1 a matrix-vector product). In the fused loop a step whose first chunk
    is not the top-1 alone, or in which a row rejects it, also pays `COMMIT_COST`.

    **What rows need.** A decision needs `l` candidates evaluated: `index + 1` when it accepts candidate `index`,
    all `n` of its candidates when it rejects everything, none for a lone candidate; `(l, n)` are counted per
    decision. The chunk `[b, e)` runs when any of the `B` rows has `l > b` (probability `1 - (1 - S(b))^B`, `S(b)`
    the share of such rows) for those rows only (all `B` on a static cache), each padded to the widest one: a
    row's width is `min(e, n) - b` (a dynamic step cuts chunks at the largest `n`; a static one never does), and
    the expected widest of `B * S(b)` rows follows from the distribution of `n`. A dynamic programme over the
    boundaries minimises the expected sum.

    **Learning.** The counts start from a prior (70% of decisions accept the top-1, 20% one of the next 7, 10%
    reject all, all with `width` candidates; weight 8 decisions) plus what earlier calls saw of the same agent on
    the same model (`memory`), and grow with the counts of [`MaraStats`], read (one host read each) and re-planned
    once the decisions since the last plan (about `batch_size` per step) reach `replan_growth` times the decisions
    that plan rested on, and at least every `MAX_REPLAN_SPACING` steps: a fresh agent at batch 1 re-plans after steps
    4, 10, 19, 33, ..., at batch 16 after 1, 2, 4, 7, 11, ...; one remembered over many decisions hardly ever (new
    counts would hardly move its plan, and each re-plan costs host time that a host-bound step cannot hide).

    Args:
        tokens_per_forward (`float`): `F / g` of the device (see the module docstring).
        batch_size (`int`): rows decoded together.
        width (`int`): candidates per row at most (`top_k`).
        narrows (`bool`): a dynamic cache: later chunks run only for the rows that need them, and chunks are cut
            at the largest candidate count; False (a static cache): every chunk runs for all rows at full width.
        first_for_all (`bool`): the first chunk runs for every row (the fused loop's first chunk is its decode
            step); False: only when some row has more than one candidate (the processor).
        replan_growth (`float`, *optional*, defaults to 0.5): re-plan once the decisions seen since the last plan
            reach this share of those it rested on.
        menu (`tuple[tuple[int, ...]]`, *optional*): choose the cheapest of these schedules instead of any
            (compiled steps, which record a graph per distinct chunk).
        memory (`list[list[float]]`, *optional*): `(l, n)` counts of earlier calls, updated in place.
        single_token_cost (`float`, *optional*, defaults to 1): the fixed part of a one-candidate chunk, relative to
            that of a chunk of several.
    """

    PRIOR = ((1, 0.7), (2, 0.06), (3, 0.04), (4, 0.03), (5, 0.025), (6, 0.02), (7, 0.015), (8, 0.01), (None, 0.1))
    PRIOR_WEIGHT = 8.0
    MAX_REPLAN_SPACING = 64
    COMMIT_COST = 0.05
    """Cost of committing the taken siblings (keys/values of every layer gathered and stored), in forwards."""

    def __init__(self, tokens_per_forward: float, *, batch_size: int, width: int, narrows: bool = True,
                 first_for_all: bool = True, replan_growth: float = 0.5, menu=None, memory=None,
                 single_token_cost: float = 1.0):
        if not tokens_per_forward > 0:
            raise ValueError(f"`tokens_per_forward` has to be positive, but is {tokens_per_forward!r}.")
        if not replan_growth > 0:
            raise ValueError(f"`replan_growth` has to be positive, but is {replan_growth!r}.")
        if not single_token_cost > 0:
            raise ValueError(f"`single_token_cost` has to be positive, but is {single_token_cost!r}.")
        self.tokens_per_forward = float(tokens_per_forward)
        self.single_token_cost = float(single_token_cost)
        self.batch_size, self.width = batch_size, width
        self.narrows, self.first_for_all, self.replan_growth = narrows, first_for_all, float(replan_growth)
        self.menu = None if menu is None else tuple(validate_schedule(m) for m in menu)
        self.prior = torch.zeros(width + 1, width + 1, dtype=torch.float64)
        for length, share in self.PRIOR:
            self.prior[width if length is None else min(length, width), width] += share * self.PRIOR_WEIGHT
        self.memory = memory
        self.counts = self.prior.clone()
        if memory is not None:
            self.counts += torch.tensor(memory, dtype=torch.float64)
        self.steps = 0
        self.seen = None  # the stats' (l, n) counts at the last read
        self.read_at = 0  # the step of the last read
        self.boundaries = self.plan(self.counts)
        self.next_plan = self._next_plan()

    def current(self) -> tuple[int, ...]:
        return self.boundaries

    def start(self, stats) -> None:
        """Remember what `stats` holds before this call (a [`MaraStats`] passed in may hold earlier calls)."""
        self.seen = self._read(stats) if stats is not None else None

    def observe(self, stats) -> None:
        """Count one step; when a re-plan is due (see the class docstring), re-plan from `stats` (a [`MaraStats`])."""
        self.steps += 1
        if self.steps < self.next_plan or stats is None:
            return
        self._add(stats)
        self.boundaries = self.plan(self.counts)
        self.next_plan = self._next_plan()

    def finish(self, stats) -> None:
        """At the end of a call: add what `stats` counted since the last read to the memory of later calls (one
        host read; re-plans are sparse, so the last steps of a call would otherwise never be remembered)."""
        if stats is not None and self.memory is not None and self.read_at != self.steps:
            self._add(stats)

    def _add(self, stats) -> None:
        """Read `stats`' counts (one host read) and add what is new since the last read to the counts and memory."""
        counts = self._read(stats)
        new = counts - (self.seen if self.seen is not None else 0.0)
        self.seen, self.read_at = counts, self.steps
        self.counts = self.counts + new
        if self.memory is not None:
            cells = new.nonzero()
            for (length, count), value in zip(cells.tolist(), new[cells[:, 0], cells[:, 1]].tolist()):
                self.memory[length][count] += value

    def _next_plan(self) -> int:
        """The step after which the next re-plan is due: once about `replan_growth` times the decisions the plan rested
        on have been added (`batch_size` per step), at least one and at most `MAX_REPLAN_SPACING` steps later."""
        wait = math.ceil(self.replan_growth * float(self.counts.sum()) / max(self.batch_size, 1))
        return self.steps + min(max(wait, 1), self.MAX_REPLAN_SPACING)

    def _read(self, stats) -> torch.Tensor:
        counts = torch.tensor(stats.search_count_histogram, dtype=torch.float64)
        return counts[: self.width + 1, : self.width + 1]

    def _as_counts(self, counts) -> torch.Tensor:
        """`(l, n)` counts as a `(width + 1, width + 1)` tensor; a list of search-length counts means `width`
        candidates for every asked decision (and one for `l = 0`)."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.ndim == 2:
            return counts
        joint = torch.zeros(self.width + 1, self.width + 1, dtype=torch.float64)
        joint[1:, self.width] = counts[1:]
        joint[0, 1] = counts[0]
        return joint

    def expected_cost(self, boundaries: tuple[int, ...], counts=None) -> float:
        """Expected cost of one step with `boundaries` (in units of a forward's fixed part)."""
        return self._total(boundaries, self._chunk_costs(self._as_counts(self.counts if counts is None else counts)))

    def _total(self, boundaries: tuple[int, ...], costs: list[list[float]]) -> float:
        total, start = 0.0, 0
        for end in boundaries + ((self.width,) if boundaries[-1] < self.width else ()):
            total += costs[start][end]
            start = end
        return total

    def plan(self, counts) -> tuple[int, ...]:
        """The cheapest boundaries for `(l, n)` counts (or search-length counts, see `expected_cost`)."""
        costs = self._chunk_costs(self._as_counts(counts))
        if self.menu is not None:
            return min(self.menu, key=lambda bounds: (round(self._total(bounds, costs), 9), len(bounds)))
        width = self.width
        best = [0.0] * (width + 1)
        step = [width] * (width + 1)
        for start in range(width - 1, -1, -1):
            # Ties (within 1e-9; chunks no row ever needs cost nothing) go to the larger chunk: fewer boundaries.
            # (A plain loop: this runs at every re-plan of a decoding call, on the host.)
            row = costs[start]
            cost, end_at = row[width] + best[width], width
            for end in range(width - 1, start, -1):
                candidate = row[end] + best[end]
                if candidate < cost - 1e-9:
                    cost, end_at = candidate, end
            best[start], step[start] = cost, end_at
        bounds, start = [], 0
        while start < width:
            start = step[start]
            bounds.append(start)
        return tuple(bounds)

    def _chunk_costs(self, counts: torch.Tensor) -> list[list[float]]:
        """`costs[b][e]`: the expected cost of the chunk `[b, e)` (see the class docstring); 0 where `e <= b`."""
        width, rows = self.width, self.batch_size
        joint = counts / counts.sum().clamp_min(1e-12)
        # needing[b, n]: share of decisions with l > b and n candidates; the fused loop's first chunk runs for all.
        at_least = joint.flip(0).cumsum(0).flip(0)  # rows l >= b
        needing = torch.cat([at_least[1:], torch.zeros_like(at_least[:1])])
        if self.first_for_all:
            needing[0] = joint.sum(0)
        share = needing.sum(1)  # (width + 1,)
        runs = 1.0 - (1.0 - share) ** rows
        if self.first_for_all:
            runs[0] = 1.0
        b = torch.arange(width + 1, dtype=torch.float64)[:, None]
        e = torch.arange(width + 1, dtype=torch.float64)[None, :]
        span = (e - b).clamp_min(0)  # e - b
        if self.narrows:
            # The widest of the chunk's ~B*share rows (each min(e, n) - b wide): E[max] = sum_w P(max > w), w < e - b.
            cdf = (needing.cumsum(1) / share[:, None].clamp_min(1e-12)).clamp(0, 1)  # P(n <= c) among the rows
            in_chunk = (rows * share).clamp_min(1.0)[:, None]
            # P(widest > w) = 1 - P(n <= b + w) ** rows: column b + w of the distribution of n.
            beyond = 1.0 - cdf.gather(1, (b.long() + torch.arange(width + 1)[None, :]).clamp(max=width)) ** in_chunk
            beyond = torch.where(torch.arange(width + 1)[None, :] < (width - b), beyond, 0.0)
            widest = torch.cat([torch.zeros(width + 1, 1, dtype=torch.float64), beyond.cumsum(1)], 1)
            widest = widest.gather(1, span.long())  # sum of P(widest > w) for w < e - b
            tokens = rows * share[:, None] * widest
        else:
            tokens = runs[:, None] * rows * span
        fixed = torch.where(span == 1, self.single_token_cost, 1.0)
        costs = runs[:, None] * fixed + tokens / self.tokens_per_forward
        if self.first_for_all:
            # The fused loop's step is already in the cache when its first chunk is the top-1 alone and every row
            # takes it; otherwise the taken siblings are committed.
            costs[0, 1:] += self.COMMIT_COST
            costs[0, 1] -= self.COMMIT_COST * (1.0 - share[1]) ** rows
        costs = torch.where(span > 0, costs, 0.0)
        costs[share <= 0] = 0.0  # chunks no row ever needs
        return costs.tolist()

    def __repr__(self) -> str:
        return (f"AutoSchedule(tokens_per_forward={self.tokens_per_forward:g}, batch_size={self.batch_size}, "
                f"width={self.width}, boundaries={self.boundaries})")
