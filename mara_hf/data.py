"""The data users feed in, read the same way by every part of mara-hf (the CLI, evaluation, training and the
benchmarks): prompt files, prompts wrapped in the tokenizer's chat template, the ids that end an answer, the length
of each generated answer, and the marking of the tokens where MARA did not take the base model's top-1.

```python
>>> import torch
>>> from mara_hf.data import answer_lengths
>>> answer_lengths(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos_ids=[2]).tolist()  # EOS counts, what follows not
[2, 3]

```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------------------------------------------
# prompt files


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The prompts of a file: a JSON list of objects with an `instruction` field (as the MARA prompt sets), or
    JSON Lines with one object per line holding `instruction` or `prompt`. Returns the first `limit` prompts
    (all if `None`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON / JSON Lines, not a list of objects, an item without an `instruction` (or
            `prompt`) string, no prompt at all, or a bad `limit`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"The prompt limit has to be a positive integer, got {limit!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"Prompt file '{path}' is not UTF-8 text: {err}.") from err
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"Prompt file '{path}' is neither a JSON list nor JSON Lines: line {number} is not "
                                 f"valid JSON ({err.msg}, column {err.colno}).") from err
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"Prompt file '{path}' is not valid JSON ({err.msg}, line {err.lineno}, column "
                             f"{err.colno}).") from err
        if not isinstance(items, list):
            raise ValueError(f"Prompt file '{path}' has to hold a JSON list of objects with an 'instruction' field.")
    prompts = []
    for number, item in enumerate(items, start=1):
        prompt = None
        if isinstance(item, dict):
            prompt = item.get("instruction", item.get("prompt"))
        if not isinstance(prompt, str):
            raise ValueError(f"Item {number} of prompt file '{path}' has no 'instruction' (or 'prompt') string "
                             "field.")
        prompts.append(prompt)
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"Prompt file '{path}' holds no prompts.")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# encoding


def encode_chat_prompts(tokenizer, prompts: list[str], device) -> dict:
    """Left-padded `input_ids` / `attention_mask` of the prompts, each wrapped in the tokenizer's chat template as
    one user message (the raw prompt, with the tokenizer's special tokens, if it has no template)."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        special = False
    else:
        texts, special = prompts, True
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=special)
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config EOS id(s) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def answer_lengths(new_tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Generated tokens per row of `new_tokens` (the tokens after the prompt), up to and including the first EOS
    (what follows is padding); the full width for a row without EOS."""
    width = new_tokens.shape[1]
    if width == 0 or not eos_ids:
        return torch.full((new_tokens.shape[0],), width, dtype=torch.long, device=new_tokens.device)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    return torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1,
                       torch.full_like(is_eos[:, 0], width, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# what MARA changed


class MarkedAnswer(NamedTuple):
    """An answer with every token where MARA did not take the base model's top-1 shown as ⟦top1→taken⟧ (`text`),
    and those tokens (`changed`: `{"position", "top1", "taken"}` each, both decoded)."""

    text: str
    changed: list[dict]


def mark_changes(tokenizer, tokens: list[int], top1: list[int]) -> MarkedAnswer:
    """Mark the tokens of an answer that differ from the base model's top-1 at their step (`top1`, one id per
    token, as `mara_steps["top1"]` of the fused loop). The taken token is decoded without special tokens (an EOS
    shows as nothing), the top-1 as it is, so a top-1 EOS that MARA refused stays visible."""
    changed, pieces = [], []
    for position, (token, first) in enumerate(zip(tokens, top1)):
        text = tokenizer.decode([token], skip_special_tokens=True)
        if token != first:
            first_text = tokenizer.decode([first])
            changed.append({"position": position, "top1": first_text, "taken": text})
            pieces.append(f"⟦{first_text}→{text}⟧")
        else:
            pieces.append(text)
    return MarkedAnswer("".join(pieces), changed)
