"""The evaluation runner: answer prompts with the base model and with MARA under the same settings, batch by batch,
score both answers with every reward, and keep the records in the folder's [`ResponseStore`]."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hf_internals as hf
from ..data import answer_lengths, decode_answers, encode_chat_prompts, eos_token_ids, mark_changes, pad_token_id
from ..files import write_json_atomic
from ..progress import progress_bar
from ..rewards import as_scores
from .metrics import summarize
from .report import RESULTS_FILE, write_plots
from .store import RESPONSES_FILE, ResponseStore, answer_settings, fingerprint

RESERVED_GENERATE_ARGS = ("input_ids", "attention_mask", "max_new_tokens", "do_sample", "custom_generate",
                          "return_dict_in_generate", "mara_agent", "mara_stats", "streamer")


@dataclass
class EvalSettings:
    """How both sides answer and how they are compared; checked when built (a bad value raises `ValueError`)."""

    max_new_tokens: int = 64
    """Tokens per answer (an answer also ends at EOS)."""
    batch_size: int = 8
    """Prompts per `generate` call (and per reward call)."""
    do_sample: bool = False
    """Sample instead of greedy decoding, on both sides."""
    seed: int = 0
    """Each batch is seeded with `seed + index of its first prompt`, on both sides."""
    generation_kwargs: dict = field(default_factory=dict)
    """More `generate` arguments for both sides (e.g. `temperature=0.7`)."""
    mara_kwargs: dict = field(default_factory=dict)
    """MARA options (`mara_top_k`, `mara_top_p`, `mara_min_p`, `mara_fallback`, `mara_accept_threshold`,
    `mara_schedule`)."""
    tie_tolerance: float = 0.0
    """Reward differences up to this count as ties."""

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` has to be a positive integer, got {value!r}.")
        if not isinstance(self.tie_tolerance, (int, float)) or not self.tie_tolerance >= 0:
            raise ValueError(f"`tie_tolerance` has to be a non-negative number, got {self.tie_tolerance!r}.")
        self.generation_kwargs = dict(self.generation_kwargs or {})
        self.mara_kwargs = dict(self.mara_kwargs or {})
        clash = sorted(set(self.generation_kwargs) & set(RESERVED_GENERATE_ARGS))
        if clash:
            raise ValueError(f"`generation_kwargs` cannot set {', '.join(clash)}: evaluate sets them.")
        bad = sorted(k for k in self.mara_kwargs if not k.startswith("mara_") or k in ("mara_agent", "mara_stats"))
        if bad:
            raise ValueError(f"`mara_kwargs` takes MARA options (mara_top_k, mara_top_p, mara_min_p, mara_fallback, "
                             f"mara_accept_threshold, mara_schedule), not {', '.join(bad)}.")


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
    answer with each changed token shown as ⟦top1→taken⟧ ([`mara_hf.data.mark_changes`]); token counts, NLL sums,
    agent counts, the batch's forwards and decode steps, seconds), appended and flushed per finished batch. With
    `resume=True`, prompts already in that file (same index and text, same settings: model, agent weights and
    decoding, see [`mara_hf.evaluation.store`]) are not generated again, rewards missing from their lines are
    computed, and the summary is rebuilt from all lines; `resume=False` starts the file over. Saved scores are
    keyed by reward name: after changing what a name means, pass `rescore=True` to score the saved answers again.
    `results.json` and the plots are written to a temporary file first and then renamed, so they are never
    half-written.

    Args:
        model, tokenizer: the base causal LM and its tokenizer (left padding is used; a missing pad token is set
            to EOS).
        agent: a [`MaraAgent`].
        prompts: the user messages.
        rewards: name -> reward callable `(prompts, responses) -> (N,)` scores, higher is better.
        max_new_tokens, batch_size, do_sample, seed, generation_kwargs, mara_kwargs, tie_tolerance: the
            [`EvalSettings`], the same for both sides.
        out_dir: output folder (created).
        resume: reuse the answers already in `out_dir`.
        rescore: score reused answers again with `rewards` instead of keeping their saved scores.
        plots: write the PNG plots (needs matplotlib; skipped with a warning line without it).
        progress: show a progress bar.
    """
    prompts = _check_prompts(prompts)
    rewards = _check_rewards(rewards)
    settings = EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample, seed=seed,
                            generation_kwargs=generation_kwargs, mara_kwargs=mara_kwargs,
                            tie_tolerance=tie_tolerance)
    runner = BatchRunner(model, tokenizer, agent, rewards, settings)
    return run_evaluation(runner, prompts, list(rewards), settings, agent=agent, out_dir=out_dir, resume=resume,
                          rescore=rescore, plots=plots, progress=progress)


def run_evaluation(answerer, prompts: list[str], reward_names: list[str], settings: EvalSettings, *, agent,
                   out_dir: str | os.PathLike, resume: bool, rescore: bool, plots: bool, progress: bool) -> dict:
    """The folder's side of [`evaluate`]: resume from `responses.jsonl`, have the prompts not answered yet answered
    batch by batch, store the records, summarize and write `results.json` and the plots.

    `answerer` answers and scores: a [`BatchRunner`] in this process, or Ray workers
    (`mara_hf.distributed.evaluation`). It has `described` and `settings_id` (the settings that decide the answers
    and their fingerprint), `score(records) -> bool` (add the rewards the records lack, in place) and
    `answer(batches, prompts)`, which yields the records of each batch of prompt positions, in any order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResponseStore(out_dir, answerer.settings_id, resume=resume)

    reused = [store[(i, p)] for i, p in enumerate(prompts) if (i, p) in store]
    if rescore:
        for record in reused:
            for side in ("base", "mara"):
                for name in reward_names:
                    record["rewards"][side].pop(name, None)
    if answerer.score(reused):
        store.rewrite()

    pending = [i for i, p in enumerate(prompts) if (i, p) not in store]
    batches = [pending[start:start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
    bar = progress_bar(len(pending), desc="mara-hf eval", unit="prompt", enabled=progress)
    order = []
    try:
        for records in answerer.answer(batches, prompts):
            store.append(records)
            order.append(records[0]["index"])
            bar.update(len(records))
    finally:
        bar.close()
    if order != sorted(order):
        store.rewrite()  # batches finished out of order (several workers): the file in prompt order again

    current = [store[(i, p)] for i, p in enumerate(prompts)]
    top_k = settings.mara_kwargs.get("mara_top_k") or agent.top_k
    results = summarize(current, reward_names, top_k=top_k, tie_tolerance=settings.tie_tolerance)
    results.update(
        generated_now=len(pending),
        reused=len(prompts) - len(pending),
        settings=answerer.described,
        settings_id=answerer.settings_id,
        out_dir=str(out_dir),
        files={"responses": RESPONSES_FILE, "plots": []},
    )
    if plots:
        results["files"]["plots"] = write_plots(current, reward_names, results["agent"], out_dir)
    write_json_atomic(out_dir / RESULTS_FILE, results)
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


class BatchRunner:
    """Answers batches of prompts with both sides and turns the answers into scored records (see [`evaluate`] for
    their fields); the answerer of [`run_evaluation`] in this process. `described` / `settings_id`: the settings
    that decide the answers ([`answer_settings`]) and their fingerprint."""

    def __init__(self, model, tokenizer, agent, rewards: dict[str, Callable], settings: EvalSettings):
        from ..generation import mara_generate

        self.model, self.tokenizer, self.agent, self.rewards = model, tokenizer, agent, rewards
        self.settings = settings
        self.described = answer_settings(model, tokenizer, agent, settings)
        self.settings_id = fingerprint(self.described)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.device = hf.input_device(model)
        self.generate_args = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                  pad_token_id=pad_token_id(tokenizer), **settings.generation_kwargs)
        self.mara_args = dict(custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True,
                              **settings.mara_kwargs)

    def _timed_generate(self, inputs: dict, seed: int, **extra):
        torch.manual_seed(seed)
        _sync(self.device)
        start = time.perf_counter()
        out = self.model.generate(**inputs, **self.generate_args, **extra)
        _sync(self.device)
        return out, time.perf_counter() - start

    def answer(self, batches: list[list[int]], prompts: list[str]):
        """The records of each batch of prompt positions, in order."""
        for rows in batches:
            yield self.run(rows, [prompts[i] for i in rows])

    def score(self, records: list[dict]) -> bool:
        """Add the rewards `records` lack (in place); whether any was added."""
        return score_records(records, self.rewards, self.settings.batch_size)

    def run(self, indices: list[int], prompts: list[str]) -> list[dict]:
        """The records of `prompts` (positions `indices` of the prompt list), scored by every reward."""
        inputs = encode_chat_prompts(self.tokenizer, prompts, self.device)
        prompt_width = inputs["input_ids"].shape[1]
        seed = self.settings.seed + indices[0]
        base_sequences, base_seconds = self._timed_generate(inputs, seed)
        out, mara_seconds = self._timed_generate(inputs, seed, **self.mara_args)

        base_new = base_sequences[:, prompt_width:]
        mara_new = out.sequences[:, prompt_width:]
        base_len, mara_len = answer_lengths(base_new, self.eos_ids), answer_lengths(mara_new, self.eos_ids)
        base_nll = teacher_forced_nll(self.model, inputs["input_ids"], inputs["attention_mask"], base_new, base_len)
        mara_nll = teacher_forced_nll(self.model, inputs["input_ids"], inputs["attention_mask"], mara_new, mara_len)

        steps = {k: v.cpu() for k, v in out.mara_steps.items() if k != "forwards"}
        # The batch's cost: forwards of the fused loop and its decode steps (one entry of `forwards` per step).
        batch = {"rows": len(prompts), "forwards": out.mara_stats.forwards, "steps": len(out.mara_steps["forwards"])}
        base_texts = decode_answers(self.tokenizer, base_new, base_len)
        mara_texts = decode_answers(self.tokenizer, mara_new, mara_len)
        records = []
        for row, (index, prompt) in enumerate(zip(indices, prompts)):
            n_base, n_mara = int(base_len[row]), int(mara_len[row])
            tokens = mara_new[row, :n_mara].tolist()
            asked = steps["asked"][row, :n_mara]
            fallback = steps["fallback"][row, :n_mara] & asked
            taken = steps["index"][row, :n_mara][asked & ~fallback]
            histogram = torch.bincount(taken, minlength=1).tolist()
            marked = mark_changes(self.tokenizer, tokens, steps["top1"][row, :n_mara].tolist())
            records.append({
                "index": index,
                "prompt": prompt,
                "settings_id": self.settings_id,
                "base": base_texts[row],
                "mara": mara_texts[row],
                "rewards": {"base": {}, "mara": {}},
                "changed": marked.changed,
                "mara_marked": marked.text,
                "tokens": {"base": n_base, "mara": n_mara},
                "nll_sum": {"base": float(base_nll[row]), "mara": float(mara_nll[row])},
                "agent": {"tokens": n_mara, "agent_decided": int(asked.sum()), "fallbacks": int(fallback.sum()),
                          "accepted_index": {str(i): c for i, c in enumerate(histogram) if c}},
                "batch": batch,
                "seconds": {"base": base_seconds / len(prompts), "mara": mara_seconds / len(prompts)},
            })
        score_records(records, self.rewards, len(records))
        return records


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def score_records(records: list[dict], rewards: dict, batch_size: int) -> bool:
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
