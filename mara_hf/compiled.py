"""The compiled pieces of a static-cache MARA step: a sibling chunk (forward, agent, pick, logits) and the commit.

With a static cache every shape of a step is fixed (batch, chunk width, cache slots), so the chunks and the commit
are compiled once and replayed at every step: with `generate`'s default compile options (`mode="reduce-overhead"`)
as CUDA graphs, one recorded per chunk width. Per batch size three graphs are compiled, whatever chunks the
schedules ask for: chunks of one sibling, chunks of several (the width dynamic, the first candidate a tensor),
and the commit. The eager static path (`states.StaticSiblings`) computes the same thing; this module only swaps
its pieces for compiled ones:

- `chunk(...)`: siblings `[start, start + n)` written to scratch slots `L + start ..`, the decoder forward with a
  mask built from the length tensor `L` (no host value, so no recompilation per step), the agent's p(accept), the
  sibling each row may keep (its first accepted one, or its fallback candidate), and that sibling's logits through
  `lm_head`. The decoder's output is `lm_head`'s input; the caller compiles only for models whose logits are
  `lm_head`'s output as it is (`states.plain_head`, bit for bit): models that post-process logits (soft-capping,
  a logit scale) run uncompiled.
- `commit(...)`: each row's taken sibling moved to slot `L`, the length set to `L + 1`.
"""

from __future__ import annotations

import weakref

import torch

from . import hf_internals as hf
from .candidates import keepable
from .states import eager_dtype, picked_states, sibling_mask

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class CompiledStep:
    """Compiled chunk and commit functions for one model and agent (see the module docstring)."""

    def __init__(self, model, agent, options: dict):
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.agent = agent
        self.keyword = hf.cache_keyword(self.decoder)
        self.eager_dtype = eager_dtype(model)
        self.cudagraphs = options.get("mode") == "reduce-overhead"
        self._starts: dict = {}
        self.chunk_fn = torch.compile(self._chunk, **options)
        self.commit_fn = torch.compile(self._commit, **options)

    @classmethod
    def for_model(cls, model, agent, options: dict) -> "CompiledStep":
        """One instance per model, agent and options, kept while the model lives (nothing is attached to it)."""
        per_model = _COMPILED.setdefault(model, {})
        key = (id(agent), tuple(sorted((k, repr(v)) for k, v in options.items())))
        step = per_model.get(key)
        if step is None or step.agent is not agent:
            step = per_model[key] = cls(model, agent, options)
        return step

    def _mark(self) -> None:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def chunk(self, cache, tokens, position_ids, padding, length, start: int, thresholds, valid, target):
        """Run siblings `tokens` `(B, n)` (candidates `start ..`) at slots `length + start ..`; returns
        `(states (B, n, d), p_accept (B, n), pick (B,), logits of the picked sibling (B, vocab))`."""
        self._mark()
        # A fixed stride, as generate's `prepare_inputs_for_generation` clones its sliced inputs with
        # `memory_format=torch.contiguous_format` ("to ensure a consistent stride", transformers #32227):
        # `position_ids` is a slice of generate's growing ids, whose row stride changes at every step; a compiled
        # function guards on strides, and with CUDA graphs each new one would record the step again.
        position_ids = position_ids.clone(memory_format=torch.contiguous_format)
        # Two graphs for all chunks, whatever their first candidate and width: one for chunks of one sibling (a size
        # of 1 is specialised) and one for chunks of several. `start` goes in as a tensor, the width is marked
        # dynamic, and the candidate slices are made contiguous (a graph first traced on a full-width slice guards
        # that its row stride equals its width). Left to dynamo's automatic dynamic shapes, each new (start, width)
        # of a re-planned schedule compiled another graph, some of them inside a later call (on an 8B model about a
        # minute each).
        start = self._start_tensor(start, length.device)
        if tokens.shape[1] > 1:
            tokens, valid, thresholds = (_dynamic_width(part) for part in (tokens, valid, thresholds))
        states, p, pick, logits = self.chunk_fn(cache, tokens, position_ids, padding, length, start, thresholds,
                                                valid, target)
        return states.clone(), p.clone(), pick.clone(), logits.clone()

    def _start_tensor(self, start: int, device) -> torch.Tensor:
        """`start` as a 0-d tensor on `device`, made once per value (no copy to the device at every step)."""
        key = (start, device)
        if key not in self._starts:
            self._starts[key] = torch.tensor(start, device=device)
        return self._starts[key]

    def commit(self, cache, length, index) -> None:
        self._mark()
        self.commit_fn(cache, length, index)

    def _chunk(self, cache, tokens, position_ids, padding, length, start: torch.Tensor, thresholds, valid, target):
        batch, count = tokens.shape
        hf.set_static_length(cache, length + start)
        mask = sibling_mask(padding, length + start, count, self.eager_dtype)
        out = self.decoder(input_ids=tokens, attention_mask=mask, position_ids=position_ids.expand(batch, count),
                           use_cache=True, **{self.keyword: cache})
        states = out.last_hidden_state
        p = self.agent.accept_probability(states)
        pick = keepable(p, thresholds, valid, target, start)
        logits = self.head(picked_states(states, pick))[:, 0].float()
        return states, p, pick, logits

    def _commit(self, cache, length, index):
        hf.commit_static_slot(cache, length, index)


def _dynamic_width(part):
    """A chunk's `(B, n)` slice, contiguous and with its width marked dynamic (a number passes as it is)."""
    if not isinstance(part, torch.Tensor):
        return part
    part = part.contiguous()
    torch._dynamo.maybe_mark_dynamic(part, 1)
    return part
