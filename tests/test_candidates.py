import pytest
import torch

from mara_hf.candidates import build_candidates, fallback_index, first_accepted, keepable
from reference import naive_candidates


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.0), (5, 0.95, 0.0), (40, 0.5, 0.0), (3, 1.0, 0.0),
                                               (40, 0.01, 0.0), (40, 0.95, 0.25), (40, 1.0, 0.05), (5, 0.5, 0.5)])
def test_candidates_match_reference(top_k, top_p, min_p):
    torch.manual_seed(0)
    scores = torch.randn(6, 300) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 20.0])[:, None]
    original = scores.clone()
    cands = build_candidates(scores, top_k, top_p, min_p)
    assert torch.equal(scores, original), "scores must not be modified"
    for row in range(scores.shape[0]):
        expected = naive_candidates(scores[row], top_k, top_p, min_p)
        count = cands.counts[row].item()
        assert cands.tokens[row, :count].tolist() == expected
        assert torch.isfinite(cands.logprobs[row, :count]).all()
        assert not torch.isfinite(cands.logprobs[row, count:]).any()
        # padded slots repeat the top-1 so they are valid ids
        assert (cands.tokens[row, count:] == cands.tokens[row, 0]).all()


def test_candidates_are_sorted_by_probability():
    scores = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    cands = build_candidates(scores, top_k=4, top_p=1.0)
    assert cands.tokens[0].tolist() == [1, 4, 2, 0]
    assert (cands.logprobs[0, :-1] >= cands.logprobs[0, 1:]).all()


def test_equal_scores_are_in_token_order_so_the_top1_is_greedy_argmax():
    """`topk` leaves equal values in no set order; half-precision logits tie often, and greedy decoding (`argmax`)
    takes the first of equal maxima."""
    scores = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, -1.0, 1.0],
                           [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -1.0]]).to(torch.bfloat16)
    cands = build_candidates(scores, top_k=6, top_p=1.0)
    assert cands.tokens.tolist() == [[1, 3, 4, 2, 6, 0], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(cands.tokens[:, 0], scores.float().argmax(dim=-1))
    for row in range(2):
        assert cands.tokens[row].tolist() == naive_candidates(scores[row], 6, 1.0)


def test_lone_candidate_when_one_token_dominates():
    scores = torch.full((1, 50), -10.0)
    scores[0, 7] = 10.0
    cands = build_candidates(scores, top_k=40, top_p=0.95)
    assert cands.counts.tolist() == [1] and cands.tokens[0, 0].item() == 7


def test_decision_helpers():
    accepted = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    any_accepted, index = first_accepted(accepted)
    assert any_accepted.tolist() == [True, False, True]
    assert index.tolist() == [1, 0, 0]
    counts = torch.tensor([3, 2, 5])
    assert fallback_index(counts, "first").tolist() == [0, 0, 0]
    assert fallback_index(counts, "last").tolist() == [2, 1, 4]


def test_first_accepted_reduces_by_value_not_by_index():
    """The first accepted index comes from a value reduction (`amin` over positions), never an index reduction
    (`max(dim)`, `argmax`, `argmin`) of the flags: inductor has miscompiled index reductions of boolean and 8-bit
    tensors (pytorch/pytorch#174069, #184893, #191499), and with torch 2.11 and 2.12 the compiled static step's
    `accepted.to(torch.uint8).max(dim=-1)` kept sibling 0 in every row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    accepted = torch.rand(4, 40, generator=torch.Generator().manual_seed(0)) > 0.7
    accepted[1] = False
    with Ops() as ops:
        found, index = first_accepted(accepted)
    assert not ops.seen & {"max", "min", "argmax", "argmin"}, ops.seen
    expected = [row.nonzero()[0, 0].item() if row.any() else 0 for row in accepted]
    assert found.tolist() == accepted.any(-1).tolist() and index.tolist() == expected


def test_keepable_compiled_after_the_agent_matches_eager():
    """What the compiled static step runs: the agent's p(accept), then `keepable`, compiled by inductor as one graph
    (the fusion in which the CPU inductor of torch 2.11 and 2.12 returned sibling 0 for every row), equal to eager."""
    from mara_hf import MaraAgent

    torch.manual_seed(0)
    agent = MaraAgent(64).eval()

    def pick(states, thresholds, valid, target, start: int):
        p = agent.accept_probability(states)
        return p, keepable(p, thresholds, valid, target, start)

    compiled = torch.compile(pick, backend="inductor", dynamic=False)
    for start, width in ((1, 7), (1, 39), (8, 32)):
        states = torch.randn(16, width, 64)
        valid = (torch.rand(16, 40) > 0.05)[:, start:start + width]  # a slice, as the step passes it
        target = torch.randint(0, 40, (16,))
        with torch.no_grad():
            p, eager = pick(states, 0.5, valid, target, start)
            _, got = compiled(states, 0.5, valid, target, start)
        assert 0 < ((p > 0.5) & valid).float().mean() < 1  # some candidates accepted, some not
        assert torch.equal(got, eager), (start, width, got.tolist(), eager.tolist())


@pytest.mark.parametrize("top_k,top_p", [(40, 0.95), (10, 0.7), (40, 0.3)])
def test_same_set_as_transformers_warpers_on_the_full_vocabulary(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(1)
    scores = torch.randn(8, 1000) * torch.linspace(0.5, 12.0, 8)[:, None]
    logprobs = torch.log_softmax(scores, dim=-1)
    filtered = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logprobs))
    cands = build_candidates(scores, top_k, top_p)
    for row in range(8):
        kept = torch.isfinite(filtered[row]).nonzero().squeeze(-1)
        expected = kept[filtered[row, kept].argsort(descending=True)].tolist()
        assert cands.tokens[row, : cands.counts[row]].tolist() == expected


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.25), (10, 0.9, 0.3), (40, 1.0, 0.05)])
def test_min_p_is_transformers_min_p_warper_after_top_k_and_top_p(top_k, top_p, min_p):
    """On the full vocabulary: TopK, TopP then MinP warpers give the candidate set, and every candidate is at least
    `min_p` times as probable as the top-1 (so a taken token is at most log(1 / min_p) nats below it)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(2)
    scores = torch.randn(8, 1000) * torch.linspace(0.5, 12.0, 8)[:, None]
    logprobs = torch.log_softmax(scores, dim=-1)
    filtered = MinPLogitsWarper(min_p)(None, TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logprobs)))
    cands = build_candidates(scores, top_k, top_p, min_p)
    assert (cands.counts < build_candidates(scores, top_k, top_p).counts).any()
    for row in range(8):
        kept = torch.isfinite(filtered[row]).nonzero().squeeze(-1)
        expected = kept[filtered[row, kept].argsort(descending=True)].tolist()
        count = cands.counts[row]
        assert cands.tokens[row, :count].tolist() == expected
        gaps = cands.logprobs[row, :1] - cands.logprobs[row, :count]
        assert (gaps <= -torch.log(torch.tensor(min_p)) + 1e-5).all()


def test_keepable_is_the_first_accepted_else_the_fallback_in_the_chunk_and_the_only_sibling_of_a_chunk_of_one():
    """The sibling a row may keep from a chunk: its first accepted one; else the fallback candidate when the chunk
    holds it; else 0. A chunk of one sibling per row (the decode step) keeps that one, whatever the agent says."""
    p = torch.tensor([[0.1, 0.9, 0.8], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    valid = torch.ones(3, 3, dtype=torch.bool)
    target = torch.tensor([0, 4, 6])  # row 1: its "last" fallback (index 4) lies in the chunk 2..4; row 2's does not
    assert keepable(p, 0.5, valid, target, start=2).tolist() == [1, 2, 0]
    for accept in (0.0, 1.0):
        one = torch.full((3, 1), accept)
        assert keepable(one, 0.5, valid[:, :1], target, start=0).tolist() == [0, 0, 0]
        assert keepable(one, 0.5, valid[:, :1], target, start=4).tolist() == [0, 0, 0]
