"""Scoring answers with the training reward: the checked scores of a batch of answers (`answer_scores`), and the
reward baseline of `TrainConfig.reward_baseline="greedy"` (`baseline_scores`): the base model's own greedy answer to
each prompt, scored by the same reward, to be subtracted from the score of the agent's answer (ReMax, Li et al.
2023, arXiv 2310.10505, uses the same greedy baseline for policy gradients).

Why a baseline: how well an answer can score depends on the prompt far more than on the agent's decisions (answers
to a harmful question score lower than answers to a recipe), and the critics have to learn that spread from the
states alone. The baseline is the same for every episode of a prompt, whatever the agent decides, so it moves no
decision's advantage (up to the discount of the terminal reward, which depends on the answer's length); it takes
the prompt's spread out of the reward, and what is left is how much the agent's answer beats the base model's, the
quantity `mara-hf eval` counts wins and losses of.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..data import answer_lengths, decode_answers, pad_token_id

BASELINES = ("none", "greedy")


def answer_scores(reward: Callable, prompts: list[str], responses: list[str], whose: str = "") -> torch.Tensor:
    """`reward(prompts, responses)` as a float64 `(N,)` tensor; a `ValueError` unless it gave one finite score per
    response (`whose` names the answers in the message)."""
    scores = torch.as_tensor(reward(prompts, responses), dtype=torch.float64).reshape(-1)
    if scores.shape[0] != len(prompts) or not torch.isfinite(scores).all():
        raise ValueError(f"The reward has to give one finite score per response, but gave {scores.tolist()}{whose}.")
    return scores


def greedy_answers(model, tokenizer, encoded: dict, max_new_tokens: int, eos_ids: list[int]) -> list[str]:
    """The base model's greedy answers (plain `generate`, no warpers) to the encoded prompts, up to EOS."""
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                         temperature=None, eos_token_id=eos_ids, pad_token_id=pad_token_id(tokenizer))
    new = out[:, encoded["input_ids"].shape[1]:]
    return decode_answers(tokenizer, new, answer_lengths(new, eos_ids))


def baseline_scores(model, tokenizer, reward: Callable, prompts: list[str], encoded: dict, max_new_tokens: int,
                    eos_ids: list[int]) -> torch.Tensor:
    """The reward of the base model's greedy answer to each prompt, `(N,)` float32."""
    answers = greedy_answers(model, tokenizer, encoded, max_new_tokens, eos_ids)
    return answer_scores(reward, prompts, answers, " for the base model's greedy answers (the reward baseline)").float()
