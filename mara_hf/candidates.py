"""Candidate sets and the accept/reject decision rule, vectorised over the batch.

MARA's candidates at a step are built as the original code builds them: `log_softmax(logits)`, then top-k and
transformers' `TopPLogitsWarper(top_p)` (as `TopKLogitsWarper` then `TopPLogitsWarper` compute them), sorted by
probability (equal probabilities by token id, as greedy's `argmax` orders them); optionally (`min_p > 0`, not in the
paper) transformers' `MinPLogitsWarper(min_p)` then drops the candidates less probable than `min_p` times the top-1,
which bounds how far below the top-1 a taken token can be (`log(1 / min_p)` nats). The agent walks them in that
order and the first accepted one is taken; when every candidate is rejected, the fallback decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopPLogitsWarper


@dataclass
class CandidateSet:
    """The candidates of every row, padded to the largest set in the batch.

    Attributes:
        tokens (`torch.LongTensor` of shape `(batch, width)`): candidate ids, most probable first; padded slots
            repeat the row's top-1 so that they are always valid token ids.
        logprobs (`torch.FloatTensor` of shape `(batch, width)`): their log-probabilities (`-inf` in padded slots).
        counts (`torch.LongTensor` of shape `(batch,)`): how many candidates each row has (at least 1).
        valid (`torch.BoolTensor` of shape `(batch, width)`): which slots hold a real candidate (the first
            `counts` of each row).
    """

    tokens: torch.LongTensor
    logprobs: torch.FloatTensor
    counts: torch.LongTensor
    valid: torch.BoolTensor

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


def build_candidates(scores: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> CandidateSet:
    """MARA's candidate set for each row of `scores` `(batch, vocab)`; `scores` is not modified. `min_p` (0: off,
    the paper's set) also drops candidates whose probability is below `min_p` times the top-1's.

    Example:

    ```python
    >>> import torch
    >>> from mara_hf.candidates import build_candidates
    >>> cands = build_candidates(torch.tensor([[2.0, 1.0, -5.0, 0.5]]), top_k=3, top_p=0.95)
    >>> cands.tokens.tolist(), cands.counts.tolist()
    ([[0, 1, 3]], [3])
    >>> build_candidates(torch.tensor([[2.0, 1.0, -5.0, 0.5]]), top_k=3, top_p=0.95, min_p=0.3).counts.tolist()
    [2]

    ```
    """
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    # transformers' TopKLogitsWarper keeps the k best; TopPLogitsWarper then renormalises over them. Running the
    # top-p warper on the `(B, k)` top-k values gives the same set as on the full vocabulary (the removed tokens
    # carry no mass) without sorting the whole vocabulary every step. Neither input is modified.
    width = min(top_k, logprobs.shape[-1])
    values, tokens = torch.topk(logprobs, k=width, dim=-1, sorted=True)
    # Equal values in token order, as `argmax` (greedy decoding) takes the first of equal maxima: `topk` leaves
    # them in no set order, and half-precision logits tie often. (Both sorts are stable over `(B, k)`.)
    tokens, by_token = tokens.sort(dim=-1, stable=True)
    values, order = values.gather(-1, by_token).sort(dim=-1, descending=True, stable=True)
    tokens = tokens.gather(-1, order)
    values = TopPLogitsWarper(top_p=top_p)(None, values)
    if min_p > 0:
        # MinPLogitsWarper compares probabilities with the top-1's: renormalising over the kept set changes no ratio.
        values = MinPLogitsWarper(min_p=min_p)(None, values)
    kept = values > -float("inf")  # a prefix of each row: both remove from the least probable end, never the top-1
    counts = kept.sum(dim=-1)
    tokens = torch.where(kept, tokens, tokens[:, :1])
    return CandidateSet(tokens=tokens, logprobs=values, counts=counts, valid=kept)


def first_accepted(accepted: torch.BoolTensor) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """For `(batch, n)` accept flags, whether any is set and the index of the first one (0 where none)."""
    # The least position holding a flag, reduced by value over int64 positions rather than by index (`max(dim)` /
    # `argmax` of the flags): the compiled static step runs this, and inductor has miscompiled index reductions of
    # boolean and 8-bit tensors (pytorch/pytorch#174069 on CUDA, #184893 on CPU, #191499 for 8-bit on x86); with
    # torch 2.11 and 2.12 on the CPU, `accepted.to(torch.uint8).max(dim=-1)` after the agent's softmax returned 0 for
    # every row.
    width = accepted.shape[-1]
    first = torch.where(accepted, torch.arange(width, device=accepted.device), width).amin(dim=-1)
    found = first < width
    return found, first.masked_fill(~found, 0)


def keepable(p_accept: torch.Tensor, thresholds, valid: torch.BoolTensor, target: torch.LongTensor,
             start: int | torch.Tensor):
    """Per row, the sibling of a chunk (candidates `start .. start + n - 1`, accept probabilities `p_accept`
    `(B, n)`) that the row may keep: its first accepted one; else the fallback candidate `target` (absolute index)
    when it lies in the chunk; else 0. Pure tensor code, shared by the eager and the compiled step (which passes
    `start` as a 0-d tensor)."""
    count = p_accept.shape[-1]
    if count == 1:  # a chunk of one sibling per row (the fused loop's decode step): that one, whatever the agent says
        return torch.zeros_like(target)
    any_accepted, first = first_accepted((p_accept > thresholds) & valid)
    in_chunk = (target >= start) & (target < start + count)
    return torch.where(any_accepted | ~in_chunk, first, (target - start).clamp(0, count - 1))


def fallback_index(counts: torch.LongTensor, fallback: str) -> torch.LongTensor:
    """Index taken when every candidate is rejected: 0 for `"first"`, the last candidate for `"last"`."""
    if fallback == "first":
        return torch.zeros_like(counts)
    return counts - 1
