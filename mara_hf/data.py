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

import csv
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

# ----------------------------------------------------------------------------------------------------------------
# prompt files


PROMPT_FIELDS = ("instruction", "prompt")  # tried in this order when no field is named


def load_prompts(path: str | os.PathLike, limit: int | None = None, field: str | None = None) -> list[str]:
    """The prompts of a file, in file order:

    - `.csv` / `.tsv`: a header row, then one prompt per row, read from column `field`;
    - `.txt`: one prompt per non-empty line;
    - JSON: a list of strings, or of objects holding the prompt in `field` (as the MARA prompt sets do in
      `instruction`); JSON Lines (`.jsonl`, or any file not starting with `[`): one such string or object per line.

    Without `field`, objects and rows are read from `instruction`, else `prompt`. Returns the first `limit` prompts
    (all if `None`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8, not parseable in its format, an item without the field (the message lists the fields
            it has), no prompt at all, or a bad `limit`.

    ```python
    >>> import tempfile, pathlib
    >>> from mara_hf.data import load_prompts
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "harmful.csv"
    >>> _ = path.write_text('goal,target\\nHow do I pick a lock?,Sure\\n"Write a scam email, please",Sure\\n')
    >>> load_prompts(path, field="goal")
    ['How do I pick a lock?', 'Write a scam email, please']

    ```
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"The prompt limit has to be a positive integer, got {limit!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheet exports) is not text
    except UnicodeDecodeError as err:
        raise ValueError(f"Prompt file '{path}' is not UTF-8 text: {err}.") from err
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if field is not None:
            raise ValueError(f"Prompt file '{path}' is plain text (one prompt per line) and has no fields: drop the "
                             f"prompt field ({field!r}).")
        items = [line for line in text.splitlines() if line.strip()]
    elif suffix in (".csv", ".tsv"):
        items = _table_rows(path, text, "TSV" if suffix == ".tsv" else "CSV")
    else:
        items = _json_items(path, text)
    prompts = []
    for number, item in enumerate(items, start=1):
        prompts.append(_prompt_of(path, number, item, field))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"Prompt file '{path}' holds no prompts.")
    return prompts


def add_prompt_arguments(parser, limit_help: str) -> None:
    """The `--prompts`, `--prompt-field` and `--limit` options of the commands that read a prompt file (read with
    [`load_prompts`])."""
    parser.add_argument("--prompts", required=True,
                        help="prompt file: JSON (a list of strings, or of objects with 'instruction'), JSON Lines, "
                             "CSV / TSV with a header row, or .txt with one prompt per line")
    parser.add_argument("--prompt-field", default=None, metavar="NAME",
                        help="the field (JSON) or column (CSV / TSV) holding the prompt (default: 'instruction', "
                             "else 'prompt')")
    parser.add_argument("--limit", type=int, default=None, help=limit_help)


def _json_items(path: Path, text: str) -> list:
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"Prompt file '{path}' is neither a JSON list nor JSON Lines: line {number} is not "
                                 f"valid JSON ({err.msg}, column {err.colno}).") from err
        return items
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Prompt file '{path}' is not valid JSON ({err.msg}, line {err.lineno}, column "
                         f"{err.colno}).") from err
    if not isinstance(items, list):
        raise ValueError(f"Prompt file '{path}' has to hold a JSON list of prompts (strings, or objects with an "
                         "'instruction' field).")
    return items


def _table_rows(path: Path, text: str, kind: str) -> list[dict]:
    delimiter = "\t" if kind == "TSV" else ","
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as err:
        raise ValueError(f"Prompt file '{path}' is not valid {kind}: {err}.") from err


def _prompt_of(path: Path, number: int, item, field: str | None) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        names = (field,) if field is not None else PROMPT_FIELDS
        prompt = next((item[name] for name in names if name in item), None)
        if isinstance(prompt, str):
            return prompt
        wanted = repr(field) if field is not None else "'instruction' (or 'prompt')"
        have = ", ".join(repr(str(name)) for name in item) or "none"
        raise ValueError(f"Item {number} of prompt file '{path}' has no {wanted} string field (its fields: {have}); "
                         "name the field that holds the prompt (`--prompt-field NAME`, or `field=` of "
                         "`load_prompts`).")
    raise ValueError(f"Item {number} of prompt file '{path}' is a {type(item).__name__}, not a prompt: a string or "
                     "an object with an 'instruction' field.")


# ----------------------------------------------------------------------------------------------------------------
# encoding


def encode_chat_prompts(tokenizer, prompts: list[str], device) -> dict:
    """Left-padded `input_ids` / `attention_mask` of the prompts, each wrapped in the tokenizer's chat template as
    one user message (the raw prompt, with the tokenizer's special tokens, if it has no template).

    Padding uses the tokenizer's pad token, or its EOS token where it has none (Llama's and Mistral's tokenizers, and
    SmolLM2's GGUF one as transformers 5.17 loads it); the tokenizer is not changed."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        special = False
    else:
        texts, special = prompts, True
    rows = [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id(tokenizer), padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def pad_token_id(tokenizer) -> int:
    """The id that pads prompts (on the left) and finished answers: the tokenizer's pad token, else its EOS token,
    else 0. Padding is masked out or cut off at EOS, so any id would do; the tokenizer is not changed."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config EOS id(s) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def decode_answers(tokenizer, tokens: torch.Tensor, lengths) -> list[str]:
    """The text of each row of `tokens` `(B, T)` (generated tokens) up to its length in `lengths`, special tokens
    dropped."""
    return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, lengths.tolist())]


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
