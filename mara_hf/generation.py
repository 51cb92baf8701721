"""The fused MARA decoding loop: the forward that evaluates a candidate is also the next step's forward.

Per step, candidates are evaluated as siblings (top-1 first, later chunks only while some row rejected all so
far); each row's taken candidate keeps its KV entry and the rest are dropped; the taken candidate's logits are the
next step's logits. A step whose top-1 is accepted by every row costs exactly one one-token forward, as plain
greedy decoding does.

Use it as `model.generate(**inputs, custom_generate=mara_generate, mara_agent=agent)`, or give the model
`MaraGenerationMixin` (`add_mara_generation(model)`) and call `model.generate(**inputs, mara_agent=agent)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import hf_internals as hf
from .agent import validate_candidate_settings
from .compiled import CompiledStep
from .decide import evaluate_step
from .processor import (agent_on_device, candidate_width, check_agent, check_watermark, unwrap_model,
                        warn_nonfinite)
from .schedule import DEFAULT_SCHEDULE, make_schedule
from .states import (HeadInput, check_cache, check_left_padding, check_model, known_plain_head, next_position_ids,
                     plain_head)
from .stats import MaraStats, check_stats

logger = logging.getLogger(__name__)


@dataclass
class MaraGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus MARA's statistics.

    Attributes:
        mara_stats ([`MaraStats`]): totals over the call.
        mara_steps (`dict[str, torch.Tensor]`): per step and row, `index` (taken candidate's position, 0 = top-1),
            `top1` (the model's most probable token), `num_candidates`, `asked` (the agent was asked), `fallback`
            (every candidate rejected), each of shape `(batch, steps)`, and `forwards` `(steps,)`: forwards run per
            step.
    """

    mara_stats: MaraStats | None = None
    mara_steps: dict | None = None


def mara_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    mara_agent=None,
    mara_top_k: int | None = None,
    mara_top_p: float | None = None,
    mara_min_p: float | None = None,
    mara_fallback: str | None = None,
    mara_accept_threshold: float | None = None,
    mara_schedule=DEFAULT_SCHEDULE,
    mara_stats: MaraStats | None = None,
    **model_kwargs,
):
    r"""MARA decoding as a `custom_generate` callable: `model.generate(**inputs, custom_generate=mara_generate,
    mara_agent=agent)`.

    Greedy (`do_sample=False`) takes the first accepted candidate in probability order, exactly like
    `MaraLogitsProcessor`; sampling samples among accepted candidates (temperature / top-k / top-p of `generate`
    apply to them). Supports batches with left padding, EOS and stopping criteria, `max_new_tokens`, a streamer,
    `num_return_sequences`, `return_dict_in_generate` (a [`MaraGenerateOutput`] with per-step statistics) and
    `cache_implementation="static"` (siblings in scratch slots of the static cache; compiled where `generate`
    compiles, see the README).

    MARA arguments (all optional but `mara_agent`): `mara_top_k`, `mara_top_p`, `mara_min_p`, `mara_fallback`,
    `mara_accept_threshold` (default: the agent's config), `mara_schedule` (`"auto"`, the default: chunks chosen
    by cost; or boundaries such as `(1, 8)`
    or `(40,)`, see `mara_hf.schedule`), `mara_stats` (a [`MaraStats`] to accumulate into).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, Qwen3Config
    >>> from mara_hf import MaraAgent, mara_generate
    >>> config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> agent = MaraAgent(state_dim=16)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
    ...                      pad_token_id=0, custom_generate=mara_generate, mara_agent=agent)
    >>> out.shape
    torch.Size([1, 8])

    ```
    """
    if mara_agent is None:
        raise ValueError("`mara_generate` needs an agent: pass `mara_agent=MaraAgent.from_pretrained(...)`.")
    if generation_config.num_beams > 1:
        raise ValueError(
            "The fused MARA loop does not do beam search (num_beams > 1); use "
            "`logits_processor=[MaraLogitsProcessor(agent, model)]` with plain `generate` for that."
        )
    if synced_gpus:
        raise ValueError("The fused MARA loop does not support `synced_gpus`.")
    check_watermark(generation_config, greedy=not generation_config.do_sample)
    if generation_config.return_dict_in_generate and (
        generation_config.output_attentions or generation_config.output_hidden_states
    ):
        raise ValueError(
            "The fused MARA loop does not return attentions or hidden states (its forwards run candidates side by "
            "side): drop `output_attentions` / `output_hidden_states`, or use "
            "`logits_processor=[MaraLogitsProcessor(agent, model)]` with plain `generate`, which returns them."
        )
    calling = hf.calling_generate_locals(model, ("streamer", "assistant_model", "logits_processor"))
    if calling.get("assistant_model") is not None or generation_config.prompt_lookup_num_tokens is not None:
        raise ValueError(
            "The fused MARA loop does not do assisted or speculative decoding: drop `assistant_model` / "
            "`prompt_lookup_num_tokens` (MARA decides every token itself)."
        )
    model = unwrap_model(model)
    check_model(model)
    check_agent(mara_agent, model)
    top_k = mara_agent.top_k if mara_top_k is None else mara_top_k
    top_p = mara_agent.top_p if mara_top_p is None else mara_top_p
    min_p = mara_agent.min_p if mara_min_p is None else mara_min_p
    fallback = mara_agent.fallback if mara_fallback is None else mara_fallback
    threshold = mara_agent.accept_threshold if mara_accept_threshold is None else mara_accept_threshold
    validate_candidate_settings(top_k, top_p, fallback, threshold, min_p, prefix="mara_")
    if not model_kwargs.get("use_cache", True):
        check_cache(None)
    check_left_padding(model_kwargs.get("attention_mask"))
    cache = hf.cache_of(model_kwargs)
    static = cache is not None and check_cache(cache, static=True) == "static"
    width = candidate_width(model, top_k)
    check_stats(mara_stats, width)
    if static:
        cache = _static_cache_with_scratch(model, cache, generation_config, input_ids, model_kwargs, width)
    device = hf.execution_device(model.get_output_embeddings())
    batch_size = input_ids.shape[0]
    compiling = static and hf.generate_would_compile(model, model_kwargs, generation_config)
    schedule = make_schedule(mara_schedule, device=device, batch_size=batch_size, width=width, static=static,
                             compiled=compiling, agent=mara_agent, model=model, name="mara_schedule")
    agent = agent_on_device(mara_agent, device)
    if streamer is None:
        streamer = calling.get("streamer")

    pad_token_id = hf.pad_token(generation_config)
    return_dict = generation_config.return_dict_in_generate
    output_scores = return_dict and generation_config.output_scores
    output_logits = return_dict and generation_config.output_logits
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    do_sample = generation_config.do_sample
    # `after`: generate's warpers, watermark, ...; the caller's own processors all run before MARA decides
    processors, after = hf.split_at_caller_processors(logits_processor, calling.get("logits_processor"))
    stats = mara_stats if mara_stats is not None else MaraStats(top_k, device=device)
    nonfinite_before = stats.nonfinite if mara_stats is not None else 0  # the NaN warning is about this call
    schedule.start(mara_stats)

    unfinished = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    scores_out = () if output_scores else None
    logits_out = () if output_logits else None
    steps = {"index": [], "top1": [], "num_candidates": [], "asked": [], "fallback": [], "forwards": []}

    # Greedy dynamic-cache steps project each row's taken sibling once, at the commit, and compiled static steps
    # project the picked sibling inside the compiled chunk: both only where lm_head's output is the model's logits
    # (`states.plain_head`, checked bit for bit once per model on the prompt forward).
    defer_head = not static and not do_sample
    known = known_plain_head(model)
    outputs, head_input = _prefill(model, input_ids, generation_config, model_kwargs,
                                    capture=(compiling or defer_head) and known is None)
    model_kwargs = hf.advance_model_kwargs(model, outputs, model_kwargs)
    cache = hf.cache_of(model_kwargs)
    check_cache(cache, static=True)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    plain = known if head_input is None else plain_head(model, head_input, outputs.logits)
    compiled = None
    if compiling and plain:
        compiled = CompiledStep.for_model(model, agent, hf.compile_options(generation_config))
    elif compiling:
        logger.warning("%s post-processes lm_head's output (e.g. logit soft-capping or scaling); the static-cache "
                       "MARA step runs uncompiled for it.", type(model).__name__)
    defer_head = defer_head and bool(plain)
    del outputs, head_input
    # The cache's length (a static cache's scratch slots start here): the prompt's, also when it came as
    # `inputs_embeds` and `input_ids` holds none of it (one host read per call on a static cache).
    length = int(cache.get_seq_length())

    with hf.decode_context(model):  # generate's own decode steps run in it too
        try:
            while True:
                evaluation = None  # the step under way, whose cache snapshot `finally` puts back
                scores = processors(input_ids, logits)
                context_mask = model_kwargs.get("attention_mask")
                next_positions = next_position_ids(model_kwargs.get("position_ids"), context_mask, length, batch_size,
                                                   input_ids.device)

                evaluation = evaluate_step(
                    model,
                    agent,
                    cache,
                    scores,
                    next_positions,
                    context_mask,
                    top_k=top_k,
                    top_p=top_p,
                    min_p=min_p,
                    fallback=fallback,
                    thresholds=threshold,
                    schedule=schedule.current(),
                    lazy=not do_sample,
                    for_commit=True,
                    static_length=length if static else None,
                    compiled=compiled,
                    defer_head=defer_head,
                    active=unfinished,
                )
                decision = evaluation.decision
                cands = evaluation.candidates
                if do_sample:
                    final_scores = after(input_ids, evaluation.restrict(scores, evaluation.allowed()))
                    next_tokens = torch.multinomial(torch.softmax(final_scores, dim=-1), num_samples=1).squeeze(1)
                    index = ((cands.tokens == next_tokens[:, None]) & cands.valid).long().argmax(dim=-1)
                    decision.index, decision.token = index, next_tokens
                else:
                    index, next_tokens = decision.index, decision.token
                    final_scores = None
                    if output_scores:  # what generate returns for the processor's one-hot output
                        final_scores = after(input_ids, torch.full_like(scores, -float("inf")).scatter(
                            1, next_tokens[:, None], scores.gather(1, next_tokens[:, None])
                        ))

                next_logits = evaluation.next_logits() if evaluation.committed else evaluation.commit(index)
                length += 1

                stats.record(decision, unfinished)
                stats.add_forwards(evaluation.forwards)
                stats.add_probabilities(evaluation.probabilities)
                schedule.observe(stats)
                if return_dict:
                    for key in ("index", "num_candidates", "asked", "fallback"):
                        steps[key].append(getattr(decision, key))
                    steps["top1"].append(cands.tokens[:, 0])
                    steps["forwards"].append(evaluation.forwards)
                if output_scores:
                    scores_out += (final_scores,)
                if output_logits:
                    logits_out += (logits,)

                if has_eos_stopping_criteria:
                    next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                model_kwargs = hf.advance_model_kwargs(model, {}, model_kwargs)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                unfinished = unfinished & ~stopping_criteria(input_ids, scores_out)
                if unfinished.max() == 0:
                    break
                logits = next_logits.to(dtype=torch.float32, device=input_ids.device)
        finally:
            # The cache as `generate` leaves it, also after a failure: without the last taken token (its step kept
            # its keys/values, which plain decoding only computes when the next call feeds it; a call continuing on
            # `out.past_key_values` with `out.sequences` feeds it), and without a failed step's siblings. A step
            # whose `evaluate_step` raised has put its cache back itself.
            if evaluation is not None:
                evaluation.siblings.restore()

    schedule.finish(stats)
    if streamer is not None:
        streamer.end()
    warn_nonfinite(agent, stats.nonfinite - nonfinite_before)
    if not return_dict:
        return input_ids
    mara_steps = {k: torch.stack(v, dim=1) for k, v in steps.items() if k != "forwards"}
    mara_steps["forwards"] = torch.tensor(steps["forwards"])
    return MaraGenerateOutput(
        sequences=input_ids,
        scores=scores_out,
        logits=logits_out,
        **{hf.OUTPUT_CACHE_FIELD: cache},
        mara_stats=stats,
        mara_steps=mara_steps,
    )


def _prefill(model, input_ids, generation_config, model_kwargs: dict, *, capture: bool):
    """generate's prompt forward; with `capture`, also lm_head's input `(B, n, d)` (to check that MARA's steps may
    project states with lm_head itself: `states.plain_head`, once per model)."""
    if not capture:
        return hf.prefill(model, input_ids, generation_config, model_kwargs), None
    with HeadInput(model) as head_input:
        outputs = hf.prefill(model, input_ids, generation_config, model_kwargs)
    return outputs, head_input.states


def _static_cache_with_scratch(model, cache, generation_config, input_ids, model_kwargs: dict, width: int):
    """The static cache with room for `width` scratch slots after the longest context of this call: generate's
    own one when it is large enough, else (when `generate` made it for `cache_implementation="static"`) a larger
    one put in its place; a cache the caller passed that is too small is refused."""
    longest = hf.longest_context(generation_config, input_ids, model_kwargs)
    needed = longest + width
    if hf.static_capacity(cache) >= needed:
        return cache
    if generation_config.cache_implementation is None:
        raise ValueError(
            f"The static cache passed to generate has {hf.static_capacity(cache)} slots, but MARA needs "
            f"{needed}: the longest context ({longest} tokens) plus one scratch slot per candidate ({width}). "
            f"Create it with `max_cache_len={needed}` or more."
        )
    bigger = hf.new_static_cache(model, needed)
    for key in hf.CACHE_KEYS:
        if model_kwargs.get(key) is cache:
            model_kwargs[key] = bigger
    return bigger


class MaraGenerationMixin:
    """Gives a causal LM MARA decoding through `generate`.

    `model.generate(**inputs, mara_agent=agent)` runs the fused MARA loop ([`mara_generate`]); without
    `mara_agent`, `generate` behaves exactly as the model's own. Put it first among a model class's bases, or give
    an already-loaded model (also a `PeftModel`) the capability with [`add_mara_generation`].
    """

    def generate(self, *args, mara_agent=None, **kwargs):
        if mara_agent is None:
            return super().generate(*args, **kwargs)
        if kwargs.pop("custom_generate", None) not in (None, mara_generate):  # the README's form says it twice
            raise ValueError("Pass either `mara_agent` or `custom_generate`, not both.")
        # What `generate` does with the tokenizer it would drop for a callable `custom_generate`:
        args, kwargs = hf.tokenizer_settings_first(self, args, kwargs)
        return super().generate(*args, custom_generate=mara_generate, mara_agent=mara_agent, **kwargs)


@lru_cache(maxsize=None)
def _with_mara(cls: type) -> type:
    # Same name and qualname, so that `save_pretrained` records the original architecture.
    return type(cls.__name__, (MaraGenerationMixin, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__})


def add_mara_generation(model):
    """Give an already-loaded causal LM (or the model inside a `PeftModel`) [`MaraGenerationMixin`], in place;
    returns `model`. Afterwards `model.generate(**inputs, mara_agent=agent)` decodes with MARA.

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from mara_hf import MaraAgent, add_mara_generation
    >>> model = add_mara_generation(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16,
    ...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)))
    >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
    ...     mara_agent=MaraAgent(state_dim=16)).shape
    torch.Size([1, 7])

    ```
    """
    target = unwrap_model(model)
    if not isinstance(target, MaraGenerationMixin):
        target.__class__ = _with_mara(type(target))
    return model
