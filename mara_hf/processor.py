"""`MaraLogitsProcessor`: MARA as a drop-in for `model.generate(..., logits_processor=[...])`."""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from transformers import LogitsProcessor

from .agent import MaraAgent, validate_candidate_settings
from .decide import DEFAULT_SCHEDULE, evaluate_step, validate_schedule
from .states import cache_of, check_cache, check_model, next_position_ids
from .stats import MaraStats

SUPPORTED_DECODING = {"_sample": "greedy search or sampling", "_beam_search": "beam search"}


def unwrap_model(model):
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected in it), or the model itself."""
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


def agent_on_device(agent: MaraAgent, device: torch.device) -> MaraAgent:
    """The agent on `device` in eval mode; a copy if it lives elsewhere (the caller's agent is not moved)."""
    if agent.ln.weight.device != device:
        agent = copy.deepcopy(agent).to(device)
    return agent.eval()


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
    candidates as siblings at the next position); the cache is then put back exactly as it was. In greedy mode
    the top-1 is evaluated first and further candidates only for rows that rejected it.

    Args:
        agent ([`MaraAgent`]): the accept/reject agent; its `state_dim` must equal the model's hidden size.
        model: the causal LM that `generate` runs (a `PreTrainedModel` or a LoRA-style `PeftModel` around one).
        top_k (`int`, *optional*): candidate set size; defaults to the agent's config (40 for released agents).
        top_p (`float`, *optional*): nucleus mass of the candidate set; defaults to the agent's config (0.95).
        fallback (`str`, *optional*): `"first"` or `"last"`; defaults to the agent's config (`"first"`).
        schedule (`tuple[int]`, *optional*): chunk boundaries of lazy evaluation, default `(1, 8)`.

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
        fallback: str | None = None,
        schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
    ):
        self.model = unwrap_model(model)
        check_model(self.model)
        check_agent(agent, self.model)
        self.top_k = agent.top_k if top_k is None else top_k
        self.top_p = agent.top_p if top_p is None else top_p
        self.fallback = agent.fallback if fallback is None else fallback
        validate_candidate_settings(self.top_k, self.top_p, self.fallback)
        self.schedule = validate_schedule(schedule)
        self.device = self.model.get_output_embeddings().weight.device
        self.agent = agent_on_device(agent, self.device)
        self.stats = MaraStats(self.top_k, device=self.device)
        self._cache_id = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = _find_generation_state(self.model)
        cache = state["cache"]
        if id(cache) != self._cache_id:  # a new generate call: check its cache once, start fresh statistics
            check_cache(cache)
            self.stats = MaraStats(self.top_k, device=self.device)
            self._cache_id = id(cache)
        past = cache.get_seq_length()
        if past != input_ids.shape[1]:
            raise RuntimeError(
                f"MaraLogitsProcessor expected generate's cache to hold the {input_ids.shape[1]} tokens of "
                f"`input_ids`, but it holds {past}."
            )
        context_mask = state["attention_mask"]
        position_ids = next_position_ids(state["position_ids"], context_mask, past, input_ids.shape[0],
                                         input_ids.device)

        evaluation = evaluate_step(
            self.model,
            self.agent,
            cache,
            scores.to(self.device),
            position_ids,
            context_mask,
            top_k=self.top_k,
            top_p=self.top_p,
            fallback=self.fallback,
            schedule=self.schedule,
            lazy=state["greedy"],
        )
        decision = evaluation.decision
        self.stats.record(decision, state["unfinished"])
        self.stats.add_forwards(evaluation.forwards)

        cands = evaluation.candidates
        if state["greedy"]:
            allowed = torch.nn.functional.one_hot(decision.index, cands.width).bool()
        else:
            allowed = evaluation.allowed()
        return evaluation.restrict(scores, allowed)


def _find_generation_state(model) -> dict[str, Any]:
    """The running decoding loop's state (cache, padding mask, positions, mode), read from `generate`'s frame.

    A logits processor only receives `input_ids` and `scores`; the KV cache, padding mask and positions of the
    running `generate` call live in its decoding method's `model_kwargs`. Reading them there (instead of hooking
    the model) leaves nothing attached to the model between or after calls.
    """
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_name
        model_kwargs = frame.f_locals.get("model_kwargs") if name.startswith("_") else None
        if isinstance(model_kwargs, dict) and frame.f_locals.get("self") is model:
            if name not in SUPPORTED_DECODING:
                raise ValueError(
                    f"MaraLogitsProcessor supports greedy search, sampling and beam search, not `{name}` "
                    "(assisted or speculative decoding: drop `assistant_model` / `prompt_lookup_num_tokens`)."
                )
            cache = cache_of(model_kwargs)
            check_cache(cache)
            config = frame.f_locals.get("generation_config")
            sampling = bool(getattr(config, "do_sample", False))
            return {
                "cache": cache,
                "attention_mask": model_kwargs.get("attention_mask"),
                "position_ids": model_kwargs.get("position_ids"),
                "greedy": name == "_sample" and not sampling,
                "unfinished": frame.f_locals.get("unfinished_sequences") if name == "_sample" else None,
            }
        frame = frame.f_back
    raise RuntimeError(
        "MaraLogitsProcessor must be called by `model.generate(...)` of the model it was built with "
        "(pass it as `logits_processor=[MaraLogitsProcessor(agent, model)]`)."
    )
