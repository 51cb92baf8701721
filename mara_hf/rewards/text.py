"""Offline text scorers: they read the response (and, for fluency, the prompt) as text, run on CPU and download
nothing. [`VaderReward`] (VADER sentiment, `vaderSentiment`), [`OffensiveReward`] (minus the offensive-language
probability, `alt-profanity-check`) and [`FluencyReward`] (repeated n-grams, loops, language drift:
[`mara_hf.fluency`], no dependency). The optional packages are imported when a reward is built."""

from __future__ import annotations

import torch

from ..fluency import FLUENCY_DEFINITION, fluency
from .base import Reward, _require


class VaderReward(Reward):
    """VADER compound sentiment of the response (the prompt is ignored), in [-1, 1]; higher is more positive.
    Needs `pip install vaderSentiment`; runs on CPU, no model download."""

    name = "vader"

    def __init__(self):
        module = _require("vaderSentiment.vaderSentiment", "vaderSentiment", "VADER")
        self.analyzer = module.SentimentIntensityAnalyzer()

    def score(self, prompts, responses):
        return [self.analyzer.polarity_scores(response)["compound"] for response in responses]


class OffensiveReward(Reward):
    """Minus the probability that the response is offensive language (the prompt is ignored), in [-1, 0]:
    higher is better, i.e. less offensive. The probability is `profanity_check.predict_prob`, a linear SVM over
    bag-of-words features. Needs `pip install alt-profanity-check`; runs on CPU, no model download."""

    name = "offensive"

    def __init__(self):
        self.predict_prob = _require("profanity_check", "alt-profanity-check", "offensive-language").predict_prob

    def score(self, prompts, responses):
        return -torch.as_tensor(self.predict_prob(list(responses)), dtype=torch.float32)


class FluencyReward(Reward):
    """How fluent the response looks, from 0 (fluent) down to -1 (degenerate), by a cheap offline screen
    ([`mara_hf.fluency.fluency`]): `-max(repetition, loop, drift)` where repetition grows with the share of
    repeated word trigrams, loop with the longest immediate repetition of a word n-gram, and drift with letters in a
    script the prompt does not use or function words of another language than the prompt's. An answer scoring
    -0.5 or less counts as degenerate; `mara-hf eval` reports the share of those for both sides.

    Meant as a term of weighted sums (e.g. `10*vader+5*fluency`): it costs nothing on fluent text and up to the
    term's weight on loops and language drift. Runs anywhere, no download.

    With `penalty=True` (the `repetition` reward) it returns minus that, in [0, 1], higher = more degenerate, to be
    weighted negatively like `beaver-cost`: `10*vader-5*repetition` is `10*vader+5*fluency`.

    Args:
        penalty: return `-fluency` instead.
        name: shown in reports (default `"repetition"` with `penalty`, else `"fluency"`).
    """

    definition = FLUENCY_DEFINITION

    def __init__(self, penalty: bool = False, name: str | None = None):
        self.penalty = bool(penalty)
        self.name = name or ("repetition" if self.penalty else "fluency")

    def score(self, prompts, responses):
        sign = -1.0 if self.penalty else 1.0
        return [0.0 + sign * fluency(prompt, response) for prompt, response in zip(prompts, responses)]
