"""Faithful MARA states for many candidates in one forward: the sibling forward.

At a decoding step the model's KV cache holds the context (``L`` entries per row). MARA's state for candidate
``t`` is the final-norm hidden state at ``t``'s own position, i.e. the vector ``lm_head`` receives when ``t`` is
appended to the context. All ``k`` candidates of a row go into ONE forward as *siblings*: input ids ``(B, k)``,
every sibling at the row's next position, and an attention mask (built by transformers' own mask utilities, so
every attention implementation, padding and sliding windows are handled) in which each sibling sees the context
and itself only. A pre-hook on ``lm_head`` reads the ``(B, k, d)`` states.

The forward appends the ``k`` siblings to the cache. :class:`CacheCheckpoint` puts the cache back exactly as it
was (the dynamic cache layers concatenate into new tensors, so the old ones are intact and nothing is copied), or
commits one chosen sibling per row.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

RESTORABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword under which `model`'s forward takes the KV cache: `cache` in recent transformers, whose models
    still swallow the older `past_key_values` (and vice versa) without using it."""
    return _cache_keyword(type(model))


CACHE_KEYS = ("cache", "past_key_values")


def cache_of(model_kwargs: dict):
    """The KV cache among `generate`'s model kwargs (under either name, see `cache_keyword`), or None."""
    return next((model_kwargs[k] for k in CACHE_KEYS if model_kwargs.get(k) is not None), None)


def check_model(model) -> None:
    """Refuse models whose attention cannot take a sibling mask, with the fix in the message."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None and attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"MARA needs an attention implementation that accepts custom masks ({', '.join(SUPPORTED_ATTENTION)}), "
            f"but the model uses '{attn}'. Load it with `attn_implementation=\"sdpa\"` or call "
            "`model.set_attn_implementation(\"sdpa\")`."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): MARA needs a causal LM.")


def check_cache(cache) -> None:
    """Refuse caches whose state cannot be put back exactly after a sibling forward."""
    if cache is None:
        raise ValueError(
            "MARA decodes on top of the KV cache, but generation runs without one: do not pass `use_cache=False`."
        )
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        kind = type(cache).__name__ + (" with offloading" if getattr(cache, "offloading", False) else "")
        raise ValueError(
            f"MARA cannot restore a {kind} after its sibling forward. Use the default dynamic cache: do not set "
            "`cache_implementation` (static, offloaded, quantized) and do not pass such a cache object."
        )
    for layer in cache.layers:
        if type(layer) not in RESTORABLE_LAYERS:
            raise ValueError(
                f"MARA cannot restore cache layers of type {type(layer).__name__}; supported: "
                f"{', '.join(t.__name__ for t in RESTORABLE_LAYERS)} (the default dynamic cache of attention models)."
            )


class CacheCheckpoint:
    """The cache as it is now; put it back exactly, or commit one appended sibling per row.

    No tensor is copied: dynamic cache layers `torch.cat` into new tensors on every update, so keeping references
    to the current ones is enough to restore them.
    """

    def __init__(self, cache: Cache):
        self.cache = cache
        self.layers = list(cache.layers)
        self.saved = [dict(layer.__dict__) for layer in self.layers]

    def restore(self) -> None:
        """Put the cache back as it was when the checkpoint was taken."""
        self.cache.layers[:] = self.layers
        for layer, saved in zip(self.layers, self.saved):
            layer.__dict__.clear()
            layer.__dict__.update(saved)

    def keep_appended(self) -> None:
        """Make sliding-window layers keep every entry appended from now on (until `restore`), so that more
        siblings than the window holds can still be read with `appended`."""
        for layer in self.layers:
            if layer.is_sliding:
                layer.record_past = True

    def appended(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys/values `(B, heads, count, head_dim)` of the last `count` appended entries."""
        return appended_kv(self.cache, count)

    def commit(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Restore, then append one entry per row and layer (`(B, heads, 1, head_dim)` each) through the layers'
        own `update`, so sliding windows keep their bookkeeping."""
        self.restore()
        for layer, (keys, values) in zip(self.layers, kv):
            layer.update(keys, values)


def appended_kv(cache: Cache, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys/values `(B, heads, count, head_dim)` of the last `count` entries of `cache`."""
    return [(layer.keys[..., -count:, :], layer.values[..., -count:, :]) for layer in cache.layers]


def narrow_cache(cache: Cache, rows: torch.LongTensor) -> Cache:
    """A throwaway cache holding only `rows` of `cache` (copies of their keys/values; `cache` is not touched), for
    a sibling forward that only some rows need. Layer settings (sliding window, `record_past`) are kept."""
    narrow = copy.copy(cache)
    narrow.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in narrow.layers:
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return narrow


def widen(part: torch.Tensor, rows: torch.LongTensor | None, batch: int) -> torch.Tensor:
    """`part` `(len(rows), ...)` placed at `rows` of a zero tensor `(batch, ...)`; `part` itself when `rows` is
    None (all rows)."""
    if rows is None:
        return part
    full = part.new_zeros((batch,) + tuple(part.shape[1:]))
    return full.index_copy_(0, rows.to(part.device), part)


def select_kv(parts: list[list[tuple[torch.Tensor, torch.Tensor]]], index: torch.LongTensor):
    """From chunks of appended entries (each a per-layer list of `(B, h, n_i, d)` pairs), pick entry `index[b]` of
    row `b` along the concatenated chunks: one `(B, h, 1, d)` pair per layer."""
    selected = []
    for layer_parts in zip(*parts):
        keys = torch.cat([k for k, _ in layer_parts], dim=-2) if len(layer_parts) > 1 else layer_parts[0][0]
        values = torch.cat([v for _, v in layer_parts], dim=-2) if len(layer_parts) > 1 else layer_parts[0][1]
        gather = index.to(keys.device).view(-1, 1, 1, 1).expand(-1, keys.shape[1], 1, keys.shape[-1])
        selected.append((keys.gather(-2, gather), values.gather(-2, gather)))
    return selected


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


@dataclass
class SiblingOutput:
    """States `(B, k, d)` (lm_head's input) and, when asked for, logits `(B, k, vocab)` of the siblings."""

    states: torch.Tensor
    logits: torch.Tensor | None


def sibling_attention_mask(model, cache: Cache, tokens: torch.Tensor, context_mask: torch.Tensor | None):
    """The attention mask(s) letting each of the `k` siblings see the context and itself only.

    `context_mask` is the 2D padding mask `(B, >= L)` of the context (None: no padding). Returns what the model's
    forward takes as `attention_mask`: a single mask, or a dict per layer type for hybrid sliding/full models.
    """
    batch, k = tokens.shape
    past = cache.get_seq_length()
    device = tokens.device
    if context_mask is None:
        mask_2d = torch.ones(batch, past + k, dtype=torch.long, device=device)
    else:
        mask_2d = torch.cat([context_mask[:, :past].to(device), context_mask.new_ones(batch, k).to(device)], dim=-1)
    # Only shape, dtype and device of `inputs_embeds` are read by the mask utilities.
    embeds = torch.empty((batch, k, 0), dtype=model.dtype, device=device)

    def sees_context_or_itself(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx < past) | (kv_idx == q_idx)

    masks = {}
    # The cache goes by position: transformers renamed that argument (`past_key_values` -> `cache`) in 5.2x.
    args = (model.config, embeds, mask_2d, cache)
    common = dict(and_mask_function=sees_context_or_itself)
    sliding = {layer.is_sliding for layer in cache.layers}
    if False in sliding:
        masks["full_attention"] = create_causal_mask(*args, **common)
    if True in sliding:
        window = next(layer.sliding_window for layer in cache.layers if layer.is_sliding)

        # Every sibling sits at position `past`: it sees the context inside the window of `past` (the causal window
        # of later sibling slots would otherwise shrink it), then itself.
        def context_in_window(batch_idx, head_idx, q_idx, kv_idx):
            return (kv_idx < past) & (kv_idx > past - window)

        masks["sliding_attention"] = create_sliding_window_causal_mask(*args, **common, or_mask_function=context_in_window)
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks


def sibling_forward(
    model,
    cache: Cache,
    tokens: torch.LongTensor,
    position_ids: torch.LongTensor,
    context_mask: torch.Tensor | None,
    *,
    return_logits: bool = False,
    pick=None,
) -> SiblingOutput:
    """Run the candidates `tokens` `(B, k)` as siblings on top of `cache`; the cache grows by `k` entries.

    Args:
        model: the causal LM (a transformers `PreTrainedModel`, not a PEFT wrapper).
        cache: its dynamic KV cache holding the context.
        tokens: candidate ids, `k` per row.
        position_ids: `(B, 1)` position of the next token of each row.
        context_mask: 2D padding mask of the context `(B, >= L)`, or None when no row is padded.
        return_logits: also return the siblings' logits (the fused loop needs them, the processor does not).
        pick: optional `states (B, k, d) -> index (B,)`, called on lm_head's input before it projects: lm_head
            then projects only the picked sibling of each row, and `logits` is `(B, 1, vocab)`. The fused loop
            picks the candidate it may keep, so rejected siblings cost no vocabulary projection.
    """
    batch, k = tokens.shape
    if k == 1:
        # A single candidate per row is an ordinary decode step: the model's own causal mask is exact.
        attention_mask = None
        if context_mask is not None:
            past = cache.get_seq_length()
            attention_mask = torch.cat([context_mask[:, :past], context_mask.new_ones(batch, 1)], dim=-1)
    else:
        attention_mask = sibling_attention_mask(model, cache, tokens, context_mask)

    captured = {}

    def capture_states(module, args):
        states = captured["states"] = args[0]
        if pick is not None:
            index = pick(states).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
            return (states.gather(1, index),) + tuple(args[1:])
        if not return_logits:
            # Logits are not needed: let lm_head project one position only.
            return (states[:, :1],) + tuple(args[1:])
        return None

    handle = model.get_output_embeddings().register_forward_pre_hook(capture_states)
    try:
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
    return SiblingOutput(states=states, logits=out.logits if return_logits or pick is not None else None)
