"""Per-step MARA statistics, shared by the drop-in processor, the fused loop and evaluation.

Recording a step launches nothing: the step's decision tensors are kept and folded into the counters (a few
vectorised operations over all pending steps, on the model's device) only when someone reads them, so decoding pays
no kernel launch and no host sync for statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepDecision:
    """What MARA decided at one step, per row (all tensors of shape `(B,)`).

    Attributes:
        index: position of the taken token in the candidate list (0 = top-1).
        token: the taken token id.
        num_candidates: size of the candidate set.
        asked: whether the agent was asked (more than one candidate).
        fallback: whether every candidate was rejected and the fallback decided.
    """

    index: torch.LongTensor
    token: torch.LongTensor
    num_candidates: torch.LongTensor
    asked: torch.BoolTensor
    fallback: torch.BoolTensor


def search_lengths(index: torch.Tensor, fallback: torch.Tensor, asked: torch.Tensor, counts: torch.Tensor):
    """Candidates each decision had evaluated: `index + 1` when it took candidate `index`, all `counts` when every
    candidate was rejected (`fallback`), none where the agent was not `asked` (a lone candidate)."""
    return torch.where(asked, torch.where(fallback, counts, index + 1), 0)


class MaraStats:
    """Counters over the tokens MARA decided.

    Read after generation: `tokens` (decided tokens), `agent_decided` (tokens where the agent was asked, i.e.
    more than one candidate), `fallbacks` (every candidate rejected), `accepted_index_histogram` (list: how often
    the token at candidate index i was taken, over agent-decided tokens that did not fall back),
    `search_length_histogram` (list: how many decisions needed l candidates evaluated, l = 0 .. top_k: the taken
    index + 1, all candidates for a fallback, 0 for a lone candidate), `search_count_histogram` (the same by the
    decision's number of candidates too: `[l][n]`), `forwards` (sibling forwards run; in the
    fused loop they include the decode forwards), `nonfinite` (NaN/inf accept probabilities seen) and the derived
    rates. `to_dict()` gives all of them.
    """

    FOLD_EVERY = 256
    """Pending steps (or chunks of probabilities) folded into the counters at most, to bound the memory they hold."""

    def __init__(self, top_k: int, device: torch.device | str | None = None):
        self.top_k = top_k
        # tokens, asked, fallbacks, nonfinite (device counters); forwards is a host count
        self._counts = torch.zeros(4, dtype=torch.long, device=device)
        self._histogram = torch.zeros(top_k, dtype=torch.long, device=device)
        self._joint = torch.zeros((top_k + 1) * (top_k + 1), dtype=torch.long, device=device)
        self._forwards = 0
        self._pending: list[tuple] = []
        self._pending_probabilities: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, step: StepDecision, active: torch.Tensor | None = None) -> None:
        """Add one step; `active` `(B,)` marks the rows still generating (finished rows are not counted). Keeps
        references to the step's tensors (which must not be changed in place afterwards)."""
        if self._pending and self._pending[-1][0].shape != step.index.shape:
            self._fold()  # another batch size: pending steps are stacked, so fold those first
        if active is None:
            active = torch.ones_like(step.asked)
        self._pending.append((step.index, step.fallback, step.asked, step.num_candidates, active))
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def add_forwards(self, count: int) -> None:
        self._forwards += int(count)

    def add_probabilities(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a step's accept probabilities `(p, valid)` per chunk, to count NaN/inf ones (`nonfinite`)."""
        self._pending_probabilities.extend(parts)
        if len(self._pending_probabilities) >= self.FOLD_EVERY:
            self._fold_probabilities()

    def _fold(self) -> None:
        """Add the pending steps and probabilities to the counters (vectorised; no host read)."""
        self._fold_decisions()
        self._fold_probabilities()

    def _fold_probabilities(self) -> None:
        if self._pending_probabilities:
            p = torch.cat([p.flatten() for p, _ in self._pending_probabilities])
            valid = torch.cat([valid.flatten().to(p.device) for p, valid in self._pending_probabilities])
            self._to(p.device)
            self._counts[3] += (~torch.isfinite(p) & valid).sum()
            self._pending_probabilities.clear()

    def _fold_decisions(self) -> None:
        if self._pending:
            index, fallback, asked, counts, active = (torch.stack([t.to(self._pending[0][0].device) for t in column])
                                                      for column in zip(*self._pending))
            active = active.to(dtype=torch.bool)
            self._to(asked.device)
            asked = asked & active
            counted = asked & ~fallback
            length = search_lengths(index, fallback, asked, counts)
            self._counts[:3] += torch.stack([active.sum(), asked.sum(), (fallback & asked).sum()])
            self._histogram.scatter_add_(0, index.clamp(max=self.top_k - 1).flatten(), counted.long().flatten())
            cell = length.clamp(max=self.top_k) * (self.top_k + 1) + counts.clamp(max=self.top_k)
            self._joint.scatter_add_(0, cell.flatten(), active.long().flatten())
            self._pending.clear()

    def _to(self, device) -> None:
        if self._counts.device != torch.device(device):
            self._counts, self._histogram, self._joint = (t.to(device) for t in (self._counts, self._histogram,
                                                                                  self._joint))

    def _read(self) -> tuple[list[int], list[int], list[int]]:
        self._fold()
        return self._counts.tolist(), self._histogram.tolist(), self._search_lengths().tolist()

    def _search_lengths(self) -> torch.Tensor:
        return self._joint.view(self.top_k + 1, self.top_k + 1).sum(dim=1)

    @property
    def tokens(self) -> int:
        return self._read()[0][0]

    @property
    def agent_decided(self) -> int:
        return self._read()[0][1]

    @property
    def fallbacks(self) -> int:
        return self._read()[0][2]

    @property
    def forwards(self) -> int:
        return self._forwards

    @property
    def nonfinite(self) -> int:
        return self._read()[0][3]

    @property
    def accepted_index_histogram(self) -> list[int]:
        return self._read()[1]

    @property
    def search_length_histogram(self) -> list[int]:
        self._fold_decisions()
        return self._search_lengths().tolist()

    @property
    def search_count_histogram(self) -> list[list[int]]:
        """`[l][n]`: decisions that needed `l` candidates evaluated and had `n` candidates (both capped at top_k)."""
        self._fold_decisions()
        return self._joint.view(self.top_k + 1, self.top_k + 1).tolist()

    @property
    def top1_accept_rate(self) -> float:
        """Share of agent-decided tokens where the top-1 candidate was accepted."""
        decided = self.agent_decided
        return self.accepted_index_histogram[0] / decided if decided else float("nan")

    def to_dict(self) -> dict:
        counts, histogram, search = self._read()
        counts = counts[:3] + [self._forwards, counts[3]]
        evaluated = sum(length * n for length, n in enumerate(search))
        return {
            "tokens": counts[0],
            "agent_decided": counts[1],
            "fallbacks": counts[2],
            "forwards": counts[3],
            "nonfinite": counts[4],
            "accepted_index_histogram": histogram,
            "search_length_histogram": search,
            "agent_decided_rate": counts[1] / counts[0] if counts[0] else float("nan"),
            "fallback_rate": counts[2] / counts[1] if counts[1] else float("nan"),
            "top1_accept_rate": histogram[0] / counts[1] if counts[1] else float("nan"),
            "forwards_per_token": counts[3] / counts[0] if counts[0] else float("nan"),
            "mean_search_length": evaluated / counts[0] if counts[0] else float("nan"),
        }

    def __repr__(self) -> str:
        d = self.to_dict()
        return (
            f"MaraStats(tokens={d['tokens']}, agent_decided={d['agent_decided']}, fallbacks={d['fallbacks']}, "
            f"forwards={d['forwards']}, accepted_index_histogram={d['accepted_index_histogram']})"
        )


def check_stats(stats, width: int, name: str = "mara_stats") -> None:
    """Eager check of statistics passed in to accumulate a call that has up to `width` candidates per row (`None`:
    nothing passed)."""
    if stats is None:
        return
    if not isinstance(stats, MaraStats):
        raise TypeError(f"`{name}` has to be a `MaraStats` to accumulate into, but is a {type(stats).__name__}.")
    if stats.top_k < width:
        raise ValueError(
            f"`{name}` counts decisions among at most {stats.top_k} candidates, but this call has up to {width} (its "
            f"top_k): create it as `MaraStats({width})`."
        )
