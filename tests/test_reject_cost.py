"""The compute-aware MDP (issue 11): `reject_cost` is taken off exactly the reject decisions' rewards, 0 leaves the
paper's transitions as they were, the trainer passes its config's cost, and checkpoints written before the option
existed still resume."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mara_hf.train.trainer as trainer_module
from conftest import decisive_agent, left_padded, random_prompts, tiny_model
from mara_hf.train import Rollout, SACConfig, Trainer, TrainConfig, build_transitions, rollout


def scripted_rollout(finite=(True, True)) -> Rollout:
    """Row 0: position 0 reject + accept (KL penalty 0.7), position 2 accept. Row 1: reject, reject, then the last
    candidate forced (penalty 1.5 on the last reject)."""
    return Rollout(
        states=torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 4),
        rows=torch.tensor([0, 0, 0, 1, 1]),
        positions=torch.tensor([0, 0, 2, 0, 0]),
        candidates=torch.tensor([0, 1, 0, 0, 1]),
        actions=torch.tensor([0, 1, 1, 0, 0]),
        penalties=torch.tensor([0.0, 0.7, 0.0, 0.0, 1.5]),
        tokens=torch.zeros(2, 3, dtype=torch.long),
        lengths=torch.tensor([3, 1]),
        kl=torch.tensor([[0.7, 0.0, 0.0], [1.5, 0.0, 0.0]]),
        taken_index=torch.tensor([[1, 0, 0], [2, 0, 0]]),
        asked=torch.tensor([[True, False, True], [True, False, False]]),
        forced=torch.tensor([[False, False, False], [True, False, False]]),
        finite=torch.tensor(finite),
    )


def assert_same_batch(a, b, skip=()):
    for name in ("states", "actions", "rewards", "next_states", "dones", "advances"):
        if name not in skip:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_zero_cost_leaves_the_papers_transitions_unchanged():
    episodes, terminal = scripted_rollout(), torch.tensor([2.0, -1.0])
    paper = build_transitions(episodes, terminal, kl_coef=0.1)
    assert_same_batch(build_transitions(episodes, terminal, kl_coef=0.1, reject_cost=0.0), paper)
    torch.testing.assert_close(paper.rewards, torch.tensor([0.0, -0.07, 2.0, 0.0, -1.0 - 0.15]))


def test_the_cost_lands_exactly_on_reject_decisions():
    episodes, terminal = scripted_rollout(), torch.tensor([2.0, -1.0])
    paper = build_transitions(episodes, terminal, kl_coef=0.1)
    costly = build_transitions(episodes, terminal, kl_coef=0.1, reject_cost=0.25)
    assert_same_batch(costly, paper, skip=("rewards",))
    assert (costly.rewards - paper.rewards).tolist() == [-0.25, 0.0, 0.0, -0.25, -0.25]
    # an episode pays the cost once per reject: row 1 (two rejects, then forced) pays twice
    assert costly.rewards[3:].sum().item() == pytest.approx(-1.0 - 0.15 - 2 * 0.25)
    # a row dropped for a NaN state takes its rejects with it
    dropped = build_transitions(scripted_rollout(finite=(False, True)), terminal, kl_coef=0.1, reject_cost=0.25)
    torch.testing.assert_close(dropped.rewards, torch.tensor([-0.25, -1.15 - 0.25]))


@pytest.mark.parametrize("fallback", ["first", "last"])
def test_the_cost_on_a_real_rollout(fallback):
    """On a rollout of a tiny model with an agent that rejects often, the rewards with a cost differ from the
    paper's by exactly -cost on the reject events (with "first" that includes every candidate of an all-rejected
    position; with "last" the forced candidate is no decision and pays nothing)."""
    model = tiny_model("llama")
    ids, mask = left_padded(random_prompts(4, seed=3))
    episodes = rollout(model, decisive_agent(seed=0, reject_bias=4.0), ids, mask, max_new_tokens=5,
                       eos_token_ids=[2], pad_token_id=0, generator=torch.Generator().manual_seed(0), top_k=6,
                       fallback=fallback)
    rejects = episodes.actions == 0
    assert rejects.any() and (~rejects).any()
    terminal = torch.tensor([1.0, -1.0, 0.5, 0.0])
    paper = build_transitions(episodes, terminal, kl_coef=0.1)
    costly = build_transitions(episodes, terminal, kl_coef=0.1, reject_cost=0.01)
    assert_same_batch(costly, paper, skip=("rewards",))
    torch.testing.assert_close(costly.rewards - paper.rewards, -0.01 * rejects.float())
    assert episodes.forced.any()  # somewhere every candidate the agent may refuse was rejected, and each paid


@pytest.mark.parametrize("value", [-0.01, math.nan, math.inf, True, "0.01"])
def test_reject_cost_is_validated(value):
    with pytest.raises(ValueError, match=f"`reject_cost` has to be a non-negative number, but is {value!r}"):
        TrainConfig(reject_cost=value)


def word_tokenizer(vocab: int = 96) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer: token i is the word `t{i}`; t0 pads, t2 ends."""
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2")


def make_trainer(tmp_path, **overrides):
    values = dict(iterations=1, rollout_batch_size=4, max_new_tokens=4, learning_starts=0, updates_per_rollout=0,
                  hidden_sizes=(16, 16),
                  sac=SACConfig(batch_size=8, buffer_size=512))
    values.update(overrides)
    prompts = [" ".join(f"t{i}" for i in p) for p in random_prompts(8, seed=1)]
    return Trainer(tiny_model(), word_tokenizer(), prompts, lambda p, r: [0.0] * len(r), tmp_path,
                   TrainConfig(**values), progress=False)


def test_the_trainer_passes_its_cost(tmp_path, monkeypatch):
    calls = []

    def recording(episodes, scores, kl_coef, reject_cost=0.0, **others):
        batch = build_transitions(episodes, scores, kl_coef, reject_cost=reject_cost, **others)
        calls.append((reject_cost, episodes.actions.clone(), batch))
        return batch

    monkeypatch.setattr(trainer_module, "build_transitions", recording)
    trainer = make_trainer(tmp_path, reject_cost=0.05, initial_accept=0.3)
    trainer.step()
    (cost, actions, batch), = calls
    assert cost == 0.05 and (actions == 0).any()
    assert len(trainer.buffer) == len(actions)  # what the buffer holds: these transitions, cost included
    assert torch.equal(trainer.buffer.rewards[:len(actions)], batch.rewards)


def test_checkpoints_without_the_option_resume(tmp_path):
    """`trainer.json` of runs written before `reject_cost` existed lacks it: such a run resumes with cost 0, and
    continuing it with another cost is refused like any other changed setting."""
    state = make_trainer(tmp_path / "a").state_dict()
    assert state["config"]["reject_cost"] == 0.0
    del state["config"]["reject_cost"]  # as written by earlier releases
    resumed = make_trainer(tmp_path / "b")
    resumed.load_state_dict(state)
    assert TrainConfig.from_dict(state["config"]) == TrainConfig.from_dict(resumed.config.to_dict())
    with pytest.raises(ValueError, match=r"other settings \(reject_cost\)"):
        make_trainer(tmp_path / "c", reject_cost=0.01).load_state_dict(state)
