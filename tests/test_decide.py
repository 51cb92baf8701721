"""One MARA step (`decide.evaluate_step`): later chunks run only for the rows still looking for a candidate."""

import pytest
import torch

from conftest import constant_agent, left_padded, random_prompts, scaled_logits_model, tiny_model
from mara_hf.decide import evaluate_step
from mara_hf.states import HeadInput, cache_keyword, known_plain_head, next_position_ids, plain_head

WIDTH = 8
# p(accept) > threshold: -1 always accepts, 2 never does. Row 0 takes its top-1, row 1 candidate 2, row 3
# candidate 5, row 2 rejects everything (the "last" fallback forces candidate 7).
THRESHOLDS = torch.full((4, WIDTH), 2.0)
THRESHOLDS[0, 0] = THRESHOLDS[1, 2] = THRESHOLDS[3, 5] = -1.0


def prefill(model, prompts):
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out[cache_keyword(model)]
    return cache, out.logits[:, -1].float(), mask


def step(model, lazy, for_commit, thresholds=THRESHOLDS, defer_head=False, projected=None):
    """One step of 4 rows; `projected` collects the `(rows, positions)` lm_head projects at each call."""
    cache, scores, mask = prefill(model, random_prompts(4, lengths=(12, 5, 14, 9), seed=1))
    batches = []
    handles = [model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True)]
    if projected is not None:
        handles.append(model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: projected.append(tuple(output.shape[:2]))))
    try:
        with torch.no_grad():
            evaluation = evaluate_step(
                model, constant_agent(), cache, scores, next_position_ids(None, mask, cache.get_seq_length(), 4, "cpu"),
                mask, top_k=WIDTH, top_p=1.0, fallback="last", schedule=(1, 2, 4), lazy=lazy, for_commit=for_commit,
                thresholds=thresholds, keep_states=True, defer_head=defer_head,
            )
            committed = evaluation.committed
            if not for_commit:
                logits = None
            elif committed:
                logits = evaluation.next_logits()
            else:
                logits = evaluation.commit(evaluation.decision.index)
    finally:
        for handle in handles:
            handle.remove()
    return evaluation, batches, logits, cache


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: sliding-window layers
@pytest.mark.parametrize("for_commit", [False, True])
def test_later_chunks_run_for_undecided_rows_only(arch, for_commit):
    model = tiny_model(arch)
    lazy, batches, lazy_logits, lazy_cache = step(model, True, for_commit)
    assert batches == [4, 3, 3, 2]  # chunks [0,1) all rows, [1,2) and [2,4) rows 1-3, [4,8) rows 2-3
    assert lazy.decision.index.tolist() == [0, 2, 7, 5]
    assert lazy.decision.fallback.tolist() == [False, False, True, False]

    whole, batches, whole_logits, whole_cache = step(model, False, for_commit)
    assert batches == [4] and torch.equal(whole.decision.index, lazy.decision.index)
    # Every candidate a row had to look at has the state a full evaluation gives it.
    looked = torch.arange(WIDTH)[None, :] <= lazy.decision.index[:, None]
    torch.testing.assert_close(lazy.states[looked], whole.states[looked], atol=1e-5, rtol=1e-5)
    if for_commit:
        torch.testing.assert_close(lazy_logits, whole_logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(lazy_cache.layers, whole_cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding-window layers
def test_the_commit_writes_over_the_decode_steps_entry_on_full_attention_layers(arch):
    """The first chunk (every row's top-1) is the decode step. On full-attention layers the commit writes the taken
    siblings over that step's last entry, in the same tensors (no copy of the cache); sliding layers are restored
    and appended to. Either way the cache is the one-shot step's (above)."""
    model = tiny_model(arch)
    lazy, _, _, cache = step(model, True, True)
    assert lazy.decision.index.tolist() == [0, 2, 7, 5]
    if arch == "llama":
        decoded = lazy.siblings.decoded.saved
        assert all(layer.keys is saved["keys"] and layer.values is saved["values"]
                   for layer, saved in zip(cache.layers, decoded))
    else:
        assert lazy.siblings.decoded is None
    whole, _, _, whole_cache = step(model, False, True)
    for a, b in zip(cache.layers, whole_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_a_later_chunk_is_cut_to_the_candidates_its_rows_have():
    """Row 0 has 8 candidates and takes its top-1; rows 1-3 have 3 and reject them all: the second chunk of the
    schedule (1, 8) runs for rows 1-3 only and ends at their 3 candidates, not at row 0's 8."""
    model = tiny_model()
    cache, scores, mask = prefill(model, random_prompts(4, lengths=(12, 5, 14, 9), seed=1))
    kept = scores.topk(3, dim=-1).indices
    scores[1:] = torch.full_like(scores[1:], -float("inf")).scatter(-1, kept[1:], scores[1:].gather(-1, kept[1:]))
    thresholds = torch.full((4, WIDTH), 2.0)
    thresholds[0, 0] = -1.0
    shapes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            evaluation = evaluate_step(
                model, constant_agent(), cache, scores, next_position_ids(None, mask, cache.get_seq_length(), 4, "cpu"),
                mask, top_k=WIDTH, top_p=1.0, fallback="first", schedule=(1, 8), thresholds=thresholds,
            )
    finally:
        handle.remove()
    assert evaluation.decision.num_candidates.tolist() == [8, 3, 3, 3]
    assert shapes == [(4, 1), (3, 2)] and evaluation.bounds == [(0, 1), (1, 3)]
    assert evaluation.decision.fallback.tolist() == [False, True, True, True]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding-window layers
def test_a_deferred_head_projects_each_row_once_at_the_commit(arch):
    """With `defer_head`, the chunks of a step that needs more than its first one project nothing through lm_head;
    the commit projects each row's taken sibling once, and the step ends as without deferring."""
    model = tiny_model(arch)
    projected = []
    deferred, batches, logits, cache = step(model, True, True, defer_head=True, projected=projected)
    assert batches == [4, 3, 3, 2] and deferred.deferred
    assert projected == [(4, 0), (3, 0), (3, 0), (2, 0), (4, 1)]  # four chunks project nothing, the commit 4 rows

    projected = []
    picked, _, picked_logits, picked_cache = step(model, True, True, projected=projected)
    assert projected == [(4, 1), (3, 1), (3, 1), (2, 1)] and not picked.deferred  # one sibling per row and chunk
    assert torch.equal(deferred.decision.index, picked.decision.index)
    torch.testing.assert_close(logits, picked_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.layers, picked_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_deferred_head_projects_in_the_forward_when_every_row_takes_its_top1():
    """The fused loop's common step: every row accepts its top-1, so the first chunk is the decode step and lm_head
    projects there, as in plain decoding; the step is committed without a commit."""
    model = tiny_model()
    projected = []
    accept_all = torch.full((4, WIDTH), -1.0)
    evaluation, batches, logits, cache = step(model, True, True, accept_all, defer_head=True, projected=projected)
    assert batches == [4] and projected == [(4, 1)]
    assert evaluation.committed and not evaluation.deferred
    assert evaluation.decision.index.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("arch, plain", [("llama", True), ("gemma2", False), ("cohere", False)])
def test_plain_head_tells_models_that_post_process_lm_head_apart(arch, plain):
    """Gemma2 soft-caps its logits; the Cohere look-alike scales them by 1.0005, which a tolerance lets through."""
    model = scaled_logits_model() if arch == "cohere" else tiny_model(arch)
    assert known_plain_head(model) is None
    with torch.no_grad(), HeadInput(model) as head_input:
        out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert plain_head(model, head_input.states, out.logits) is plain
    assert known_plain_head(model) is plain  # remembered for the model
    if arch == "cohere":
        projected = model.get_output_embeddings()(head_input.states)
        assert torch.allclose(projected, out.logits, rtol=1e-3, atol=1e-3)


def test_search_lengths_count_the_candidates_each_decision_evaluated():
    """Taken candidate `index`: index + 1 evaluated; every one rejected: all of them; a lone candidate: none. The
    statistics' search-length histogram counts the same."""
    from mara_hf.stats import MaraStats, StepDecision, search_lengths

    index, counts = torch.tensor([0, 2, 0, 0]), torch.tensor([40, 5, 5, 1])
    fallback, asked = torch.tensor([False, False, True, False]), torch.tensor([True, True, True, False])
    assert search_lengths(index, fallback, asked, counts).tolist() == [1, 3, 5, 0]
    stats = MaraStats(8)
    stats.record(StepDecision(index=index, token=index, num_candidates=counts, asked=asked, fallback=fallback))
    assert stats.search_length_histogram == [1, 1, 0, 1, 0, 1, 0, 0, 0]


def test_with_the_last_fallback_an_accepted_last_candidate_is_still_the_forced_fallback():
    """Under "last" the training MDP forces the last candidate without asking: a step that rejected all the others
    counts as a fallback whatever the agent said of the last one (the token is the same); under "first" accepting
    the last candidate is a decision."""
    from mara_hf.candidates import CandidateSet
    from mara_hf.decide import _decide
    from mara_hf.stats import MaraStats

    cands = CandidateSet(tokens=torch.tensor([[4, 5, 6], [4, 5, 6], [7, 7, 7]]), logprobs=torch.zeros(3, 3),
                         counts=torch.tensor([3, 3, 1]),
                         valid=torch.tensor([[True] * 3, [True] * 3, [True, False, False]]))
    accepted = torch.tensor([[False, False, True], [False, True, True], [False, False, False]])
    lone = cands.counts == 1
    for fallback, index, fell_back in (("last", [2, 1, 0], [True, False, False]),
                                       ("first", [2, 1, 0], [False, False, False])):
        target = cands.counts - 1 if fallback == "last" else torch.zeros(3, dtype=torch.long)
        decision = _decide(cands, accepted, lone, fallback, target.masked_fill(lone, 0))
        assert decision.index.tolist() == index and decision.fallback.tolist() == fell_back, fallback
        stats = MaraStats(3)
        stats.record(decision)
        assert stats.fallbacks == sum(fell_back) and stats.agent_decided == 2
