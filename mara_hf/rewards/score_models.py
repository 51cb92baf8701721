"""Reward models run with transformers: [`SequenceClassifierReward`] (any `AutoModelForSequenceClassification`
reward model, the first logit) and [`ScoreModelReward`] (a PKU safe-rlhf score model loaded without its custom
code), with [`beaver_reward`] for the two beaver models the MARA paper used (`BEAVER_MODELS`, scored as
`BEAVER_TEMPLATE`). transformers and safetensors are imported when a model is loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..models import default_device
from .base import Reward

BEAVER_MODELS = {
    "reward": "PKU-Alignment/beaver-7b-v1.0-reward",
    "cost": "PKU-Alignment/beaver-7b-v1.0-cost",
}
BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
"""The MARA repository's formatting of a (prompt, response) pair for the beaver score models (`src/reward_model.py`),
tokenized with BOS and without EOS, as in the models' card."""
SAFE_RLHF_MAX_LENGTH = 512
"""safe-rlhf's `model_max_length`: its datasets keep the first 512 tokens of each text."""


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
        tokenizer: a tokenizer or its path, if it is not stored with the model. One without a pad token pads
            with its EOS (else UNK) token, on a copy: the tokenizer passed in is not changed.
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

        if isinstance(source, str):
            tokenizer = AutoTokenizer.from_pretrained(source)
        elif source.pad_token is None:
            tokenizer = copy.deepcopy(source)  # the caller's tokenizer is left without a pad token
        else:
            return source
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
