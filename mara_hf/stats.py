"""Per-step MARA statistics, shared by the drop-in processor, the fused loop and evaluation.

Counters live on the model's device and are updated without host syncs; they are read (and synced) only when a
user looks at them.
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


class MaraStats:
    """Counters over the tokens MARA decided.

    Read after generation: `tokens` (decided tokens), `agent_decided` (tokens where the agent was asked, i.e.
    more than one candidate), `fallbacks` (every candidate rejected), `accepted_index_histogram` (list: how often
    the token at candidate index i was taken, over agent-decided tokens that did not fall back),
    `search_length_histogram` (list: how many decisions needed l candidates evaluated, l = 0 .. top_k: the taken
    index + 1, all candidates for a fallback, 0 for a lone candidate), `forwards` (sibling forwards run; in the
    fused loop they include the decode forwards), `nonfinite` (NaN/inf accept probabilities seen) and the derived
    rates. `to_dict()` gives all of them.
    """

    def __init__(self, top_k: int, device: torch.device | str | None = None):
        self.top_k = top_k
        # tokens, asked, fallbacks, forwards, nonfinite
        self._counts = torch.zeros(5, dtype=torch.long, device=device)
        self._histogram = torch.zeros(top_k, dtype=torch.long, device=device)
        self._search = torch.zeros(top_k + 1, dtype=torch.long, device=device)

    def record(self, step: StepDecision, active: torch.Tensor | None = None) -> None:
        """Add one step; `active` `(B,)` marks the rows still generating (finished rows are not counted)."""
        if self._counts.device != step.index.device:
            self._counts = self._counts.to(step.index.device)
            self._histogram = self._histogram.to(step.index.device)
            self._search = self._search.to(step.index.device)
        active = torch.ones_like(step.asked) if active is None else active.to(device=step.asked.device, dtype=torch.bool)
        asked = step.asked & active
        self._counts[0] += active.sum()
        self._counts[1] += asked.sum()
        self._counts[2] += (step.fallback & asked).sum()
        counted = asked & ~step.fallback
        self._histogram.scatter_add_(0, step.index.clamp(max=self.top_k - 1), counted.long())
        length = torch.where(step.asked, torch.where(step.fallback, step.num_candidates, step.index + 1), 0)
        self._search.scatter_add_(0, length.clamp(max=self.top_k), active.long())

    def add_forwards(self, count: int) -> None:
        self._counts[3] += count

    def add_nonfinite(self, count: torch.Tensor) -> None:
        """Count NaN/inf accept probabilities (a device tensor: no host read)."""
        self._counts[4] += count.to(self._counts.device)

    @property
    def tokens(self) -> int:
        return int(self._counts[0])

    @property
    def agent_decided(self) -> int:
        return int(self._counts[1])

    @property
    def fallbacks(self) -> int:
        return int(self._counts[2])

    @property
    def forwards(self) -> int:
        return int(self._counts[3])

    @property
    def nonfinite(self) -> int:
        return int(self._counts[4])

    @property
    def accepted_index_histogram(self) -> list[int]:
        return self._histogram.tolist()

    @property
    def search_length_histogram(self) -> list[int]:
        return self._search.tolist()

    @property
    def top1_accept_rate(self) -> float:
        """Share of agent-decided tokens where the top-1 candidate was accepted."""
        decided = self.agent_decided
        return self.accepted_index_histogram[0] / decided if decided else float("nan")

    def to_dict(self) -> dict:
        counts = self._counts.tolist()
        histogram = self._histogram.tolist()
        search = self._search.tolist()
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
            "candidates_evaluated_per_token": evaluated / counts[0] if counts[0] else float("nan"),
        }

    def __repr__(self) -> str:
        d = self.to_dict()
        return (
            f"MaraStats(tokens={d['tokens']}, agent_decided={d['agent_decided']}, fallbacks={d['fallbacks']}, "
            f"forwards={d['forwards']}, accepted_index_histogram={d['accepted_index_histogram']})"
        )
