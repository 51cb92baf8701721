"""Candidate sets and the accept/reject decision rule, vectorised over the batch.

MARA's candidates at a step are built as the original code builds them: `log_softmax(logits)`, then top-k and
transformers' `TopPLogitsWarper(top_p)` (as `TopKLogitsWarper` then `TopPLogitsWarper` compute them), sorted by
probability. The agent walks
them in that order and the first accepted one is taken; when every candidate is rejected, the fallback decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopPLogitsWarper


@dataclass
class CandidateSet:
    """The candidates of every row, padded to the largest set in the batch.

    Attributes:
        tokens (`torch.LongTensor` of shape `(batch, width)`): candidate ids, most probable first; padded slots
            repeat the row's top-1 so that they are always valid token ids.
        logprobs (`torch.FloatTensor` of shape `(batch, width)`): their log-probabilities (`-inf` in padded slots).
        counts (`torch.LongTensor` of shape `(batch,)`): how many candidates each row has (at least 1).
    """

    tokens: torch.LongTensor
    logprobs: torch.FloatTensor
    counts: torch.LongTensor

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def valid(self) -> torch.BoolTensor:
        """`(batch, width)`: which slots hold a real candidate."""
        return torch.arange(self.width, device=self.counts.device) < self.counts[:, None]

    def trimmed(self, width: int) -> "CandidateSet":
        """The same set cut to its first `width` slots (the caller knows no row has more)."""
        return CandidateSet(self.tokens[:, :width], self.logprobs[:, :width], self.counts)


def build_candidates(scores: torch.Tensor, top_k: int, top_p: float) -> CandidateSet:
    """MARA's candidate set for each row of `scores` `(batch, vocab)`; `scores` is not modified.

    Example:

    ```python
    >>> import torch
    >>> from mara_hf.candidates import build_candidates
    >>> cands = build_candidates(torch.tensor([[2.0, 1.0, -5.0, 0.5]]), top_k=3, top_p=0.95)
    >>> cands.tokens.tolist(), cands.counts.tolist()
    ([[0, 1, 3]], [3])

    ```
    """
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    # transformers' TopKLogitsWarper keeps the k best; TopPLogitsWarper then renormalises over them. Running the
    # top-p warper on the `(B, k)` top-k values gives the same set as on the full vocabulary (the removed tokens
    # carry no mass) without sorting the whole vocabulary every step. Neither input is modified.
    width = min(top_k, logprobs.shape[-1])
    values, tokens = torch.topk(logprobs, k=width, dim=-1, sorted=True)
    values = TopPLogitsWarper(top_p=top_p)(None, values)
    kept = values > -float("inf")
    counts = kept.sum(dim=-1).clamp_min(1)
    tokens = torch.where(kept, tokens, tokens[:, :1])
    return CandidateSet(tokens=tokens, logprobs=values, counts=counts)


def first_accepted(accepted: torch.BoolTensor) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """For `(batch, n)` accept flags, whether any is set and the index of the first one (0 where none)."""
    any_accepted = accepted.any(dim=-1)
    index = torch.where(any_accepted, accepted.to(torch.int8).argmax(dim=-1), 0)
    return any_accepted, index


def fallback_index(counts: torch.LongTensor, fallback: str) -> torch.LongTensor:
    """Index taken when every candidate is rejected: 0 for `"first"`, the last candidate for `"last"`."""
    if fallback == "first":
        return torch.zeros_like(counts)
    return counts - 1
