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
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .fluency import FLUENCY_DEFINITION, fluency
from .models import default_device

BEAVER_MODELS = {
    "reward": "PKU-Alignment/beaver-7b-v1.0-reward",
    "cost": "PKU-Alignment/beaver-7b-v1.0-cost",
}
BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
"""The MARA repository's formatting of a (prompt, response) pair for the beaver score models (`src/reward_model.py`),
tokenized with BOS and without EOS, as in the models' card."""
SAFE_RLHF_MAX_LENGTH = 512
"""safe-rlhf's `model_max_length`: its datasets keep the first 512 tokens of each text."""

REWARD_HELP = """rewards (--reward SPEC; higher is better, except for the costs, which take a negative weight):
  vader           VADER compound sentiment of the response, in [-1, 1] (pip install vaderSentiment)
  offensive       minus the probability that the response is offensive, in [-1, 0]; higher = less offensive
                  (pip install alt-profanity-check)
  fluency         0 for a fluent answer down to -1: repeated word trigrams, loops of the same words, drift out of
                  the prompt's language; <= -0.5 is degenerate (offline, no download)
  repetition      minus fluency, in [0, 1]: a penalty, weight it negatively ('10*vader-5*repetition')
  beaver-reward   PKU-Alignment/beaver-7b-v1.0-reward (helpfulness score model, 7B, loaded without custom code),
                  scored as the MARA paper did: 'BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}',
                  no EOS appended, no truncation; options in brackets: beaver-reward[eos] appends EOS (safe-rlhf's
                  training format), beaver-reward[max_length=512] keeps the first 512 tokens (safe-rlhf's limit)
  beaver-cost     PKU-Alignment/beaver-7b-v1.0-cost (harmfulness: higher = more harmful, so weight it negatively;
                  same options)
  hf:ID_OR_PATH   any transformers sequence-classification reward model (first logit)
  py:MOD:FUNC     a Python callable f(prompts, responses) -> N scores (a class is instantiated first)
  weighted sums   e.g. '2*beaver-reward-1*beaver-cost' (the paper's 2:1 setting), 'vader+0.5*offensive' or
                  '10*vader+5*fluency' (a tone reward that keeps answers fluent)"""


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


def resolve_device(device=None) -> torch.device:
    """`device` as a `torch.device`; by default mara-hf's ([`mara_hf.models.default_device`])."""
    return torch.device(default_device(device))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """`dtype` as a `torch.dtype`; default bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"'{dtype}' is not a torch dtype (e.g. float32, bfloat16, float16).")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype has to be a torch.dtype or its name, got {type(dtype).__name__}.")
    return dtype


class SequenceClassifierReward(Reward):
    """A transformers reward model (`AutoModelForSequenceClassification`): the score is logit `label_index` of
    the model's pooled output for the formatted (prompt, response).

    Formatting: with `template` (a format string with `{prompt}` and `{response}`), that string, tokenized with
    the tokenizer's special tokens (e.g. BOS); without it, the tokenizer's chat template applied to a user
    message (the prompt) and an assistant message (the response). A model whose tokenizer has no chat template
    needs `template`.

    Args:
        model_id_or_path: Hub id or local folder of the reward model.
        template: format string with `{prompt}` and `{response}`; when given it is used instead of the chat
            template.
        batch_size: pairs per forward (pairs are sorted by length first, to pad little).
        device: default `cuda` if available, else `cpu`.
        dtype: default bfloat16 on a GPU that supports it, float32 elsewhere.
        label_index: which logit is the score (0 for single-logit reward models).
        tokenizer: a tokenizer or its path, if it is not stored with the model.
        name: shown in reports (default: `model_id_or_path`).
    """

    def __init__(
        self,
        model_id_or_path: str,
        *,
        template: str | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        label_index: int = 0,
        tokenizer=None,
        name: str | None = None,
    ):
        if not isinstance(model_id_or_path, str) or not model_id_or_path.strip():
            raise ValueError("A SequenceClassifierReward needs a model id or path.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` has to be a positive integer, got {batch_size!r}.")
        if isinstance(label_index, bool) or not isinstance(label_index, int) or label_index < 0:
            raise ValueError(f"`label_index` has to be a non-negative integer, got {label_index!r}.")
        if template is not None:
            _check_template(template)
        self.name = name or model_id_or_path
        self.template = template
        self.batch_size = batch_size
        self.label_index = label_index
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = self._load_tokenizer(tokenizer or model_id_or_path)
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"The tokenizer of '{model_id_or_path}' has no chat template; pass "
                             "template='...{prompt}...{response}...' to format the pairs.")
        self.model = self._load_model(model_id_or_path).to(device=self.device, dtype=self.dtype).eval()
        num_labels = self.model.config.num_labels
        if label_index >= num_labels:
            raise ValueError(f"`label_index` {label_index} is out of range: '{model_id_or_path}' has {num_labels} "
                             "label(s).")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _load_tokenizer(self, source):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source) if isinstance(source, str) else source
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer

    def _load_model(self, source: str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(source, dtype=self.dtype)

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model reads for one pair."""
        if self.template is not None:
            return self.template.format(prompt=prompt, response=response)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _encode(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, return_tensors="pt",
                              add_special_tokens=self.template is not None).to(self.device)

    def _forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).logits[:, self.label_index]

    @torch.no_grad()
    def score(self, prompts, responses):
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        scores = torch.empty(len(texts), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self._encode([texts[i] for i in rows])
            scores[rows] = self._forward(batch).float().cpu()
        return scores


def _check_template(template) -> None:
    if not isinstance(template, str) or "{prompt}" not in template or "{response}" not in template:
        raise ValueError(f"A reward template has to be a string with '{{prompt}}' and '{{response}}', got "
                         f"{template!r}.")
    try:
        template.format(prompt="", response="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"The reward template {template!r} has other fields than {{prompt}} and {{response}} "
                         f"(double other braces: {{{{ }}}}): {err!r}.") from err


SCORE_HEAD_MAPPING = {r"^score_head\.": "score."}


class ScoreModelReward(SequenceClassifierReward):
    """A PKU safe-rlhf score model (`LlamaForScore` and siblings, score head `score_head`), loaded WITHOUT its
    custom code as the matching transformers `...ForSequenceClassification` with one label, `score_head.*`
    renamed to `score.*`. The score is the end score: the score head applied to the final hidden state of the
    last non-padding token, as `LlamaForScore.end_scores`.

    Both safe-rlhf layouts load: older checkpoints declare the head's bias as `config.bias`, newer ones as
    `config.score_bias` (and save a `score_head.bias`, zero for heads trained without one). When the config says
    the head has a bias it is read from the checkpoint and added, as the custom code's `nn.Linear` does; when it
    says not, a saved `score_head.bias` is ignored, as the custom code ignores it.

    Refused (with a `ValueError`) when the checkpoint does not fit that class exactly: a score head with more than
    one output, normalised scores (`do_normalize`), no `score_head.weight` at all (the head would be left randomly
    initialised), or a bias the config declares but the checkpoint lacks.

    Args:
        append_eos: add the tokenizer's EOS token after the formatted text (safe-rlhf trains its score models on
            `text + eos_token`; the MARA paper scored without it, the default).
        max_length: keep the first `max_length` tokens of each formatted text (BOS included; safe-rlhf truncates
            its datasets at 512, `SAFE_RLHF_MAX_LENGTH`); `None` (default) scores the whole text.
        other arguments: as [`SequenceClassifierReward`]; `template` is required.
    """

    def __init__(self, model_id_or_path: str, *, template: str, append_eos: bool = False,
                 max_length: int | None = None, **kwargs):
        if template is None:
            raise ValueError("A ScoreModelReward needs the template its score model was trained with.")
        if not isinstance(append_eos, bool):
            raise ValueError(f"`append_eos` has to be a bool, got {append_eos!r}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"`max_length` has to be an integer >= 2 or None, got {max_length!r}.")
        self.append_eos = append_eos
        self.max_length = max_length
        super().__init__(model_id_or_path, template=template, **kwargs)

    def _load_model(self, source: str):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        problems = []
        if getattr(config, "score_dim", 1) != 1:
            problems.append(f"its score head has {config.score_dim} outputs (score_dim), not 1")
        if getattr(config, "do_normalize", False):
            problems.append("its scores are normalised by the custom code (config.do_normalize = true)")
        if problems:
            raise ValueError(f"Cannot load the score model '{source}' without its custom code: "
                             + "; ".join(problems) + ".")
        # Newer safe-rlhf calls the head's bias flag `score_bias` (leaving `bias` to the backbone's config).
        head_has_bias = bool(getattr(config, "score_bias", getattr(config, "bias", False)))
        config.num_labels = 1
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, dtype=self.dtype, key_mapping=SCORE_HEAD_MAPPING,
                trust_remote_code=False, output_loading_info=True)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"Cannot load the score model '{source}' without its custom code as a transformers "
                             f"{config.model_type} sequence classifier with one score (weights of other shapes, "
                             f"e.g. a score head with several outputs): {err}") from err
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise ValueError(f"Cannot load the score model '{source}' without its custom code: "
                             f"{type(model).__name__} has no bias-free `score` head to put `score_head` in.")
        missing = [k for k in info.get("missing_keys", ()) if not k.startswith("lm_head")]
        unexpected = set(info.get("unexpected_keys", ()))
        head_left_over = [k for k in unexpected if k.split(".")[0] in ("score_head", "score") and k != "score.bias"]
        mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
        if "score.weight" in missing:
            raise ValueError(f"'{source}' has no `score_head.weight` (nor `score.weight`): it is not a safe-rlhf "
                             "score model, and its score head would be random.")
        if missing or head_left_over or mismatched:
            details = ", ".join(sorted(set(missing + head_left_over + mismatched))[:6])
            raise ValueError(f"Cannot load the score model '{source}' without its custom code: its weights do not "
                             f"fit {type(model).__name__} (missing, unused or mismatched: {details}).")
        if head_has_bias:
            if "score.bias" not in unexpected:
                raise ValueError(f"The config of '{source}' gives its score head a bias (score_bias / bias = true), "
                                 "but the checkpoint has no `score_head.bias`.")
            biased = torch.nn.Linear(head.in_features, 1, bias=True, device=head.weight.device, dtype=head.weight.dtype)
            biased.weight = head.weight
            with torch.no_grad():
                biased.bias.copy_(_checkpoint_tensor(source, "score_head.bias").reshape(1))
            model.score = biased
        return model

    def format(self, prompt: str, response: str) -> str:
        text = super().format(prompt, response)
        if self.append_eos and self.tokenizer.eos_token:
            text += self.tokenizer.eos_token
        return text

    def _encode(self, texts: list[str]) -> dict:
        if self.max_length is None:
            return self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt",
                                  add_special_tokens=True).to(self.device)
        # The first `max_length` tokens of each text, as safe-rlhf's datasets keep them (right truncation).
        ids = [row[:self.max_length] for row in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return self.tokenizer.pad({"input_ids": ids}, padding=True, padding_side="right",
                                  return_tensors="pt").to(self.device)

    def _forward(self, batch: dict) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].long().sum(dim=-1) - 1  # right padding: the last real token
        end_states = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(end_states)[:, 0]


def _checkpoint_tensor(source: str, name: str) -> torch.Tensor:
    """The tensor `name` as saved in the checkpoint `source` (a folder or a Hub id already downloaded by
    `from_pretrained`): safetensors or `.bin`, single file or sharded."""
    from safetensors import safe_open
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )

    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)):
        index = cached_file(source, index_name, _raise_exceptions_for_missing_entries=False)
        if index is not None:
            shard = json.loads(Path(index).read_text())["weight_map"].get(name)
            path = cached_file(source, shard) if shard else None
        else:
            path = cached_file(source, single_name, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                if name in handle.keys():
                    return handle.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if name in state:
                return state[name]
    raise ValueError(f"Cannot find `{name}` in the checkpoint files of '{source}'.")


def beaver_reward(kind: str = "reward", model_id_or_path: str | None = None, *, batch_size: int = 8,
                  device=None, dtype=None, append_eos: bool = False, max_length: int | None = None,
                  tokenizer=None, name: str | None = None) -> ScoreModelReward:
    """The PKU safe-rlhf score models used by the MARA paper: `kind="reward"` for
    `PKU-Alignment/beaver-7b-v1.0-reward` (helpfulness, higher is better), `kind="cost"` for
    `PKU-Alignment/beaver-7b-v1.0-cost` (harmfulness: higher is MORE harmful; use it with a negative weight,
    e.g. `WeightedReward([(2, beaver_reward("reward")), (-1, beaver_reward("cost"))])`).

    By default the pair is scored as the MARA repository scores it (`src/reward_model.py`) and as the models' card
    shows: `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}`, tokenized with BOS, no EOS appended,
    no truncation; the end score is returned. `append_eos=True` appends the tokenizer's EOS (safe-rlhf's training
    format) and `max_length=512` keeps the first 512 tokens (safe-rlhf's limit); in a reward spec these are
    `beaver-reward[eos]` and `beaver-reward[max_length=512]`. See [`ScoreModelReward`] for the loading rules (both
    safe-rlhf checkpoint layouts load). `model_id_or_path` overrides the Hub id (e.g. a local copy).
    """
    if kind not in BEAVER_MODELS:
        raise ValueError(f"`kind` has to be 'reward' or 'cost', got {kind!r}.")
    return ScoreModelReward(model_id_or_path or BEAVER_MODELS[kind], template=BEAVER_TEMPLATE,
                            append_eos=append_eos, max_length=max_length, batch_size=batch_size, device=device,
                            dtype=dtype, tokenizer=tokenizer, name=name or f"beaver-{kind}")


KNOWN_REWARDS: dict[str, Callable[..., Reward]] = {
    "vader": lambda **_: VaderReward(),
    "offensive": lambda **_: OffensiveReward(),
    "fluency": lambda **_: FluencyReward(),
    "repetition": lambda **_: FluencyReward(penalty=True),
    "beaver-reward": lambda **kw: beaver_reward("reward", **kw),
    "beaver-cost": lambda **kw: beaver_reward("cost", **kw),
}
"""Names understood by [`parse_reward`] (besides `hf:` and `py:`)."""

MODEL_REWARDS = ("beaver-reward", "beaver-cost")
"""The known rewards that load a model (they take `device`, `dtype`, `batch_size`)."""


def _parse_flag(text: str) -> bool:
    value = {"": True, "1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}.get(text.lower())
    if value is None:
        raise ValueError("true or false")
    return value


def _parse_length(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 2:
        raise ValueError("a token count >= 2, or none")
    return int(text)


BEAVER_OPTIONS = {
    "eos": ("append_eos", _parse_flag, False, "eos (append EOS: true / false, default false)"),
    "max_length": ("max_length", _parse_length, None, "max_length (tokens kept, e.g. 512; default none)"),
}
REWARD_OPTIONS: dict[str, dict] = {"beaver-reward": BEAVER_OPTIONS, "beaver-cost": BEAVER_OPTIONS}
"""Options a known reward takes in brackets, e.g. `beaver-reward[eos,max_length=512]`: option -> (keyword argument
of the reward's factory, parser of the text, default, description)."""

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM_START = re.compile(rf"\s*(?:{_NUMBER}\s*\*|hf:|py:|(?:"
                         + "|".join(sorted(map(re.escape, KNOWN_REWARDS), key=len, reverse=True))
                         + r")(?=$|[\s+\-\[]))")
_WITH_OPTIONS = re.compile(r"^(?P<name>[\w\-]+)\[(?P<options>[^\[\]]*)\]$")
_TERM = re.compile(rf"^\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<atom>\S.*?)\s*$")


def _split_terms(spec: str) -> list[tuple[int, str]]:
    """Split at '+' / '-' signs that start a new term (a number followed by '*', a known name, 'hf:' or 'py:');
    hyphens inside names such as 'beaver-reward' or 'hf:org/model-v2' are kept."""
    terms, sign, start = [], 1, 0
    text = spec.strip()
    if text[:1] in "+-" and text:
        sign, start = (-1 if text[0] == "-" else 1), 1
    i = start
    while i < len(text):
        if text[i] in "+-" and i > start and _TERM_START.match(text, i + 1):
            terms.append((sign, text[start:i]))
            sign, start = (-1 if text[i] == "-" else 1), i + 1
        i += 1
    terms.append((sign, text[start:]))
    return terms


def parse_reward(spec: str, *, device=None, dtype=None, batch_size: int = 8, cache: dict | None = None) -> Reward:
    """A reward from a command-line string (see `REWARD_HELP`).

    Names: `vader`, `offensive` (minus the offensive probability, higher is better), `fluency`
    ([`FluencyReward`]; `repetition` is minus it, a penalty), `beaver-reward`, `beaver-cost`, `hf:<model id or path>`
    ([`SequenceClassifierReward`]), `py:<module:function>` ([`CallableReward`]); weighted sums of them:
    `2*beaver-reward-1*beaver-cost`, `vader+0.5*offensive`, `10*vader+5*fluency`, `-offensive`. A `-` starts a
    new term only before a number followed by `*`, a known name, `hf:` or `py:`, so names keep their hyphens.

    Options follow a name in brackets, comma-separated, `key=value` or a bare `key` for true:
    `beaver-reward[eos]` appends EOS, `beaver-cost[max_length=512]` keeps the first 512 tokens,
    `beaver-reward[eos=true,max_length=512]` both (safe-rlhf's own format). Spellings of the same settings share
    one cache entry (`beaver-reward[eos=false]` is `beaver-reward`).

    Args:
        spec: the string.
        device, dtype, batch_size: for model-based rewards.
        cache: a dict shared between calls, so that a model named twice (e.g. `beaver-reward` alone and inside a
            weighted sum) loads once.

    Raises:
        ValueError: empty spec, bad weight, or unknown name (the message lists the known ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("A reward spec cannot be empty; known rewards: " + known_rewards() + ".")
    cache = {} if cache is None else cache
    terms = []
    for sign, text in _split_terms(spec):
        match = _TERM.match(text)
        if not text.strip() or match is None:
            raise ValueError(f"Cannot parse reward '{spec}': empty term; write e.g. '2*beaver-reward-1*beaver-cost'.")
        weight = sign * (float(match["weight"]) if match["weight"] else 1.0)
        atom, options = _atom_options(match["atom"], spec)
        if atom not in cache:
            cache[atom] = _build_atom(atom, spec, options, device=device, dtype=dtype, batch_size=batch_size)
        terms.append((weight, cache[atom]))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return WeightedReward(terms, name=spec.replace(" ", ""))


def known_rewards() -> str:
    return ", ".join(list(KNOWN_REWARDS) + ["hf:<model id or path>", "py:<module:function>"])


def _atom_options(atom: str, spec: str) -> tuple[str, dict]:
    """`(canonical atom, factory keyword arguments)` of an atom that may carry options in brackets; the canonical
    atom lists only the options that differ from their defaults (`beaver-reward[eos=false]` -> `beaver-reward`)."""
    match = _WITH_OPTIONS.match(atom)
    if match is None or match["name"] not in KNOWN_REWARDS:
        return atom, {}
    name = match["name"]
    if not match["options"].strip():
        raise ValueError(f"Empty options '[]' after reward '{name}' in '{spec}'; write e.g. '{name}[eos]' or "
                         f"'{name}'.")
    allowed = REWARD_OPTIONS.get(name)
    if not allowed:
        raise ValueError(f"Reward '{name}' in '{spec}' takes no options (remove '[{match['options']}]').")
    described = "; ".join(option[3] for option in allowed.values())
    kwargs, shown = {}, []
    for item in match["options"].split(","):
        key, _, text = (part.strip() for part in item.partition("="))
        if key not in allowed:
            raise ValueError(f"Unknown option '{key}' of reward '{name}' in '{spec}'; it takes {described}.")
        keyword, parse, default, _ = allowed[key]
        try:
            value = parse(text)
        except ValueError as err:
            raise ValueError(f"Option '{key}' of reward '{name}' in '{spec}' has to be {err}, got '{text}'.") from None
        kwargs[keyword] = value
        shown = [entry for entry in shown if entry[0] != key]
        if value != default:
            shown.append((key, "" if value is True else f"={'none' if value is None else value}"))
    canonical = name + ("[" + ",".join(key + text for key, text in sorted(shown)) + "]" if shown else "")
    return canonical, kwargs


def _build_atom(atom: str, spec: str, options: dict | None = None, *, device, dtype, batch_size) -> Reward:
    name = atom.partition("[")[0] if options else atom  # options: a known name with settings in brackets
    if name in KNOWN_REWARDS:
        if name in MODEL_REWARDS:
            return KNOWN_REWARDS[name](device=device, dtype=dtype, batch_size=batch_size, name=atom, **(options or {}))
        return KNOWN_REWARDS[name]()
    if atom.startswith("hf:"):
        source = atom[3:].strip()
        if not source:
            raise ValueError(f"Reward '{spec}': 'hf:' needs a model id or path, e.g. 'hf:OpenAssistant/reward-model'.")
        return SequenceClassifierReward(source, device=device, dtype=dtype, batch_size=batch_size, name=atom)
    if atom.startswith("py:"):
        return CallableReward(load_callable(atom[3:]), name=atom)
    if re.fullmatch(_NUMBER, atom):
        raise ValueError(f"Cannot parse reward '{spec}': '{atom}' is a number without a reward; write e.g. "
                         f"'{atom}*vader'.")
    raise ValueError(f"Unknown reward '{atom}' in '{spec}'; known rewards: {known_rewards()}, and weighted sums "
                     "such as '2*beaver-reward-1*beaver-cost'.")
