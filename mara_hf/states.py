"""Faithful MARA states for many candidates in one forward: the sibling forward.

At a decoding step the model's KV cache holds the context (``L`` entries per row). MARA's state for candidate
``t`` is the final-norm hidden state at ``t``'s own position, i.e. the vector ``lm_head`` receives when ``t`` is
appended to the context. All ``k`` candidates of a row go into ONE forward as *siblings*: input ids ``(B, k)``,
every sibling at the row's next position, and an attention mask in which each sibling sees the context and itself
only. A pre-hook on ``lm_head`` reads the ``(B, k, d)`` states.

Where the siblings' keys/values go depends on the cache (:class:`DynamicSiblings`, :class:`StaticSiblings`): a
dynamic cache appends them and is put back afterwards (its layers concatenate into new tensors, so nothing is
copied); a static cache writes them into scratch slots after the context, which no later mask lets anyone see.
Either keeps one chosen sibling per row as the committed token (the fused loop) or none (the processor).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import hf_internals as hf
from .hf_internals import cache_keyword

SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")

_PLAIN_HEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Per model (held weakly): whether its logits are `lm_head`'s output as it is (`plain_head`)."""


@lru_cache(maxsize=None)
def _takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def check_model(model) -> None:
    """Refuse models whose attention cannot take a sibling mask, or that cannot place a token at a chosen position,
    with the fix (or the reason) in the message."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; MARA aligns decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, "
            "GPT-2, ... and vision-language models built on one)."
        )
    if not _takes_position_ids(type(model)):
        raise ValueError(
            f"MARA evaluates a step's candidates side by side, all at the row's next position, which it sets through "
            f"`position_ids`; {name}.forward takes none (its positions come from the attention mask, as with ALiBi, "
            "or it keeps a recurrent state), so its candidates cannot be evaluated this way. MARA supports models "
            "with rotary or learned position embeddings (Llama, Qwen, Mistral, Gemma, GPT-2, ...)."
        )
    if getattr(model.config, "alibi", False):
        raise ValueError(
            f"{name} with `alibi=True` derives its ALiBi positions from the attention mask, not from `position_ids`, "
            "so MARA cannot place candidates side by side at the same position; it supports this architecture "
            "with rotary position embeddings (`alibi=False`)."
        )
    attn = hf.attention_implementation(model)
    if attn is not None and attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"MARA needs an attention implementation that accepts custom masks ({', '.join(SUPPORTED_ATTENTION)}), "
            f"but the model uses '{attn}'. Load it with `attn_implementation=\"sdpa\"` or call "
            "`model.set_attn_implementation(\"sdpa\")`."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): MARA needs a causal LM.")


def check_cache(cache, *, static: bool = False) -> str:
    """The cache's kind (`"dynamic"` or `"static"`); refuse caches MARA cannot put siblings into and take them out
    of again. `static=False` refuses static caches too (only the fused loop writes siblings to scratch slots)."""
    if cache is None:
        raise ValueError(
            "MARA decodes on top of the KV cache, but generation runs without one (`use_cache=False`, passed to "
            "`generate` or set in the model's config or generation config): pass `use_cache=True`."
        )
    kind = hf.cache_kind(cache)
    if kind == "dynamic" or (kind == "static" and static):
        return kind
    name = type(cache).__name__ + (" with offloading" if getattr(cache, "offloading", False) else "")
    if kind == "static":
        raise ValueError(
            f"The drop-in MaraLogitsProcessor cannot use a {name}: pass `cache_implementation=\"dynamic\"` (the "
            "model's generation config may set a static one), or use the fused loop "
            "(`custom_generate=mara_generate`), which supports `cache_implementation=\"static\"`."
        )
    layers = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
    if hf.has_recurrent_layers(cache):
        raise ValueError(
            f"MARA cannot put candidate siblings into a {name} (layers: {', '.join(layers)}): linear-attention and "
            "state-space layers keep one recurrent state per row, which cannot hold a step's candidates side by "
            "side. MARA supports models whose layers all keep attention keys and values."
        )
    raise ValueError(
        f"MARA cannot put candidate siblings into a {name} (layers: {', '.join(layers) or 'none'}). Pass "
        "`cache_implementation=\"dynamic\"` (the model's generation config may set another one), or "
        "`cache_implementation=\"static\"` with the fused loop on a model without sliding-window layers; offloaded "
        "and quantized caches are not supported."
    )


def next_position_ids(
    position_ids: torch.Tensor | None, context_mask: torch.Tensor | None, past: int, batch: int, device
) -> torch.LongTensor:
    """`(B, 1)` position of the token being decided: generate's already-extended position ids when present,
    else the number of real (unpadded) context tokens, else the cache length."""
    if position_ids is not None and position_ids.ndim == 2 and position_ids.shape[1] == past + 1:
        return position_ids[:, -1:]
    if context_mask is not None:
        return context_mask[:, :past].long().sum(dim=-1, keepdim=True)
    return torch.full((batch, 1), past, dtype=torch.long, device=device)


def check_left_padding(attention_mask: torch.Tensor | None) -> None:
    """Refuse right-padded prompts: every row's last prompt token must be real (MARA's next position of a row is
    the number of its real tokens, and its candidates follow the last column)."""
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[0] < 2:
        return
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "MARA needs left-padded prompts, but some rows of `attention_mask` end in padding (right padding). "
            "Tokenize with `tokenizer.padding_side = \"left\"`."
        )


def known_plain_head(model) -> bool | None:
    """What [`plain_head`] found for `model` earlier (None: not checked yet)."""
    return _PLAIN_HEAD.get(model)


def plain_head(model, states: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether `model`'s logits are lm_head's output as it is, checked once per model and remembered: `states` is
    lm_head's input in one forward (`HeadInput`) and `logits` that forward's logits; projected again, they must
    agree bit for bit. False for models that post-process lm_head's output (logit soft-capping, scaling), even
    where that changes the logits by rounding only: their logits must come out of the model's forward."""
    known = _PLAIN_HEAD.get(model)
    if known is None:
        with torch.no_grad():
            projected = model.get_output_embeddings()(states)
        known = projected.shape == logits.shape and bool(torch.equal(projected.float(), logits.float()))
        _PLAIN_HEAD[model] = known
    return known


class HeadInput:
    """Context manager reading lm_head's input during the forward run inside it (`.states`, `(B, n, d)`: the
    positions lm_head projects; the last forward's)."""

    def __init__(self, model):
        self.head, self.states = model.get_output_embeddings(), None

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._read)
        return self

    def _read(self, module, args):
        self.states = args[0]

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------------ masks
def sibling_mask(padding: torch.Tensor, first_slot, count: int, eager_dtype: torch.dtype | None = None):
    """`(B, 1, count, slots)` mask of full-attention layers: sibling `q` (at slot `first_slot + q`; an int or a 0-d
    tensor, so compiled steps need no host value) sees the context slots open in `padding` `(B, slots)` and its own
    slot. Boolean (sdpa), or additive with 0 / the dtype's minimum when `eager_dtype` is given (eager attention,
    as transformers' `eager_mask` builds it)."""
    kv = torch.arange(padding.shape[1], device=padding.device)
    own = kv[None, :] == (first_slot + torch.arange(count, device=padding.device))[:, None]  # (count, slots)
    allowed = own[None, None] | padding[:, None, None, :]
    if eager_dtype is None:
        return allowed
    return torch.zeros((), dtype=eager_dtype, device=padding.device).masked_fill(~allowed, torch.finfo(eager_dtype).min)


def context_slots(context_mask: torch.Tensor | None, past: int, slots: int, batch: int, device) -> torch.BoolTensor:
    """`(B, slots)`: the context slots `< past` that are not padding."""
    padding = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    padding[:, :past] = True if context_mask is None else context_mask[:, :past].to(device=device, dtype=torch.bool)
    return padding


def eager_dtype(model) -> torch.dtype | None:
    """The dtype of an additive mask, None for a boolean one (sdpa). Eager attention adds its mask to the scores;
    so does transformers' flex attention given a mask tensor instead of a `BlockMask` (`score + score_mask` in its
    `score_mod`): a boolean mask would add 0 or 1 and mask nothing."""
    return model.dtype if hf.attention_implementation(model) in ("eager", "flex_attention") else None


def _direct_mask(model, context_mask, past: int, start: int, count: int, slots: int, batch: int, device):
    """The sibling mask of full-attention layers for candidates `start ..` at slots `past + start ..`."""
    return sibling_mask(context_slots(context_mask, past, slots, batch, device), past + start, count,
                        eager_dtype(model))


def _library_mask(model, cache, context_mask, past: int, count: int, batch: int, device):
    """The sibling mask through transformers' own mask utilities: sliding-window and hybrid models (a dict per
    layer type) and flex attention (a BlockMask)."""
    if context_mask is None:
        mask_2d = torch.ones(batch, past + count, dtype=torch.long, device=device)
    else:
        mask_2d = torch.cat([context_mask[:, :past].to(device), context_mask.new_ones(batch, count).to(device)], dim=-1)
    # Only shape, dtype and device of `inputs_embeds` are read by the mask utilities.
    embeds = torch.empty((batch, count, 0), dtype=model.dtype, device=device)

    def sees_context_or_itself(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx < past) | (kv_idx == q_idx)

    masks = {}
    # The cache goes by position: transformers renamed that argument (`past_key_values` -> `cache`) in 5.2x. A
    # multimodal model's language model builds its masks from its text config (which holds the sliding window).
    args = (model.config.get_text_config(decoder=True), embeds, mask_2d, cache)
    common = dict(and_mask_function=sees_context_or_itself)
    sliding = hf.layer_kinds(cache)
    if False in sliding:
        masks["full_attention"] = create_causal_mask(*args, **common)
    if True in sliding:
        window = hf.sliding_window(cache)

        # Every sibling sits at position `past`: it sees the context inside the window of `past` (the causal window
        # of later sibling slots would otherwise shrink it), then itself.
        def context_in_window(batch_idx, head_idx, q_idx, kv_idx):
            return (kv_idx < past) & (kv_idx > past - window)

        masks["sliding_attention"] = create_sliding_window_causal_mask(*args, **common, or_mask_function=context_in_window)
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks


# ------------------------------------------------------------------------------------------------ the forward
@dataclass
class SiblingOutput:
    """States `(B, k, d)` (lm_head's input) and logits: `(B, k, vocab)` with `logits="all"`, `(B, 1, vocab)` for
    the picked sibling of each row with `pick`, else None."""

    states: torch.Tensor
    logits: torch.Tensor | None


def run_siblings(model, cache, tokens: torch.LongTensor, position_ids: torch.LongTensor, attention_mask, *,
                 logits: str = "none", pick=None) -> SiblingOutput:
    """One forward of the siblings `tokens` `(B, k)` at `position_ids` `(B, 1)` with a prepared mask.

    `logits`: `"none"` (lm_head projects nothing: the processor needs states only), `"all"` (every sibling) or
    `"pick"`: `pick(states) -> (B,)` chooses, before lm_head projects, the one sibling per row whose logits are
    needed (the fused loop's candidate it may keep), so rejected siblings cost no vocabulary projection; a pick
    that returns None lets lm_head project nothing (its caller projects later).
    """
    batch, k = tokens.shape
    captured = {}

    def capture_states(module, args):
        states = captured["states"] = args[0]
        index = pick(states) if logits == "pick" else None
        if index is not None:
            return (picked_states(states, index),) + tuple(args[1:])
        if logits == "all":
            return None
        return (states[:, :0],) + tuple(args[1:])  # "none", or a pick that defers: lm_head projects nothing

    handle = model.get_output_embeddings().register_forward_pre_hook(capture_states)
    # A chunk of several siblings attends on the key/value heads as they are (grouped-query attention, sdpa).
    packing = hf.packed_sibling_attention() if k > 1 else contextlib.nullcontext()
    try:
        with packing:
            out = model(
                input_ids=tokens,
                attention_mask=attention_mask,
                position_ids=position_ids.expand(batch, k),
                **{cache_keyword(model): cache},
                use_cache=True,
                return_dict=True,
            )
    finally:
        handle.remove()
    states = captured["states"]
    if states.shape[1] != k:
        raise RuntimeError(
            f"{type(model).__name__} passed {states.shape[1]} of {k} positions to lm_head; MARA needs a model whose "
            "forward projects every input position (`logits_to_keep=0`)."
        )
    return SiblingOutput(states=states, logits=None if logits == "none" else out.logits)


class DynamicSiblings:
    """Siblings appended to a dynamic cache, then taken out again (`restore`) or one per row kept (`commit`).

    A chunk may run for some rows only (`rows`): it then runs on a throwaway copy of those rows' cache, so the
    shared cache is not touched and the other rows pay nothing. With `keep_kv`, a chunk keeps its siblings'
    keys/values for `commit` (`kept_kv()`): all of them, or with a `pick` only the sibling each row may keep.

    A first chunk of one sibling for all rows with `keep_kv` is the fused loop's decode step: on full-attention
    layers its cache (`decoded`) is kept, and `commit` writes the taken siblings over its last entry instead of
    appending them to the restored cache (which would copy every layer's keys/values once more)."""

    def __init__(self, model, cache, context_mask: torch.Tensor | None):
        self.model, self.cache, self.context_mask = model, cache, context_mask
        self.snapshot = hf.DynamicSnapshot(cache)
        self.past = cache.get_seq_length()
        self.sliding = hf.has_sliding_layers(cache)
        self.library_mask = self.sliding or hf.attention_implementation(model) == "flex_attention"
        self.kv_parts = []
        self.decoded = None

    def forward(self, tokens, position_ids, start: int, rows=None, *, logits: str = "none", pick=None, keep_kv=False):
        """Run siblings `tokens` `(R, k)` (candidates `start .. start + k - 1`) for `rows` (None: all rows)."""
        count = tokens.shape[1]
        if count > 1:
            self.snapshot.keep_appended()
        cache = self.cache if rows is None else hf.narrow_dynamic_cache(self.cache, rows)
        context_mask = self.context_mask if rows is None or self.context_mask is None else self.context_mask[rows]
        batch, device = tokens.shape[0], tokens.device
        if count == 1:
            # A single sibling per row is an ordinary decode step: the model's own causal mask is exact.
            mask = None
            if context_mask is not None:
                mask = torch.cat([context_mask[:, : self.past], context_mask.new_ones(batch, 1)], dim=-1)
        elif self.library_mask:
            mask = _library_mask(self.model, cache, context_mask, self.past, count, batch, device)
        else:
            mask = _direct_mask(self.model, context_mask, self.past, 0, count, self.past + count, batch, device)
        out = run_siblings(self.model, cache, tokens, position_ids, mask, logits=logits, pick=pick)
        decode_step = keep_kv and start == 0 and count == 1 and rows is None and not self.sliding
        if decode_step:
            self.decoded = hf.DynamicSnapshot(self.cache)  # the cache with each row's top-1 appended
            # Its entries are read from there only if a commit needs them (`kept_kv`): most decode steps commit
            # themselves, and a host-bound step pays for every op per layer.
            self.kv_parts.append(None)
        elif keep_kv:
            full = hf.cache_rows(self.cache)[0]
            appended = hf.appended_kv(cache, count)
            if pick is not None:
                appended = [(_entry(k, pick.index), _entry(v, pick.index)) for k, v in appended]
            self.kv_parts.append([(widen(k, rows, full), widen(v, rows, full)) for k, v in appended])
        return out

    def kept_kv(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The chunks' kept keys/values (`kv_parts`), the decode step's read from its kept cache (views of each
        layer's last entry)."""
        return [self.decoded.last_entries() if part is None else part for part in self.kv_parts]

    def restore(self) -> None:
        """The cache exactly as before the first sibling forward."""
        self.snapshot.restore()

    def commit(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep one entry per row and layer (`(B, heads, 1, head_dim)` each): written over the top-1's entry of the
        decode step's cache where it was kept (`decoded`), else appended to the restored cache."""
        if self.decoded is not None:
            self.decoded.restore()
            hf.overwrite_last_kv(self.cache, kv)
        else:
            self.restore()
            hf.append_kv(self.cache, kv)


class StaticSiblings:
    """Siblings written into scratch slots of a static cache: candidate `j` of the step goes to slot `L + j` (all
    at the row's next token position), seeing the context and its own slot. `commit_index` moves each row's taken
    sibling to slot `L` and sets the length to `L + 1`; `restore` sets the length back to `L`. Stale scratch
    slots are never visible: every mask only opens slots below the length and a query's own slot.

    `compiled` (a `compiled.CompiledStep`): run picking chunks and the commit through compiled functions."""

    def __init__(self, model, cache, context_mask: torch.Tensor | None, past: int, compiled=None):
        self.model, self.cache, self.context_mask, self.past = model, cache, context_mask, past
        self.slots = hf.static_capacity(cache)
        self.compiled = compiled
        if compiled is not None:
            self.length = hf.static_length(cache).clone()  # == past, as a device tensor (no host value in graphs)
            batch, device = hf.cache_rows(cache)
            self.padding = context_slots(context_mask, past, self.slots, batch, device)

    def forward(self, tokens, position_ids, start: int, rows=None, *, logits: str = "none", pick=None, keep_kv=False):
        if rows is not None:
            raise ValueError("A static cache runs every chunk for all rows.")
        batch, count = tokens.shape
        if self.past + start + count > self.slots:
            raise RuntimeError(
                f"The static cache has {self.slots} slots, but candidates {start}..{start + count - 1} of a step at "
                f"length {self.past} need {self.past + start + count}."
            )
        if self.compiled is not None and logits == "pick":
            states, p, _, picked = self.compiled.chunk(self.cache, tokens, position_ids, self.padding, self.length,
                                                       start, pick.thresholds, pick.valid, pick.target)
            pick.p_accept = p
            return SiblingOutput(states=states, logits=picked[:, None])
        hf.set_static_length(self.cache, self.past + start)
        mask = _direct_mask(self.model, self.context_mask, self.past, start, count, self.slots, batch, tokens.device)
        return run_siblings(self.model, self.cache, tokens, position_ids, mask, logits=logits, pick=pick)

    def restore(self) -> None:
        hf.set_static_length(self.cache, self.past)

    def commit_index(self, index: torch.LongTensor) -> None:
        """Keep candidate `index[b]` of each row: its slot's keys/values move to slot `L`, the length becomes `L+1`."""
        if self.compiled is not None:
            self.compiled.commit(self.cache, self.length, index)
        else:
            hf.commit_static_slot(self.cache, self.past, index)


def sibling_forward(model, cache, tokens: torch.LongTensor, position_ids: torch.LongTensor,
                    context_mask: torch.Tensor | None, *, return_logits: bool = False, pick=None) -> SiblingOutput:
    """Run the candidates `tokens` `(B, k)` as siblings on top of a dynamic `cache`, which grows by `k` entries
    (put it back with `DynamicSiblings.restore`, or `hf_internals.DynamicSnapshot`).

    Args:
        model: the causal LM (a transformers `PreTrainedModel`, not a PEFT wrapper).
        cache: its dynamic KV cache holding the context.
        tokens: candidate ids, `k` per row.
        position_ids: `(B, 1)` position of the next token of each row.
        context_mask: 2D padding mask of the context `(B, >= L)`, or None when no row is padded.
        return_logits: also return the siblings' logits `(B, k, vocab)`.
        pick: optional `states (B, k, d) -> index (B,)`; lm_head then projects only the picked sibling of each row
            and `logits` is `(B, 1, vocab)`.
    """
    siblings = DynamicSiblings(model, cache, context_mask)
    mode = "pick" if pick is not None else ("all" if return_logits else "none")
    return siblings.forward(tokens, position_ids, 0, logits=mode, pick=pick)


def select_kv(parts: list[list[tuple[torch.Tensor, torch.Tensor]]], index: torch.LongTensor):
    """From chunks of appended entries (each a per-layer list of `(B, h, n_i, d)` pairs), pick entry `index[b]` of
    row `b` along the concatenated chunks: one `(B, h, 1, d)` pair per layer."""
    selected = []
    for layer_parts in zip(*parts):
        keys = torch.cat([k for k, _ in layer_parts], dim=-2) if len(layer_parts) > 1 else layer_parts[0][0]
        values = torch.cat([v for _, v in layer_parts], dim=-2) if len(layer_parts) > 1 else layer_parts[0][1]
        selected.append((_entry(keys, index), _entry(values, index)))
    return selected


def select_picked(parts, chunk: torch.LongTensor):
    """From chunks that each kept one entry per row (tensors `(B, ...)`, or per-layer lists of key/value pairs of
    them), the entry of chunk `chunk[b]` for row `b`."""
    if isinstance(parts[0], list):
        return [tuple(select_picked(list(pair), chunk) for pair in zip(*layer)) for layer in zip(*parts)]
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts)[chunk.to(parts[0].device), torch.arange(chunk.shape[0], device=parts[0].device)]


def picked_states(states: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """Sibling `index[b]` of each row of `(B, k, d)` states (or logits): `(B, 1, d)`; with one sibling per row
    (`k = 1`) the tensor itself (no gather)."""
    if states.shape[1] == 1:
        return states
    return states.gather(1, index.view(-1, 1, 1).expand(-1, 1, states.shape[-1]))


def _entry(part: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """Entry `index[b]` of each row of keys or values `(B, heads, n, head_dim)`: `(B, heads, 1, head_dim)`. With one
    entry (`n = 1`) that entry itself, a view (no gather; whoever writes over it reads it first)."""
    if part.shape[-2] == 1:
        return part
    gather = index.to(part.device).view(-1, 1, 1, 1).expand(-1, part.shape[1], 1, part.shape[-1])
    return part.gather(-2, gather)


def widen(part: torch.Tensor, rows: torch.LongTensor | None, batch: int) -> torch.Tensor:
    """`part` `(len(rows), ...)` placed at `rows` of a zero tensor `(batch, ...)`; `part` itself when `rows` is
    None (all rows)."""
    if rows is None:
        return part
    full = part.new_zeros((batch,) + tuple(part.shape[1:]))
    return full.index_copy_(0, rows.to(part.device), part)
