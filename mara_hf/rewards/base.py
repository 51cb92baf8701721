"""The reward interface and its combinators.

A reward is any callable `(prompts: list[str], responses: list[str]) -> torch.FloatTensor` of shape `(N,)`, higher
is better. [`Reward`] is a small base class that checks inputs and outputs; every reward of `mara_hf.rewards`
derives from it, but [`evaluate`](mara_hf.evaluation.evaluate) and [`WeightedReward`] accept plain callables too.
[`CallableReward`] wraps a Python function (e.g. one named by a `"module:function"` string, [`load_callable`]);
[`WeightedReward`] sums rewards with weights. [`MissingExtraError`] is what a reward raises when its optional
dependency is not installed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch


class MissingExtraError(ImportError, RuntimeError):
    """An optional dependency is not installed; the message names the `pip install` command."""


def _require(module: str, pip_name: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"The {what} reward needs `{pip_name}`: pip install {pip_name}") from err


def _check_pairs(prompts, responses) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("A reward takes lists of strings (prompts, responses), not single strings.")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"A reward needs as many prompts as responses, got {len(prompts)} and {len(responses)}.")
    for label, items in (("prompt", prompts), ("response", responses)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"Every {label} has to be a string; item {i} is a {type(item).__name__}.")
    return prompts, responses


def as_scores(values, count: int, name: str = "reward") -> torch.FloatTensor:
    """`values` (tensor, array, list) as a float32 CPU tensor of shape `(count,)`, or a `ValueError`."""
    try:
        scores = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                                 dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"Reward {name} returned {type(values).__name__}, which is not a list of numbers.") from err
    if scores.shape != (count,):
        raise ValueError(f"Reward {name} returned shape {tuple(scores.shape)} for {count} responses; "
                         f"expected ({count},).")
    return scores


class Reward:
    """Base class of the rewards: `reward(prompts, responses)` checks the inputs, calls `score` and checks that
    it returned one number per response. Subclasses implement `score(prompts, responses)`."""

    name: str = "reward"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.FloatTensor:
        prompts, responses = _check_pairs(prompts, responses)
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        return as_scores(self.score(prompts, responses), len(prompts), self.name)

    def score(self, prompts: list[str], responses: list[str]):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CallableReward(Reward):
    """A Python callable `fn(prompts, responses)` returning N numbers (list, array or tensor).

    Args:
        fn: the callable.
        name: shown in reports (default: the function's qualified name).
    """

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"A CallableReward needs a callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__

    def score(self, prompts, responses):
        return self.fn(prompts, responses)


def load_callable(spec: str) -> Callable:
    """The object named by `"module:function"` (or `"module:Class.attribute"`). A class is instantiated without
    arguments, so `"mymodule:MyReward"` works for a reward class."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(part.strip() for part in spec.split(":")):
        raise ValueError(f"'{spec}' is not of the form 'module:function'.")
    module_name, attribute = (part.strip() for part in spec.split(":"))
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module '{module_name}' for reward '{spec}': {err}") from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Module '{module_name}' has no attribute '{attribute}' (reward '{spec}').")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"'{spec}' is a {type(obj).__name__}, not a callable (prompts, responses) -> scores.")
    return obj


class WeightedReward(Reward):
    """`sum(weight * reward(prompts, responses))` over `terms`, e.g. `WeightedReward([(2, reward), (-1, cost)])`
    for the paper's 2:1 reward/cost setting.

    Args:
        terms: `(weight, reward)` pairs; rewards are any reward callables.
        name: shown in reports (default: built from the terms).
    """

    def __init__(self, terms: Sequence[tuple[float, Callable]], name: str | None = None):
        terms = list(terms)
        if not terms:
            raise ValueError("A WeightedReward needs at least one (weight, reward) pair.")
        checked = []
        for i, term in enumerate(terms):
            if not isinstance(term, (tuple, list)) or len(term) != 2:
                raise ValueError(f"Term {i} of a WeightedReward has to be a (weight, reward) pair, got {term!r}.")
            weight, reward = term
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"The weight of term {i} has to be a finite number, got {weight!r}.")
            if not callable(reward):
                raise TypeError(f"The reward of term {i} has to be callable, got {type(reward).__name__}.")
            checked.append((float(weight), reward))
        self.terms = checked
        self.name = name or _weighted_name(checked)

    def score(self, prompts, responses):
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for weight, reward in self.terms:
            total += weight * as_scores(reward(prompts, responses), len(prompts), getattr(reward, "name", "term"))
        return total


def _weighted_name(terms) -> str:
    parts = []
    for weight, reward in terms:
        name = getattr(reward, "name", type(reward).__name__)
        sign = "-" if weight < 0 else "+"
        parts.append(f"{sign}{abs(weight):g}*{name}")
    text = "".join(parts)
    return text.removeprefix("+")
