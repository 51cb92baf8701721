"""Rewards: score a batch of (prompt, response) pairs, higher is better.

A reward is any callable `(prompts: list[str], responses: list[str]) -> torch.FloatTensor` of shape `(N,)`.
[`Reward`] is a small base class that checks inputs and outputs; every reward here derives from it, but
[`evaluate`](mara_hf.evaluation.evaluate) and [`WeightedReward`] accept plain callables too.

| reward | what it scores | needs |
|---|---|---|
| [`SequenceClassifierReward`] | any `AutoModelForSequenceClassification` reward model | transformers |
| [`beaver_reward`] | PKU safe-rlhf score models (`beaver-7b-v1.0-reward` / `-cost`), no custom code | transformers |
| [`VaderReward`] | VADER compound sentiment of the response, in [-1, 1] | `vaderSentiment` |
| [`OffensiveReward`] | minus the probability that the response is offensive, in [-1, 0] | `alt-profanity-check` |
| [`FluencyReward`] | repeated n-grams, loops, drift from the prompt's language ([`mara_hf.fluency`]), in [-1, 0] | - |
| `FluencyReward(penalty=True)` | the same as a penalty in [0, 1] (`repetition`; weight it negatively) | - |
| [`CallableReward`] | a Python function, e.g. from a `"module:function"` string | - |
| [`WeightedReward`] | a weighted sum, e.g. `2 * reward - 1 * cost` (the paper's 2:1 setting) | - |

[`parse_reward`] builds any of them from a command-line string (see `REWARD_HELP`).

One job per module, everything importable from `mara_hf.rewards`: `base` (the interface and combinators:
`Reward`, `CallableReward`, `WeightedReward`, `as_scores`, `load_callable`, `MissingExtraError`), `text` (the
offline text scorers), `score_models` (transformers reward models and the safe-rlhf score models) and `spec` (the
`--reward` spec parser, `REWARD_HELP`).
"""

from .base import CallableReward, MissingExtraError, Reward, WeightedReward, as_scores, load_callable
from .score_models import (
    BEAVER_MODELS,
    BEAVER_TEMPLATE,
    SAFE_RLHF_MAX_LENGTH,
    SCORE_HEAD_MAPPING,
    ScoreModelReward,
    SequenceClassifierReward,
    beaver_reward,
    resolve_device,
    resolve_dtype,
)
from .spec import (
    BEAVER_OPTIONS,
    KNOWN_REWARDS,
    MODEL_REWARDS,
    REWARD_HELP,
    REWARD_OPTIONS,
    known_rewards,
    parse_reward,
)
from .spec import _split_terms as _split_terms  # tests/test_rewards.py checks the splitting on its own
from .text import FluencyReward, OffensiveReward, VaderReward

__all__ = [
    "BEAVER_MODELS",
    "BEAVER_OPTIONS",
    "BEAVER_TEMPLATE",
    "KNOWN_REWARDS",
    "MODEL_REWARDS",
    "REWARD_HELP",
    "REWARD_OPTIONS",
    "SAFE_RLHF_MAX_LENGTH",
    "SCORE_HEAD_MAPPING",
    "CallableReward",
    "FluencyReward",
    "MissingExtraError",
    "OffensiveReward",
    "Reward",
    "ScoreModelReward",
    "SequenceClassifierReward",
    "VaderReward",
    "WeightedReward",
    "as_scores",
    "beaver_reward",
    "known_rewards",
    "load_callable",
    "parse_reward",
    "resolve_device",
    "resolve_dtype",
]
