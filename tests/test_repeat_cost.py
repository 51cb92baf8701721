"""The token-level repetition cost (issue 11): `repeated_ngrams` marks exactly the tokens that complete a 4-gram
their answer already holds, `repeat_cost` is taken off exactly the decision that chose each such token, 0 leaves
the paper's transitions as they were, and the trainer passes its config's cost."""

import math

import pytest
import torch

import mara_hf.train.trainer as trainer_module
from conftest import decisive_agent, left_padded, random_prompts, tiny_model
from mara_hf.train import Rollout, TrainConfig, build_transitions, rollout
from mara_hf.train.rollout import REPEAT_NGRAM, repeated_ngrams
from reference import naive_repeated
from test_reject_cost import assert_same_batch, make_trainer


@pytest.mark.parametrize("n", [1, 2, 4])
def test_repeated_ngrams_equals_a_naive_reference(n):
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 3, (16, 20), generator=g)  # three token ids: repeats everywhere
    lengths = torch.randint(0, 21, (16,), generator=g)
    got = repeated_ngrams(tokens, lengths, n)
    assert got.tolist() == [naive_repeated(row, int(length), n) for row, length in zip(tokens.tolist(), lengths)]
    assert got.any() and not got.all()
    short = repeated_ngrams(tokens[:, :n], lengths, n)  # one n-gram per row: nothing can repeat
    assert short.shape == (16, n) and not short.any()


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_repeated_ngrams_validates_n(n):
    with pytest.raises(ValueError, match=rf"`n` has to be a positive integer, but is {n!r}\."):
        repeated_ngrams(torch.zeros(1, 5, dtype=torch.long), torch.tensor([5]), n)


def looping_rollout() -> Rollout:
    """Row 0 answers 5 6 7 8 5 6 7 8 (position 7 completes the repeated 4-gram 5 6 7 8): reject + accept at
    positions 0 and 7. Row 1 answers 1 1 1 1 1 1 (positions 4 and 5 repeat 1 1 1 1): at position 4 both candidates
    are rejected (the fallback is taken, chosen by the last reject), at 5 the top-1 is accepted."""
    return Rollout(
        states=torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 4),
        rows=torch.tensor([0, 0, 0, 0, 1, 1, 1]),
        positions=torch.tensor([0, 0, 7, 7, 4, 4, 5]),
        candidates=torch.tensor([0, 1, 0, 1, 0, 1, 0]),
        actions=torch.tensor([0, 1, 0, 1, 0, 0, 1]),
        penalties=torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0, 0.0, 0.0]),
        tokens=torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8], [1, 1, 1, 1, 1, 1, 0, 0]]),
        lengths=torch.tensor([8, 6]),
        kl=torch.zeros(2, 8),
        taken_index=torch.zeros(2, 8, dtype=torch.long),
        asked=torch.zeros(2, 8, dtype=torch.bool),
        forced=torch.zeros(2, 8, dtype=torch.bool),
        finite=torch.tensor([True, True]),
    )


def test_the_cost_lands_on_the_decision_that_chose_a_repeating_token():
    episodes, terminal = looping_rollout(), torch.tensor([2.0, -1.0])
    paper = build_transitions(episodes, terminal, kl_coef=0.1)
    assert_same_batch(build_transitions(episodes, terminal, kl_coef=0.1, repeat_cost=0.0), paper)
    costly = build_transitions(episodes, terminal, kl_coef=0.1, repeat_cost=0.5)
    assert_same_batch(costly, paper, skip=("rewards",))
    assert (costly.rewards - paper.rewards).tolist() == [0.0, 0.0, 0.0, -0.5, 0.0, -0.5, -0.5]
    both = build_transitions(episodes, terminal, kl_coef=0.1, reject_cost=0.25, repeat_cost=0.5)
    rejects = (episodes.actions == 0).float()
    torch.testing.assert_close(both.rewards, costly.rewards - 0.25 * rejects)
    assert episodes.metrics()["repeat_rate"] == pytest.approx(3 / 14)


@pytest.mark.parametrize("fallback", ["first", "last"])
def test_the_cost_on_a_real_rollout(fallback):
    """On a rollout of a tiny model whose answers repeat, the rewards with a cost differ from the paper's by -cost
    on exactly one event of each decided token that repeats a 4-gram (lone candidates are no decision, and pay
    nothing), and that event is the last one of its position."""
    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(6, seed=3))
    episodes = rollout(model, decisive_agent(seed=0, reject_bias=2.0), ids, mask, max_new_tokens=24,
                       eos_token_ids=[2], pad_token_id=0, generator=torch.Generator().manual_seed(0), top_k=6,
                       fallback=fallback)
    terminal = torch.zeros(6)
    paper = build_transitions(episodes, terminal, kl_coef=0.1)
    costly = build_transitions(episodes, terminal, kl_coef=0.1, repeat_cost=0.5)
    assert_same_batch(costly, paper, skip=("rewards",))
    paid = (costly.rewards - paper.rewards) != 0
    repeated = repeated_ngrams(episodes.tokens, episodes.lengths, REPEAT_NGRAM)
    decided = torch.zeros_like(repeated)
    decided[episodes.rows, episodes.positions] = True
    assert (repeated & decided).sum() > 0  # the tiny model loops, and some looping tokens were decided
    assert paid.sum() == (repeated & decided).sum()
    torch.testing.assert_close((costly.rewards - paper.rewards)[paid], torch.full((int(paid.sum()),), -0.5))
    rows, positions = episodes.rows, episodes.positions
    assert repeated[rows[paid], positions[paid]].all()
    last_of_position = torch.ones_like(rows, dtype=torch.bool)
    last_of_position[:-1] = (rows[1:] != rows[:-1]) | (positions[1:] != positions[:-1])
    assert torch.equal(paid, last_of_position & repeated[rows, positions])


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, True, "0.5"])
def test_repeat_cost_is_validated(value):
    with pytest.raises(ValueError, match=f"`repeat_cost` has to be a non-negative number, but is {value!r}"):
        TrainConfig(repeat_cost=value)


def test_the_trainer_passes_its_cost_and_logs_the_repeat_rate(tmp_path, monkeypatch):
    calls = []

    def recording(episodes, scores, kl_coef, **costs):
        calls.append(costs)
        return build_transitions(episodes, scores, kl_coef, **costs)

    monkeypatch.setattr(trainer_module, "build_transitions", recording)
    trainer = make_trainer(tmp_path, repeat_cost=0.5, reject_cost=0.01)
    metrics = trainer.step()
    assert calls == [{"reject_cost": 0.01, "repeat_cost": 0.5}]
    assert 0.0 <= metrics["repeat_rate"] <= 1.0


def test_checkpoints_without_the_option_resume(tmp_path):
    """`trainer.json` of runs written before `repeat_cost` existed lacks it: such a run resumes with cost 0, and
    continuing it with another cost is refused like any other changed setting."""
    state = make_trainer(tmp_path / "a").state_dict()
    del state["config"]["repeat_cost"]  # as written by earlier releases
    resumed = make_trainer(tmp_path / "b")
    resumed.load_state_dict(state)
    assert resumed.config.repeat_cost == 0.0
    with pytest.raises(ValueError, match=r"other settings \(repeat_cost\)"):
        make_trainer(tmp_path / "c", repeat_cost=0.5).load_state_dict(state)
