"""`MaraLogitsProcessor`: MARA as a drop-in for `model.generate(..., logits_processor=[...])`."""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from transformers import LogitsProcessor

from . import hf_internals as hf
from .agent import MaraAgent, validate_candidate_settings
from .decide import evaluate_step
from .schedule import DEFAULT_SCHEDULE, make_schedule
from .states import check_cache, check_left_padding, check_model, next_position_ids
from .stats import MaraStats

logger = logging.getLogger(__name__)

SUPPORTED_DECODING = {"_sample": "greedy search or sampling", "_beam_search": "beam search"}


def unwrap_model(model):
    """The transformers causal LM inside a `torch.compile` wrapper (whose `generate` is the original model's) or a
    PEFT wrapper (LoRA layers stay injected in it), or the model itself."""
    # `torch.compile(model)` returns an `OptimizedModule` that keeps the original module in `_orig_mod` (read as
    # accelerate's `extract_model_from_parallel` reads it); its `generate` is the original's.
    model = getattr(model, "_orig_mod", model)
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is not None and hasattr(model, "peft_config"):
        config = model.active_peft_config
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"MARA reads the base model's states and cannot run under prompt-learning adapters "
                f"({config.peft_type}); LoRA-style adapters are supported."
            )
        return get_base_model()
    return model


def check_agent(agent, model) -> None:
    if not isinstance(agent, MaraAgent):
        raise TypeError(f"`agent` has to be a `MaraAgent`, but is {type(agent).__name__}.")
    hidden = model.get_output_embeddings().weight.shape[-1]
    if agent.state_dim != hidden:
        where = f" (trained for {agent.base_model})" if agent.base_model else ""
        raise ValueError(
            f"The agent reads states of size {agent.state_dim}{where}, but {type(model).__name__} has hidden size "
            f"{hidden}: use an agent trained for this model."
        )


def check_watermark(generation_config, greedy: bool) -> None:
    """Greedy MARA takes each token itself, before `generate` adds a watermark's bias (it applies the watermark
    after every other processor), so the answer would carry no watermark: refused, with the fix."""
    if greedy and getattr(generation_config, "watermarking_config", None) is not None:
        raise ValueError(
            "`watermarking_config` cannot watermark greedy MARA decoding: MARA takes each token before `generate` "
            "adds the watermark's bias, so the answer would carry no watermark. Sample (`do_sample=True`: the "
            "watermark then biases the choice among the accepted candidates) or drop `watermarking_config`."
        )


_DEVICE_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def agent_on_device(agent: MaraAgent, device: torch.device) -> MaraAgent:
    """The agent on `device`: the caller's own module if it lives there, else a copy (the caller's agent is neither
    moved nor switched to eval mode: its layers behave alike in both modes, so its `training` flag is left as it is).

    The copy is kept (weakly, per agent and device) and reused while the agent's parameters are unchanged (same
    tensors, same in-place version counters), so that repeated calls hand compiled steps the same module."""
    if agent.ln.weight.device == torch.device(device):
        return agent
    stamp = tuple((p.data_ptr(), p._version) for p in agent.parameters())
    copies = _DEVICE_COPIES.setdefault(agent, {})
    kept = copies.get(str(device))
    if kept is None or kept[0] != stamp:
        kept = copies[str(device)] = (stamp, copy.deepcopy(agent).to(device).eval())
    return kept[1]


def candidate_width(model, top_k: int) -> int:
    """At most this many candidates per row: `top_k`, cut to the vocabulary as `build_candidates` cuts it."""
    return min(top_k, model.get_output_embeddings().weight.shape[0])


def warn_nonfinite(agent: MaraAgent, count: int, so_far: bool = False) -> None:
    """Warn (once per call) when the agent gave `count` NaN/inf accept probabilities (`so_far`: in the call's steps
    until now): such candidates count as rejected, so decisions silently fall back."""
    if count:
        name = agent.source or agent.base_model or type(agent).__name__
        logger.warning(
            "The MARA agent (%s) returned NaN or infinite accept probabilities for %d candidates%s; they were treated "
            "as rejected. Check the agent's weights (and the model's dtype: float16 states may overflow).",
            name, count, " so far in this call" if so_far else "",
        )


class MaraLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that aligns decoding with a MARA agent: among the step's candidates (log-softmax, top-k,
    top-p, by probability) it keeps only those the agent accepts, judged on each candidate's own final hidden
    state. Every other token gets `-inf`. Greedy decoding then takes the first accepted candidate (MARA's "top1"
    rule); sampling samples among accepted candidates by the model's probabilities (temperature, top-k and top-p
    given to `generate` still apply); beam search searches over accepted candidates. When every candidate is
    rejected only the fallback survives: the top-1 (`"first"`, the released evaluation) or the last candidate
    (`"last"`, the paper's training MDP). A lone candidate is kept without asking the agent.

    The states of all candidates of all rows come from ONE extra forward on top of `generate`'s own KV cache (the
    candidates as siblings at the next position; lm_head projects none of them); the cache is then put back
    exactly as it was. In greedy mode candidates can be evaluated in chunks (`schedule`): the top-1 first and
    further candidates only for rows that rejected it.

    Args:
        agent ([`MaraAgent`]): the accept/reject agent; its `state_dim` must equal the model's hidden size.
        model: the causal LM that `generate` runs (a `PreTrainedModel`, a LoRA-style `PeftModel` around one, or
            `torch.compile(model)`).
        top_k (`int`, *optional*): candidate set size; defaults to the agent's config (40 for released agents).
        top_p (`float`, *optional*): nucleus mass of the candidate set; defaults to the agent's config (0.95).
        min_p (`float`, *optional*): drop candidates less probable than `min_p` times the top-1; defaults to the
            agent's config (0: the paper's candidates).
        fallback (`str`, *optional*): `"first"` or `"last"`; defaults to the agent's config (`"first"`).
        accept_threshold (`float`, *optional*): a candidate is accepted when p(accept) exceeds it; defaults to the
            agent's config (0.5, the agent's greedy decision).
        schedule (`str` or `tuple[int]`, *optional*, defaults to `"auto"`): in which chunks candidates are
            evaluated in greedy mode: `"auto"` (chosen by cost for the device, batch and the agent's observed
            behaviour, see `mara_hf.schedule`), or boundaries such as `(1, 8)` (the top-1 first, then candidates
            2-8 for rows that rejected it, then the rest) or `(40,)` (all at once).

    After `generate`, `processor.stats` ([`MaraStats`]) describes that call: tokens decided, tokens where the agent
    was asked, fallbacks, histogram of the taken candidate's index, extra forwards.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from mara_hf import MaraAgent, MaraLogitsProcessor
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    >>> agent = MaraAgent(state_dim=16)
    >>> mara = MaraLogitsProcessor(agent, model)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
    ...     logits_processor=[mara], pad_token_id=0)
    >>> out.shape, mara.stats.tokens
    (torch.Size([1, 8]), 5)

    ```
    """

    def __init__(
        self,
        agent: MaraAgent,
        model,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        fallback: str | None = None,
        accept_threshold: float | None = None,
        schedule: str | tuple[int, ...] = DEFAULT_SCHEDULE,
    ):
        self.model = unwrap_model(model)
        check_model(self.model)
        check_agent(agent, self.model)
        self.top_k = agent.top_k if top_k is None else top_k
        self.top_p = agent.top_p if top_p is None else top_p
        self.min_p = agent.min_p if min_p is None else min_p
        self.fallback = agent.fallback if fallback is None else fallback
        self.accept_threshold = agent.accept_threshold if accept_threshold is None else accept_threshold
        validate_candidate_settings(self.top_k, self.top_p, self.fallback, self.accept_threshold, self.min_p)
        self.device = hf.execution_device(self.model.get_output_embeddings())
        self.schedule = schedule
        self.width = candidate_width(self.model, self.top_k)
        make_schedule(schedule, device=self.device, batch_size=1, width=self.width)  # validate now
        self._user_agent = agent
        self.agent = agent_on_device(agent, self.device)
        self.stats = MaraStats(self.top_k, device=self.device)
        self._call = None  # (weak reference to the running generate call's generation config, its schedule)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = _generation_state(self.model)
        cache = state["cache"]
        batch = input_ids.shape[0]
        past = cache.get_seq_length()
        if past < input_ids.shape[1]:  # more when the prompt came as `inputs_embeds`: `input_ids` then lacks it
            raise RuntimeError(
                f"MaraLogitsProcessor expected generate's cache to hold the {input_ids.shape[1]} tokens of "
                f"`input_ids`, but it holds {past}."
            )
        # A new generate call has a new generation config (also when it continues on the last call's cache).
        first_step = self._call is None or self._call[0]() is not state["generation_config"]
        if first_step:  # a new generate call: check it once, start fresh statistics and schedule
            check_watermark(state["generation_config"], state["greedy"])
            if self._call is not None:
                self._call[1].finish(self.stats)  # the previous call's last steps, for the agent's memory
            check_left_padding(state["attention_mask"] if state["attention_mask"] is None
                               else state["attention_mask"][:, :past])  # the prompt's columns
            self.stats = MaraStats(self.top_k, device=self.device)
            schedule = make_schedule(self.schedule, device=self.device, batch_size=batch, width=self.width,
                                     first_for_all=False, agent=self._user_agent, model=self.model)
            self._call = (weakref.ref(state["generation_config"]), schedule)
            self._step, self._warned = 0, False
        schedule = self._call[1]
        self._step += 1
        context_mask = state["attention_mask"]
        position_ids = next_position_ids(state["position_ids"], context_mask, past, batch, input_ids.device)

        evaluation = evaluate_step(
            self.model,
            self.agent,
            cache,
            scores.to(self.device),
            position_ids,
            context_mask,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            fallback=self.fallback,
            thresholds=self.accept_threshold,
            schedule=schedule.current(),
            lazy=state["greedy"],
            active=state["unfinished"],
        )
        decision = evaluation.decision
        self.stats.record(decision, state["unfinished"])
        self.stats.add_forwards(evaluation.forwards)
        self.stats.add_probabilities(evaluation.probabilities)
        schedule.observe(self.stats)
        # A processor is not told when the call ends: the NaN count is read (a host read) at steps 1, 2, 4, 8, ... and
        # at the last step `max_length` allows, until the call's one warning; so at most 2 + log2(steps) reads.
        last_step = input_ids.shape[1] + 1 >= (state["generation_config"].max_length or 0)
        if not self._warned and (self._step & (self._step - 1) == 0 or last_step):
            count = self.stats.nonfinite
            warn_nonfinite(self.agent, count, so_far=True)
            self._warned = bool(count)

        cands = evaluation.candidates
        if state["greedy"]:
            allowed = torch.nn.functional.one_hot(decision.index, cands.width).bool()
        else:
            allowed = evaluation.allowed()
        return evaluation.restrict(scores, allowed)


def _generation_state(model) -> dict:
    """The running decoding loop's state (cache, padding mask, positions, mode), read from `generate`'s frame
    (`hf_internals.generate_locals`).

    A logits processor only receives `input_ids` and `scores`; the KV cache, padding mask and positions of the
    running `generate` call live in its decoding method's `model_kwargs`. Reading them there (instead of hooking
    the model) leaves nothing attached to the model between or after calls.
    """
    found = hf.generate_locals(model, ("model_kwargs", "generation_config", "unfinished_sequences"))
    if found is None:
        raise RuntimeError(
            "MaraLogitsProcessor must be called by `model.generate(...)` of the model it was built with "
            "(pass it as `logits_processor=[MaraLogitsProcessor(agent, model)]`)."
        )
    name, local = found
    if name not in SUPPORTED_DECODING:
        raise ValueError(
            f"MaraLogitsProcessor supports greedy search, sampling and beam search, not `{name}` "
            "(assisted or speculative decoding: drop `assistant_model` / `prompt_lookup_num_tokens`)."
        )
    model_kwargs = local["model_kwargs"]
    cache = hf.cache_of(model_kwargs)
    check_cache(cache)
    sampling = bool(getattr(local["generation_config"], "do_sample", False))
    return {
        "cache": cache,
        "attention_mask": model_kwargs.get("attention_mask"),
        "position_ids": model_kwargs.get("position_ids"),
        "greedy": name == "_sample" and not sampling,
        "generation_config": local["generation_config"],
        "unfinished": local["unfinished_sequences"] if name == "_sample" else None,
    }
