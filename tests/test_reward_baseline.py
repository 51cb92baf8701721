"""The reward baseline (`reward_baseline="greedy"`, ReMax's): each episode's terminal reward is its answer's score
less the score of the base model's greedy answer to the same prompt, that answer computed as a naive reference
does (each prompt alone, no padding, plain greedy `generate`); the rollout itself does not change, "none" leaves
the paper's terminal reward, and checkpoints written before the option existed still resume."""

import pytest
import torch

import mara_hf.train.trainer as trainer_module
from conftest import random_prompts, tiny_model
from mara_hf.data import encode_chat_prompts
from mara_hf.train import SACConfig, Trainer, TrainConfig, build_transitions
from test_reject_cost import make_trainer, word_tokenizer


def token_score(prompts, responses):
    """Scripted reward that differs from answer to answer: the mean token id of the response / 10."""
    return [sum(int(w[1:]) for w in r.split()) / max(len(r.split()), 1) / 10 for r in responses]


def naive_greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    encoded = encode_chat_prompts(tokenizer, [prompt], "cpu")  # one prompt: no padding
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[2], pad_token_id=0)
    new = out[0, encoded["input_ids"].shape[1]:].tolist()
    new = new[:new.index(2) + 1] if 2 in new else new
    return tokenizer.decode(new, skip_special_tokens=True)


def one_iteration(tmp_path, monkeypatch, baseline: str):
    """The terminal rewards the trainer hands to `build_transitions`, the answers they belong to, and the metrics."""
    calls = []

    def recording(episodes, scores, kl_coef, **costs):
        calls.append((episodes, scores.clone()))
        return build_transitions(episodes, scores, kl_coef, **costs)

    monkeypatch.setattr(trainer_module, "build_transitions", recording)
    config = TrainConfig(iterations=1, rollout_batch_size=4, max_new_tokens=6, learning_starts=0, updates_per_rollout=0,
                         hidden_sizes=(16, 16), initial_accept=0.3, reward_baseline=baseline,
                         sac=SACConfig(batch_size=8, buffer_size=512))
    prompts = [" ".join(f"t{i}" for i in p) for p in random_prompts(8, seed=1)]
    trainer = Trainer(tiny_model(), word_tokenizer(), prompts, token_score, tmp_path, config, progress=False)
    metrics = trainer.step()
    (episodes, terminal), = calls
    answers = [trainer.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
               for row, n in zip(episodes.tokens, episodes.lengths.tolist())]
    return trainer, trainer.batch_prompts(0), answers, terminal, metrics


def test_the_greedy_baseline_subtracts_the_base_answers_score(tmp_path, monkeypatch):
    trainer, prompts, answers, terminal, metrics = one_iteration(tmp_path / "greedy", monkeypatch, "greedy")
    base = [naive_greedy_answer(trainer.model, trainer.tokenizer, p, 6) for p in prompts]
    assert answers != base  # the actor changed some answers, so the baseline is not simply their own score
    expected = torch.tensor(token_score(prompts, answers)) - torch.tensor(token_score(prompts, base))
    torch.testing.assert_close(terminal, expected)
    assert terminal.ne(0).any()
    assert metrics["baseline_reward"] == pytest.approx(sum(token_score(prompts, base)) / len(prompts))
    assert metrics["reward"] == pytest.approx(sum(token_score(prompts, answers)) / len(prompts))

    # without the baseline: the same episodes (the rollout does not change), the raw scores, no baseline metric
    _, same_prompts, same_answers, raw, plain = one_iteration(tmp_path / "none", monkeypatch, "none")
    assert (same_prompts, same_answers) == (prompts, answers)
    torch.testing.assert_close(raw, torch.tensor(token_score(prompts, answers)))
    assert "baseline_reward" not in plain and plain["reward"] == pytest.approx(metrics["reward"])


def test_a_reward_without_finite_scores_for_the_base_answers_is_refused(tmp_path):
    """The baseline's scores are checked like the rollout's: one finite score per answer, else a message that says
    which answers were scored."""
    calls = []

    def second_call_nan(prompts, responses):
        calls.append(len(responses))
        return [float("nan") if len(calls) == 2 else 0.0] * len(responses)

    config = TrainConfig(iterations=1, rollout_batch_size=4, max_new_tokens=4, learning_starts=0, updates_per_rollout=0,
                         hidden_sizes=(16, 16), reward_baseline="greedy", sac=SACConfig(batch_size=8, buffer_size=512))
    prompts = [" ".join(f"t{i}" for i in p) for p in random_prompts(8, seed=1)]
    trainer = Trainer(tiny_model(), word_tokenizer(), prompts, second_call_nan, tmp_path, config, progress=False)
    with pytest.raises(ValueError, match=r"one finite score per response, but gave \[nan, nan, nan, nan\] for the "
                                         r"base model's greedy answers \(the reward baseline\)"):
        trainer.step()


@pytest.mark.parametrize("value", ["mean", "", None, True])
def test_reward_baseline_is_validated(value):
    with pytest.raises(ValueError, match=f"`reward_baseline` has to be one of none, greedy, but is {value!r}"):
        TrainConfig(reward_baseline=value)


def test_checkpoints_without_the_option_resume(tmp_path):
    """`trainer.json` of runs written before `reward_baseline` existed lacks it: such a run resumes without a
    baseline, and continuing it with one is refused like any other changed setting."""
    state = make_trainer(tmp_path / "a").state_dict()
    del state["config"]["reward_baseline"]  # as written by earlier releases
    resumed = make_trainer(tmp_path / "b")
    resumed.load_state_dict(state)
    assert resumed.config.reward_baseline == "none"
    with pytest.raises(ValueError, match=r"other settings \(reward_baseline\)"):
        make_trainer(tmp_path / "c", reward_baseline="greedy").load_state_dict(state)
