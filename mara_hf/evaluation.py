"""Evaluation: answer a prompt set with the base model and with MARA under the same decoding settings, score both
answers with one or more rewards, and report preference rate, gain, KL to the base model, agent statistics and
speed.

```python
>>> from mara_hf.evaluation import evaluate, load_prompts
>>> from mara_hf.models import load_agent, load_base_model
>>> from mara_hf.rewards import parse_reward
>>> model, tokenizer = load_base_model("smollm2")
>>> results = evaluate(model, tokenizer, load_agent(), load_prompts("prompts.json", limit=50),
...                    {"vader": parse_reward("vader")}, max_new_tokens=64, out_dir="eval-results")
```

Files in `out_dir`: `responses.jsonl` (one line per prompt, appended per finished batch: a re-run with the same
`out_dir` resumes), `results.json` (the summary, rewritten atomically), `rewards.png` and `accepted_index.png`
(with matplotlib).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .fluency import DEGENERATE_THRESHOLD, FLUENCY_DEFINITION, fluency
from .rewards import REWARD_HELP, as_scores

RESULTS_FILE = "results.json"
RESPONSES_FILE = "responses.jsonl"
REWARDS_PLOT = "rewards.png"
INDEX_PLOT = "accepted_index.png"

RESERVED_GENERATE_ARGS = ("input_ids", "attention_mask", "max_new_tokens", "do_sample", "custom_generate",
                          "return_dict_in_generate", "mara_agent", "mara_stats", "streamer")

KL_DEFINITION = (
    "Mean over generated tokens of -log p_base(y_t | prompt, y_<t), in nats, from a teacher-forced forward of the "
    "base model (raw next-token distribution, no warpers) on prompt + response; EOS counts, padding does not. "
    "For MARA's greedy tokens this is the per-token KL(delta_y || p_base) of its deterministic output; "
    "'base_reference' is the same quantity for the base model's own output. With sampling it is the cross-"
    "entropy of the samples under the base model, not a KL."
)
COST_DEFINITION = (
    "MARA's decoding cost, from the fused loop's own counts (MaraStats). forwards: model forwards of the decode "
    "steps (each evaluates one chunk of candidates; the first chunk of a step is also its greedy forward, so plain "
    "greedy decoding runs 1 per step). forwards_per_step = forwards / decode steps (1.0 = no step needed a second "
    "chunk); forwards_per_token = forwards / MARA's generated tokens (MaraStats.forwards / MaraStats.tokens; at batch "
    "size B plain greedy runs about 1 / B). A batch's forwards and steps are shared equally by its prompts. "
    "fallback_rate = agent decisions where every candidate was rejected and the fallback token was taken / agent "
    "decisions (tokens with more than one candidate)."
)


# ----------------------------------------------------------------------------------------------------------------
# prompts


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
# evaluation


def evaluate(
    model,
    tokenizer,
    agent,
    prompts: Sequence[str],
    rewards: dict[str, Callable],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    seed: int = 0,
    out_dir: str | os.PathLike = "eval-results",
    resume: bool = True,
    rescore: bool = False,
    generation_kwargs: dict | None = None,
    mara_kwargs: dict | None = None,
    tie_tolerance: float = 0.0,
    plots: bool = True,
    progress: bool = True,
) -> dict:
    r"""Compare MARA with its base model on `prompts`; write and return the summary.

    Each prompt is wrapped in the tokenizer's chat template (one user message; the raw prompt if the tokenizer
    has none) and answered twice with the SAME settings and seed: by plain `model.generate` and by
    `model.generate(..., custom_generate=mara_generate, mara_agent=agent)`. Both answers (decoded without special
    tokens) are scored by every reward.

    Summary (`results.json`, also returned):

    - `rewards[name]`: `mean_base`, `mean_mara`, `wins` / `ties` / `losses` of MARA against the base model per
      prompt (a win: MARA's reward is higher by more than `tie_tolerance`; identical answers always tie),
      `preference_rate` = 100 * wins / N and `gain` = 100 * (wins - losses) / N, both in points.
    - `kl_per_token`: `mara` = mean over MARA's generated tokens of -log p_base(y_t | context), from a
      teacher-forced forward of the base model on prompt + MARA's answer. For greedy MARA decoding the output is
      deterministic, so per token KL(delta_y || p_base) = -log p_base(y_t): this is MARA's per-token KL to the
      base model. `base_reference` is the same quantity for the base model's own answers (greedy: its own top-1
      tokens), as a point of comparison. With `do_sample=True` both are cross-entropies of the samples under the
      base model, not KLs. EOS counts as a generated token; padding does not.
    - `agent`: MARA's decisions summed over all answers (as [`MaraStats`]): `tokens`, `agent_decided` (tokens
      with more than one candidate), `fallbacks`, `accepted_index_histogram`, their rates (`fallback_rate`: every
      candidate rejected, over agent decisions), `changed_tokens` (tokens where MARA did not take the base model's
      top-1), and the decoding cost: `forwards`, `decode_steps`, `forwards_per_step` and `forwards_per_token`
      (see `cost_definition`).
    - `fluency`: per side, `degenerate` answers (fluency <= -0.5 by [`mara_hf.fluency`], the screen the `fluency`
      reward uses), their `degenerate_rate` and the `mean_fluency`, with the `definition`.
    - `speed`: generated tokens, seconds and tokens/s of each side (MARA's time includes its agent).

    Files: `responses.jsonl` gets one JSON line per prompt (`index`, `prompt`, `base`, `mara`, `rewards` per side,
    `changed` = each token where MARA did not take the base model's top-1, with both; `mara_marked` = MARA's
    answer with each changed token shown as ⟦top1→taken⟧; token counts, NLL sums, agent counts, the batch's
    forwards and decode steps, seconds),
    appended and flushed per finished batch. With `resume=True`, prompts already in that file (same index and
    text, same settings) are not generated again, rewards missing from their lines are computed, and the summary
    is rebuilt from all lines; `resume=False` starts the file over. Saved scores are keyed by reward name: after
    changing what a name means, pass `rescore=True` to score the saved answers again. `results.json` and the
    plots are written to a temporary file first and then renamed, so they are never half-written.

    Args:
        model, tokenizer: the base causal LM and its tokenizer (left padding is used; a missing pad token is set
            to EOS).
        agent: a [`MaraAgent`].
        prompts: the user messages.
        rewards: name -> reward callable `(prompts, responses) -> (N,)` scores, higher is better.
        max_new_tokens, batch_size, do_sample, seed: decoding settings, the same for both sides; each batch is
            seeded with `seed + index of its first prompt`.
        out_dir: output folder (created).
        resume: reuse the answers already in `out_dir`.
        rescore: score reused answers again with `rewards` instead of keeping their saved scores.
        generation_kwargs: more `generate` arguments for both sides (e.g. `temperature=0.7`).
        mara_kwargs: MARA options (`mara_top_k`, `mara_top_p`, `mara_fallback`, `mara_schedule`).
        tie_tolerance: reward differences up to this count as ties.
        plots: write the PNG plots (needs matplotlib; skipped with a warning line without it).
        progress: show a progress bar.
    """
    from .generation import mara_generate

    prompts = _check_prompts(prompts)
    rewards = _check_rewards(rewards)
    _check_positive_int("max_new_tokens", max_new_tokens)
    _check_positive_int("batch_size", batch_size)
    if not isinstance(tie_tolerance, (int, float)) or not tie_tolerance >= 0:
        raise ValueError(f"`tie_tolerance` has to be a non-negative number, got {tie_tolerance!r}.")
    generation_kwargs = dict(generation_kwargs or {})
    mara_kwargs = dict(mara_kwargs or {})
    clash = sorted(set(generation_kwargs) & set(RESERVED_GENERATE_ARGS))
    if clash:
        raise ValueError(f"`generation_kwargs` cannot set {', '.join(clash)}: evaluate sets them.")
    bad = sorted(k for k in mara_kwargs if not k.startswith("mara_") or k in ("mara_agent", "mara_stats"))
    if bad:
        raise ValueError(f"`mara_kwargs` takes MARA options (mara_top_k, mara_top_p, mara_fallback, mara_schedule), "
                         f"not {', '.join(bad)}.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    responses_path = out_dir / RESPONSES_FILE
    top_k = mara_kwargs.get("mara_top_k") or agent.top_k
    settings = _settings(model, tokenizer, agent, max_new_tokens, do_sample, seed, generation_kwargs, mara_kwargs)
    settings_id = _fingerprint(settings)

    if not resume and responses_path.exists():
        responses_path.unlink()
    records = _read_records(responses_path)
    foreign = [r for r in records.values() if r.get("settings_id") != settings_id]
    if foreign:
        raise ValueError(f"'{responses_path}' holds answers generated with other settings (model, agent or decoding; "
                         f"settings id {foreign[0].get('settings_id')}, now {settings_id}); use another out_dir or "
                         "resume=False to start over.")
    wanted = {(i, p) for i, p in enumerate(prompts)}
    reused = [records[key] for key in sorted(records) if key in wanted]
    if rescore:
        for record in reused:
            for side in ("base", "mara"):
                for name in rewards:
                    record["rewards"][side].pop(name, None)
    if _fill_missing_rewards(reused, rewards, batch_size):
        _rewrite_records(responses_path, list(records.values()))

    pending = [i for i, p in enumerate(prompts) if (i, p) not in records]
    eos_ids = eos_token_ids(model, tokenizer)
    device = model.get_output_embeddings().weight.device
    generate_args = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                         **generation_kwargs)
    bar = _progress(len(pending), progress)
    try:
        for start in range(0, len(pending), batch_size):
            rows = pending[start:start + batch_size]
            batch = _run_batch(model, tokenizer, agent, [prompts[i] for i in rows], rows, rewards, eos_ids, device,
                               seed + rows[0], generate_args, mara_kwargs, mara_generate, settings_id)
            _append_records(responses_path, batch)
            for record in batch:
                records[(record["index"], record["prompt"])] = record
            bar.update(len(rows))
    finally:
        bar.close()

    current = [records[(i, p)] for i, p in enumerate(prompts)]
    results = summarize(current, list(rewards), top_k=top_k, tie_tolerance=tie_tolerance)
    results.update(
        generated_now=len(pending),
        reused=len(prompts) - len(pending),
        settings=settings,
        settings_id=settings_id,
        out_dir=str(out_dir),
        files={"responses": RESPONSES_FILE, "plots": []},
    )
    if plots:
        results["files"]["plots"] = write_plots(current, list(rewards), results["agent"], out_dir)
    _write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("`prompts` has to be a list of strings.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: nothing to evaluate.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"Every prompt has to be a string; prompt {i} is a {type(prompt).__name__}.")
    return prompts


def _check_rewards(rewards) -> dict:
    if not isinstance(rewards, dict) or not rewards:
        raise ValueError("`rewards` has to be a non-empty dict name -> reward callable, e.g. "
                         "{'vader': parse_reward('vader')}.")
    for name, reward in rewards.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Reward names have to be non-empty strings, got {name!r}.")
        if not callable(reward):
            raise TypeError(f"Reward '{name}' is a {type(reward).__name__}, not a callable (prompts, responses).")
    return dict(rewards)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` has to be a positive integer, got {value!r}.")


def _settings(model, tokenizer, agent, max_new_tokens, do_sample, seed, generation_kwargs, mara_kwargs) -> dict:
    """Everything that decides the answers; its fingerprint keys the resumable file."""
    digest = hashlib.sha1()
    for name, tensor in sorted(agent.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(next(model.parameters()).dtype),
        "agent": getattr(agent, "base_model", None) or "",
        "agent_weights_sha1": digest.hexdigest()[:16],
        "agent_top_k": agent.top_k,
        "agent_top_p": agent.top_p,
        "agent_fallback": agent.fallback,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "seed": seed,
        "generation_kwargs": {k: _jsonable(v) for k, v in sorted(generation_kwargs.items())},
        "mara_kwargs": {k: _jsonable(v) for k, v in sorted(mara_kwargs.items())},
    }


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _fingerprint(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config EOS id(s) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; be safe anyway
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, unit="prompt", desc="mara-hf eval", file=sys.stderr)


def encode_chat_prompts(tokenizer, prompts: list[str], device) -> dict:
    """Left-padded `input_ids` / `attention_mask` of the prompts, each wrapped in the tokenizer's chat template as
    one user message (the raw prompt if it has none). Evaluation and training encode prompts the same way."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        special = False
    else:
        texts, special = prompts, True
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=special)
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def _lengths(new_tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Generated tokens per row, up to and including the first EOS (what follows is padding)."""
    width = new_tokens.shape[1]
    if width == 0 or not eos_ids:
        return torch.full((new_tokens.shape[0],), width, dtype=torch.long, device=new_tokens.device)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    return torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, torch.full_like(is_eos[:, 0], width,
                                                                                           dtype=torch.long))


@torch.no_grad()
def teacher_forced_nll(model, input_ids, attention_mask, new_tokens, lengths) -> torch.Tensor:
    """Per row, the sum over the first `lengths[b]` tokens of `new_tokens` of -log p_model(token | context), from one
    forward on the left-padded prompt + the tokens (positions follow the attention mask, as in `generate`)."""
    batch, width = new_tokens.shape
    if width == 0:
        return torch.zeros(batch, dtype=torch.float64)
    valid = torch.arange(width, device=new_tokens.device)[None, :] < lengths[:, None]
    ids = torch.cat([input_ids, new_tokens], dim=1)
    mask = torch.cat([attention_mask, valid.to(attention_mask.dtype)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = width + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits
    logits = logits[:, -(width + 1):-1]
    sums = torch.zeros(batch, dtype=torch.float64)
    for row in range(batch):  # one row at a time: (width, vocab) float32 at most
        logprobs = torch.log_softmax(logits[row].float(), dim=-1)
        picked = logprobs.gather(1, new_tokens[row][:, None]).squeeze(1)
        sums[row] = -picked[valid[row]].double().sum().cpu()
    return sums


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batch(model, tokenizer, agent, prompts, indices, rewards, eos_ids, device, batch_seed, generate_args,
               mara_kwargs, mara_generate, settings_id) -> list[dict]:
    inputs = encode_chat_prompts(tokenizer, prompts, device)
    prompt_width = inputs["input_ids"].shape[1]

    torch.manual_seed(batch_seed)
    _sync(device)
    start = time.perf_counter()
    base_sequences = model.generate(**inputs, **generate_args)
    _sync(device)
    base_seconds = time.perf_counter() - start

    torch.manual_seed(batch_seed)
    start = time.perf_counter()
    out = model.generate(**inputs, **generate_args, custom_generate=mara_generate, mara_agent=agent,
                         return_dict_in_generate=True, **mara_kwargs)
    _sync(device)
    mara_seconds = time.perf_counter() - start

    base_new = base_sequences[:, prompt_width:]
    mara_new = out.sequences[:, prompt_width:]
    base_len, mara_len = _lengths(base_new, eos_ids), _lengths(mara_new, eos_ids)
    base_nll = teacher_forced_nll(model, inputs["input_ids"], inputs["attention_mask"], base_new, base_len)
    mara_nll = teacher_forced_nll(model, inputs["input_ids"], inputs["attention_mask"], mara_new, mara_len)

    steps = {k: v.cpu() for k, v in out.mara_steps.items() if k != "forwards"}
    # The batch's cost: forwards of the fused loop and its decode steps (one entry of `forwards` per step).
    batch = {"rows": len(prompts), "forwards": out.mara_stats.forwards, "steps": len(out.mara_steps["forwards"])}
    records = []
    for row, (index, prompt) in enumerate(zip(indices, prompts)):
        n_base, n_mara = int(base_len[row]), int(mara_len[row])
        tokens = mara_new[row, :n_mara].tolist()
        top1 = steps["top1"][row, :n_mara].tolist()
        asked = steps["asked"][row, :n_mara]
        fallback = steps["fallback"][row, :n_mara] & asked
        taken = steps["index"][row, :n_mara][asked & ~fallback]
        histogram = torch.bincount(taken, minlength=1).tolist()
        changed, pieces = [], []
        for position, (token, first) in enumerate(zip(tokens, top1)):
            text = tokenizer.decode([token], skip_special_tokens=True)
            if token != first:
                first_text = tokenizer.decode([first])
                changed.append({"position": position, "top1": first_text, "taken": text})
                pieces.append(f"⟦{first_text}→{text}⟧")
            else:
                pieces.append(text)
        records.append({
            "index": index,
            "prompt": prompt,
            "settings_id": settings_id,
            "base": tokenizer.decode(base_new[row, :n_base].tolist(), skip_special_tokens=True),
            "mara": tokenizer.decode(tokens, skip_special_tokens=True),
            "rewards": {"base": {}, "mara": {}},
            "changed": changed,
            "mara_marked": "".join(pieces),
            "tokens": {"base": n_base, "mara": n_mara},
            "nll_sum": {"base": float(base_nll[row]), "mara": float(mara_nll[row])},
            "agent": {"tokens": n_mara, "agent_decided": int(asked.sum()), "fallbacks": int(fallback.sum()),
                      "accepted_index": {str(i): c for i, c in enumerate(histogram) if c}},
            "batch": batch,
            "seconds": {"base": base_seconds / len(prompts), "mara": mara_seconds / len(prompts)},
        })
    _fill_missing_rewards(records, rewards, len(records))
    return records


def _fill_missing_rewards(records: list[dict], rewards: dict, batch_size: int) -> bool:
    """Score both answers of `records` with every reward they lack (an identical MARA answer copies the base
    score); returns whether anything was added."""
    added = False
    for name, reward in rewards.items():
        todo = [r for r in records if name not in r["rewards"]["base"] or name not in r["rewards"]["mara"]]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [r["prompt"] for r in chunk]
            base = as_scores(reward(prompts, [r["base"] for r in chunk]), len(chunk), name).tolist()
            differ = [i for i, r in enumerate(chunk) if r["mara"] != r["base"]]
            mara = list(base)
            if differ:
                scores = as_scores(reward([prompts[i] for i in differ], [chunk[i]["mara"] for i in differ]),
                                   len(differ), name).tolist()
                for i, score in zip(differ, scores):
                    mara[i] = score
            for record, b, m in zip(chunk, base, mara):
                record["rewards"]["base"][name] = b
                record["rewards"]["mara"][name] = m
            added = True
    return added


# ----------------------------------------------------------------------------------------------------------------
# files


def _read_records(path: Path) -> dict:
    """`{(index, prompt): record}` from a responses file; a half-written last line (no newline) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        os.truncate(path, cut)
        data = data[:cut]
    records = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (int(record["index"]), str(record["prompt"]))
            record["rewards"]["base"], record["rewards"]["mara"]  # both sides present
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Line {number} of '{path}' is not a response record ({err}); delete the file or pass "
                             "resume=False (--no-resume) to start over.") from err
        records[key] = record
    return records


def _append_records(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())


def _rewrite_records(path: Path, records: list[dict]) -> None:
    records = sorted(records, key=lambda r: r["index"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _write_atomic(path, text.encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json_atomic(path: Path, value) -> None:
    _write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# summary


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values) -> float | None:
    if len(values) < 2:
        return 0.0 if values else None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if denominator else None


def summarize(records: list[dict], reward_names: list[str], *, top_k: int = 40, tie_tolerance: float = 0.0) -> dict:
    """The summary of response records (see [`evaluate`] for the fields)."""
    n = len(records)
    rewards = {}
    for name in reward_names:
        base = [r["rewards"]["base"][name] for r in records]
        mara = [r["rewards"]["mara"][name] for r in records]
        wins = sum(1 for r, b, m in zip(records, base, mara) if r["mara"] != r["base"] and m - b > tie_tolerance)
        losses = sum(1 for r, b, m in zip(records, base, mara) if r["mara"] != r["base"] and b - m > tie_tolerance)
        ties = n - wins - losses
        rewards[name] = {
            "mean_base": _mean(base),
            "mean_mara": _mean(mara),
            "std_base": _std(base),
            "std_mara": _std(mara),
            "mean_difference": _mean([m - b for b, m in zip(base, mara)]),
            "wins": wins,
            "ties": ties,
            "losses": losses,
            "preference_rate": 100.0 * wins / n if n else None,
            "gain": 100.0 * (wins - losses) / n if n else None,
        }

    tokens_base = sum(r["tokens"]["base"] for r in records)
    tokens_mara = sum(r["tokens"]["mara"] for r in records)
    seconds_base = sum(r["seconds"]["base"] for r in records)
    seconds_mara = sum(r["seconds"]["mara"] for r in records)

    histogram = [0] * top_k
    for record in records:
        for index, count in record["agent"]["accepted_index"].items():
            index = int(index)
            histogram.extend([0] * (index + 1 - len(histogram)))
            histogram[index] += count
    decided = sum(r["agent"]["agent_decided"] for r in records)
    fallbacks = sum(r["agent"]["fallbacks"] for r in records)
    agent_tokens = sum(r["agent"]["tokens"] for r in records)
    changed = sum(len(r["changed"]) for r in records)
    costed = [r for r in records if "batch" in r]  # files written before the cost was recorded lack it
    forwards = sum(r["batch"]["forwards"] / r["batch"]["rows"] for r in costed) if costed else None
    steps = sum(r["batch"]["steps"] / r["batch"]["rows"] for r in costed) if costed else None
    costed_tokens = sum(r["agent"]["tokens"] for r in costed)
    scores = {side: [fluency(r["prompt"], r[side]) for r in records] for side in ("base", "mara")}
    degenerate = {side: sum(score <= DEGENERATE_THRESHOLD for score in values) for side, values in scores.items()}
    return {
        "n_prompts": n,
        "rewards": rewards,
        "kl_per_token": {
            "mara": _ratio(sum(r["nll_sum"]["mara"] for r in records), tokens_mara),
            "base_reference": _ratio(sum(r["nll_sum"]["base"] for r in records), tokens_base),
            "definition": KL_DEFINITION,
        },
        "agent": {
            "tokens": agent_tokens,
            "agent_decided": decided,
            "fallbacks": fallbacks,
            "accepted_index_histogram": histogram,
            "agent_decided_rate": _ratio(decided, agent_tokens),
            "fallback_rate": _ratio(fallbacks, decided),
            "top1_accept_rate": _ratio(histogram[0], decided),
            "changed_tokens": changed,
            "changed_rate": _ratio(changed, agent_tokens),
            "answers_changed": sum(1 for r in records if r["mara"] != r["base"]),
            "forwards": forwards,
            "decode_steps": steps,
            "forwards_per_step": _ratio(forwards, steps) if costed else None,
            "forwards_per_token": _ratio(forwards, costed_tokens) if costed else None,
            "cost_prompts": len(costed),
            "cost_definition": COST_DEFINITION,
        },
        "fluency": {
            "degenerate": degenerate,
            "degenerate_rate": {side: _ratio(count, n) for side, count in degenerate.items()},
            "mean_fluency": {side: _mean(values) for side, values in scores.items()},
            "definition": FLUENCY_DEFINITION,
        },
        "speed": {
            "base_tokens": tokens_base,
            "mara_tokens": tokens_mara,
            "base_seconds": seconds_base,
            "mara_seconds": seconds_mara,
            "base_tokens_per_s": _ratio(tokens_base, seconds_base),
            "mara_tokens_per_s": _ratio(tokens_mara, seconds_mara),
        },
        "mean_tokens": {"base": _ratio(tokens_base, n), "mara": _ratio(tokens_mara, n)},
    }


def write_plots(records: list[dict], reward_names: list[str], agent_summary: dict, out_dir: Path) -> list[str]:
    """`rewards.png` (reward distributions, base vs MARA, one panel per reward) and `accepted_index.png` (how often
    the agent took the k-th candidate); returns the file names written. Without matplotlib, prints one warning
    line and writes nothing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("mara-hf eval: warning: matplotlib is not installed, skipping plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    written = []

    figure = Figure(figsize=(4.2 * len(reward_names), 3.4), layout="constrained")
    for axis, name in zip(figure.subplots(1, len(reward_names), squeeze=False)[0], reward_names):
        base = [r["rewards"]["base"][name] for r in records]
        mara = [r["rewards"]["mara"][name] for r in records]
        low, high = min(base + mara), max(base + mara)
        bins = 20 if high > low else 1
        edges = [low + (high - low) * i / bins for i in range(bins + 1)] if high > low else [low - 0.5, low + 0.5]
        axis.hist(base, bins=edges, alpha=0.55, label=f"base (mean {_mean(base):.3g})", color="tab:gray")
        axis.hist(mara, bins=edges, alpha=0.55, label=f"MARA (mean {_mean(mara):.3g})", color="tab:blue")
        axis.set_title(name)
        axis.set_xlabel("reward")
        axis.set_ylabel("prompts")
        axis.legend(fontsize="small")
    _save_figure(figure, out_dir / REWARDS_PLOT)
    written.append(REWARDS_PLOT)

    histogram = agent_summary["accepted_index_histogram"]
    last = max([i for i, c in enumerate(histogram) if c] + [1])
    figure = Figure(figsize=(6, 3.4), layout="constrained")
    axis = figure.subplots()
    axis.bar(range(last + 1), histogram[:last + 1], color="tab:blue")
    axis.set_xlabel("index of the accepted candidate (0 = base model's top-1)")
    axis.set_ylabel("tokens")
    axis.set_title(f"agent decided {agent_summary['agent_decided']} of {agent_summary['tokens']} tokens; "
                   f"{agent_summary['fallbacks']} fallbacks", fontsize="medium")
    _save_figure(figure, out_dir / INDEX_PLOT)
    written.append(INDEX_PLOT)
    return written


def _save_figure(figure, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=110)
    os.replace(temporary, path)


def format_summary(results: dict) -> str:
    """A short text report of [`evaluate`]'s results."""
    def num(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [(f"{results['n_prompts']} prompts ({results['generated_now']} answered now, {results['reused']} "
              f"reused) -> {results['out_dir']}"),
             f"{'reward':<28} {'base':>9} {'MARA':>9}  {'win/tie/loss':>13} {'pref %':>7} {'gain':>7}"]
    for name, r in results["rewards"].items():
        record = f"{r['wins']}/{r['ties']}/{r['losses']}"
        lines.append(f"{name:<28} {num(r['mean_base']):>9} {num(r['mean_mara']):>9}  {record:>13} "
                     f"{num(r['preference_rate'], '.1f'):>7} {num(r['gain'], '+.1f'):>7}")
    kl = results["kl_per_token"]
    lines.append(f"KL per token (-log p_base of MARA's tokens): {num(kl['mara'])} nats; base model's own tokens: "
                 f"{num(kl['base_reference'])}")
    a = results["agent"]
    shown = a["accepted_index_histogram"][:max([i + 1 for i, c in enumerate(a["accepted_index_histogram"]) if c] + [2])]
    lines.append(f"agent: asked on {a['agent_decided']} of {a['tokens']} tokens "
                 f"({num(a['agent_decided_rate'], '.1%')}), "
                 f"changed {a['changed_tokens']} tokens in {a['answers_changed']} answers, fell back on "
                 f"{a['fallbacks']} ({num(a['fallback_rate'], '.1%')} of its decisions); accepted index histogram "
                 f"{shown}")
    lines.append(f"cost: {num(a.get('forwards_per_step'), '.2f')} forwards per decode step (plain greedy: 1), "
                 f"{num(a.get('forwards_per_token'), '.3f')} per generated token")
    f = results["fluency"]
    lines.append(f"degenerate answers (fluency <= {DEGENERATE_THRESHOLD}): base {f['degenerate']['base']} "
                 f"({num(f['degenerate_rate']['base'], '.1%')}), MARA {f['degenerate']['mara']} "
                 f"({num(f['degenerate_rate']['mara'], '.1%')}); mean fluency base {num(f['mean_fluency']['base'])}, "
                 f"MARA {num(f['mean_fluency']['mara'])}")
    s = results["speed"]
    lines.append(f"speed: base {num(s['base_tokens_per_s'], '.1f')} tokens/s, "
                 f"MARA {num(s['mara_tokens_per_s'], '.1f')} tokens/s")
    files = [RESULTS_FILE, results["files"]["responses"]] + results["files"]["plots"]
    lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# command line


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mara-hf eval` (see [`run_eval`])."""
    from . import models

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Answer a prompt file with the base model and with MARA (same decoding settings), score\n"
                          "both with rewards, report preference rate, gain, per-token KL, agent statistics and speed.\n"
                          "Resumable: re-running with the same --out skips the prompts already answered.")
    parser.epilog = (REWARD_HELP + "\n\nexample:\n  mara-hf eval --prompts prompts.json --limit 50 --reward vader "
                     "--reward offensive")
    parser.add_argument("--prompts", required=True,
                        help="JSON list of objects with 'instruction', or JSON Lines with 'instruction' or 'prompt'")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    parser.add_argument("--reward", action="append", required=True, metavar="SPEC",
                        help="a reward (repeatable): vader, offensive, fluency, beaver-reward, beaver-cost, "
                             "hf:ID_OR_PATH, py:MODULE:FUNCTION or a weighted sum like 2*beaver-reward-1*beaver-cost "
                             "(see below)")
    models.add_model_argument(parser)
    models.add_agent_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--out", default="eval-results",
                        help="output folder: results.json, responses.jsonl, plots (default: eval-results)")
    parser.add_argument("--sample", action="store_true", help="sample (both sides, same seed) instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over instead of reusing the answers already in --out")
    parser.add_argument("--rescore", action="store_true",
                        help="score the answers already in --out again (after changing what a reward name means)")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """`mara-hf eval`: rewards are built first (so a bad spec fails before any model loads), then the prompts,
    the agent and the model; prints the summary."""
    from . import models
    from .rewards import parse_reward

    for option, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{option} has to be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit has to be at least 1.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache: dict = {}
    rewards = {}
    for spec in args.reward:
        if spec not in rewards:
            rewards[spec] = parse_reward(spec, device=device, cache=cache)
    prompts = load_prompts(args.prompts, args.limit)
    agent = models.load_agent(args.agent, args.agent_file)
    print(f"agent: {args.agent or models.DEFAULT_AGENT}; model: {args.model} (loading...)", file=sys.stderr)
    model, tokenizer = models.load_base_model(args.model, device=device)
    started = time.perf_counter()
    results = evaluate(
        model, tokenizer, agent, prompts, rewards,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample, seed=args.seed,
        out_dir=args.out, resume=not args.no_resume, rescore=args.rescore,
        generation_kwargs={"temperature": args.temperature} if args.sample else None,
    )
    print(format_summary(results))
    print(f"[{time.perf_counter() - started:.1f} s]", file=sys.stderr)
    return 0
