"""Every place where mara-hf relies on transformers internals, each with the transformers code it mirrors.

Public transformers API is used everywhere else. What lives here reads or writes something transformers does not
promise to keep: private methods of `GenerationMixin`, the local variables of a running `generate` call, the
attributes of cache layers, and names that changed between releases. When a transformers release breaks one of
them, this module is the one place to look. The test suite runs on the oldest and the newest transformers that
`setup.cfg` allows (CI: 5.15.0 and the latest 5.x).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import sys
import threading
from functools import lru_cache
from typing import Any

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    StaticCache,
    StaticLayer,
)
from transformers.generation.logits_process import (
    LogitNormalization,
    LogitsProcessorList,
    SynthIDTextWatermarkLogitsProcessor,
    WatermarkLogitsProcessor,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling

# ---------------------------------------------------------------------------------------------- names that moved
CACHE_KEYS = ("cache", "past_key_values")


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword under which `model`'s forward takes the KV cache.

    Mirrors: the models' `forward(..., cache=...)` of transformers 5.2x, `past_key_values=` before; each release
    swallows the other name through `**kwargs` without using it, so the name must be right."""
    return _cache_keyword(type(model))


def cache_of(model_kwargs: dict):
    """The KV cache among `generate`'s model kwargs (under either name, see `cache_keyword`), or None."""
    return next((model_kwargs[k] for k in CACHE_KEYS if model_kwargs.get(k) is not None), None)


OUTPUT_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
"""The cache field of `GenerateDecoderOnlyOutput` (renamed with the forward keyword)."""


# ------------------------------------------------------------------------------------ generate's private steps
def prefill(model, input_ids: torch.LongTensor, generation_config, model_kwargs: dict):
    """The prompt forward of a decoding method. Mirrors `GenerationMixin._prefill`, which `_sample` calls first
    (it slices restarted inputs and prepares the model inputs exactly as generate's own loop does)."""
    return model._prefill(input_ids, generation_config, model_kwargs)


def advance_model_kwargs(model, outputs, model_kwargs: dict) -> dict:
    """Grow the attention mask (and position ids) by one token. Mirrors `_sample`'s call of
    `GenerationMixin._update_model_kwargs_for_generation` after each step (with `{}` for outputs after the prefill,
    whose cache is already in `model_kwargs`)."""
    return model._update_model_kwargs_for_generation(outputs, model_kwargs)


def pad_token(generation_config) -> torch.Tensor | None:
    """The pad id tensor `generate` prepared (`GenerationConfig._pad_token_tensor`, set by `_prepare_special_tokens`;
    `_sample` pads finished rows with it)."""
    return generation_config._pad_token_tensor


def longest_context(generation_config, input_ids: torch.LongTensor, model_kwargs: dict) -> int:
    """The most tokens the cache holds before the last step of this call. Mirrors `generate`'s `max_cache_length`
    (step 7, "Prepare the cache"): `max_length - 1`, plus the prompt's length when it came as `inputs_embeds`
    (`_prepare_generated_length` then counts `max_length` without it)."""
    longest = generation_config.max_length - 1
    embeds = model_kwargs.get("inputs_embeds")
    if embeds is not None and embeds.shape[1] != input_ids.shape[1]:
        longest += embeds.shape[1]
    return longest


def generate_would_compile(model, model_kwargs: dict, generation_config) -> bool:
    """Whether `generate` compiles the decoding forward of this call.

    Mirrors `_sample`: `if self._valid_auto_compile_criteria(model_kwargs, generation_config): model_forward =
    self.get_compiled_call(generation_config.compile_config)` (CUDA or another accelerator and a compilable cache
    such as the static one, unless `disable_compile`; `CompileConfig._compile_all_devices` compiles on any
    device)."""
    return bool(model._valid_auto_compile_criteria(model_kwargs, generation_config))


def compile_options(generation_config) -> dict:
    """`torch.compile` options of this call: `generation_config.compile_config` (a `CompileConfig`, default
    `mode="reduce-overhead"`, i.e. CUDA graphs), as `PreTrainedModel.get_compiled_call` passes them."""
    from transformers import CompileConfig

    config = generation_config.compile_config or CompileConfig()
    return config.to_dict()


def generate_locals(model, names: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """`(method name, {name: value})` of the innermost running decoding method of `model` (`_sample`,
    `_beam_search`, `_assisted_decoding`, ...), read from its frame, or None outside `generate`.

    Mirrors the frame layout of `GenerationMixin.generate` -> `self._sample(...)` (or another decoding method),
    which keeps the KV cache, padding mask and position ids in its local `model_kwargs`, the unfinished rows in
    `unfinished_sequences` and the settings in `generation_config` (`_prepare_generation_config` copies it for each
    call: the same object at every step of a call, another one in the next call). A logits processor receives none
    of them."""
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        if frame.f_code.co_name.startswith("_") and local.get("self") is model and isinstance(local.get("model_kwargs"), dict):
            return frame.f_code.co_name, {name: local.get(name) for name in names}
        frame = frame.f_back
    return None


def decode_context(model):
    """The context `generate` decodes in after the prompt's forward (a null context where there is none).

    Mirrors `GenerationMixin._sample` of 5.15-5.24, whose decode loop runs inside `self._optimize_model_for_decode()`:
    off the CPU, mixture-of-experts layers switch from `grouped_mm` to `batched_mm` for the steps' small inputs."""
    optimize = getattr(model, "_optimize_model_for_decode", None)
    return optimize() if optimize is not None else contextlib.nullcontext()


def calling_generate_locals(model, names: tuple[str, ...]) -> dict[str, Any]:
    """Arguments of the `GenerationMixin.generate` call that runs a callable `custom_generate` (empty when none).

    Mirrors `GenerationMixin.generate` of 5.x: for a callable `custom_generate` it passes on only the callable's
    own extra arguments (`_extract_generation_mode_kwargs`), so `streamer` (to which it already streamed the
    prompt) and `assistant_model` never reach it. The nearest frame of `GenerationMixin.generate` running for
    `model` holds them (wrappers such as `MaraGenerationMixin.generate` or a PEFT model's sit above it)."""
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        if frame.f_code.co_name == "generate" and local.get("self") is model and "custom_generate" in local:
            return {name: local.get(name) for name in names}
        frame = frame.f_back
    return {}


def stop_strings_as_criteria(kwargs: dict) -> dict:
    """`generate` keyword arguments in which the keyword `stop_strings` (with `tokenizer`) became a
    `StopStringCriteria` in `stopping_criteria`. Kept for the `custom_generate/generate.py` files written by earlier
    mara-hf releases; `tokenizer_settings_first` also reads generation configs and heals tokens."""
    if kwargs.get("stop_strings") is None or kwargs.get("tokenizer") is None:
        return kwargs
    kwargs = dict(kwargs)
    _add_stop_criterion(kwargs, kwargs["tokenizer"], kwargs.pop("stop_strings"))
    return kwargs


def _add_stop_criterion(kwargs: dict, tokenizer, stop_strings) -> None:
    """Append to `kwargs["stopping_criteria"]` the `StopStringCriteria` that `_get_stopping_criteria` adds."""
    criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), criteria])


def tokenizer_settings_first(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`generate` arguments `(args, kwargs)` in which what needs `tokenizer` was done already, for a call of
    `model.generate` that runs a callable `custom_generate`: `stop_strings` became a `StopStringCriteria` in
    `stopping_criteria`, and with `token_healing` the prompt was healed. Each setting is read as `generate` reads it
    (the keyword, else the generation config passed, by keyword or second positionally, else the model's) and then
    switched off: by keyword where it was one or no config was passed, else in a copy of the caller's config
    (a keyword beside a config makes `generate` warn of a deprecated mix; the caller's config is not changed).

    Mirrors `GenerationMixin.generate` of 5.x: `_extract_generation_mode_kwargs` pops `tokenizer` and, for a
    callable `custom_generate`, keeps only the callable's own arguments. So `_get_stopping_criteria` refuses
    `stop_strings` ("could not locate a tokenizer") and `heal_tokens` refuses to heal ("you must pass the model's
    tokenizer") although one was passed. What is done here is what they would have done: the criterion
    `_get_stopping_criteria` adds, and `heal_tokens(input_ids, tokenizer)` on the prompt (`num_return_sequences`
    only copies the healed rows)."""
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    given = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)

    def setting(name):
        return kwargs[name] if name in kwargs else getattr(given or model.generation_config, name, None)

    def switch_off(name, value):
        nonlocal given
        if name in kwargs or given is None:
            kwargs[name] = value
            return
        given = copy.deepcopy(given)
        setattr(given, name, value)
        if kwargs.get("generation_config") is not None:
            kwargs["generation_config"] = given
        else:
            args[1] = given

    stop_strings = setting("stop_strings")
    if stop_strings is not None:
        _add_stop_criterion(kwargs, tokenizer, stop_strings)
        switch_off("stop_strings", None)
    key = 0 if args else next((k for k in ("input_ids", "inputs") if kwargs.get(k) is not None), None)
    if setting("token_healing") and key is not None:  # without prompt ids `generate` says what it says
        prompt = args if key == 0 else kwargs
        prompt[key] = model.heal_tokens(prompt[key], tokenizer)
        switch_off("token_healing", False)
    return tuple(args), kwargs


# ------------------------------------------------------------------------------------- generate's processor list
AFTER_CALLER_PROCESSORS = (WatermarkLogitsProcessor, SynthIDTextWatermarkLogitsProcessor, LogitNormalization)


def split_at_caller_processors(logits_processor, caller=None) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """`generate`'s processor list cut where `MaraLogitsProcessor` sits as the caller's last processor: `(before,
    after)`, `after` being what `generate` applies to the processor's output. `caller`: the `logits_processor` the
    caller passed to `generate` (`calling_generate_locals`); none of its items is put after MARA, whatever its name.

    Mirrors `GenerationMixin._get_logits_processor` of 5.x: after merging the caller's `logits_processor` into its
    own processors (`_merge_criteria_processor_list`: the caller's items keep their identity, and come before what
    follows) it appends, in this order, the sampling warpers (`...LogitsWarper`, with `do_sample`), the watermark
    processor (`watermarking_config`, "after all logits processing is finished") and `LogitNormalization`
    (`renormalize_logits`)."""
    items = list(logits_processor or [])
    callers = {id(item) for item in caller or []}
    cut = len(items)
    while cut > 0 and id(items[cut - 1]) not in callers and (
            type(items[cut - 1]).__name__.endswith("Warper") or isinstance(items[cut - 1], AFTER_CALLER_PROCESSORS)):
        cut -= 1
    return LogitsProcessorList(items[:cut]), LogitsProcessorList(items[cut:])


# ------------------------------------------------------------------------------------------------ cache layers
DYNAMIC_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
STATIC_LAYERS = (StaticLayer,)


def cache_kind(cache) -> str | None:
    """"dynamic" or "static" when MARA can put siblings into `cache` and take them out again, else None.

    Dynamic: `DynamicCache` with `DynamicLayer` / `DynamicSlidingWindowLayer` layers, not offloaded. Static: a
    `StaticCache` of full-attention `StaticLayer`s only (a `StaticSlidingWindowLayer` writes a ring buffer whose
    scratch slots would overwrite the window), not offloaded."""
    if getattr(cache, "offloading", False):
        return None
    if isinstance(cache, DynamicCache) and all(type(layer) in DYNAMIC_LAYERS for layer in cache.layers):
        return "dynamic"
    if isinstance(cache, StaticCache) and all(type(layer) in STATIC_LAYERS for layer in cache.layers):
        return "static"
    return None


def has_recurrent_layers(cache) -> bool:
    """Whether some layer of `cache` keeps a recurrent state (linear attention, state-space layers): transformers'
    `LinearAttentionCacheLayerMixin`, alone or combined with attention keys/values."""
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in getattr(cache, "layers", []))


def has_sliding_layers(cache) -> bool:
    return True in layer_kinds(cache)


def layer_kinds(cache) -> set[bool]:
    """Which kinds of attention layers the cache holds: `True` for sliding-window ones (`CacheLayerMixin.is_sliding`),
    `False` for full attention."""
    return {layer.is_sliding for layer in cache.layers}


def cache_rows(cache) -> tuple[int, torch.device]:
    """`(batch rows, device)` of a cache's first layer (its `keys` tensor)."""
    keys = cache.layers[0].keys
    return keys.shape[0], keys.device


def sliding_window(cache) -> int | None:
    """The window of the cache's sliding layers (`DynamicSlidingWindowLayer.sliding_window`), or None."""
    return next((layer.sliding_window for layer in cache.layers if layer.is_sliding), None)


class DynamicSnapshot:
    """A dynamic cache as it is now, to put back exactly after siblings were appended.

    Mirrors `DynamicLayer.update` / `DynamicSlidingWindowLayer.update`: both `torch.cat` into new tensors (the
    sliding layer also keeps `cumulative_length` and `_sliding_window_tensor`), so keeping each layer's attribute
    dict restores it without copying a tensor."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.layers = list(cache.layers)
        self.saved = [dict(layer.__dict__) for layer in self.layers]

    def restore(self) -> None:
        self.cache.layers[:] = self.layers
        for layer, saved in zip(self.layers, self.saved):
            layer.__dict__.clear()
            layer.__dict__.update(saved)

    def last_entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, views of the last entry `(B, heads, 1, head_dim)` of the keys/values as they were when the
        snapshot was taken, read from the kept attribute dicts (`DynamicLayer.keys` / `.values`: whole records of a
        full-attention layer)."""
        return [(saved["keys"][..., -1:, :], saved["values"][..., -1:, :]) for saved in self.saved]

    def keep_appended(self) -> None:
        """Make sliding layers keep every entry appended from now on (until `restore`), so that more siblings than
        the window holds can still be read back. Mirrors `DynamicSlidingWindowLayer.update`, which keeps the full
        concatenation only while `record_past` is set (as `_assisted_decoding` sets it)."""
        for layer in self.layers:
            if layer.is_sliding:
                layer.record_past = True


def appended_kv(cache: Cache, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys/values `(B, heads, count, head_dim)` of the last `count` entries of a dynamic cache."""
    return [(layer.keys[..., -count:, :], layer.values[..., -count:, :]) for layer in cache.layers]


def append_kv(cache: Cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Append entries to every layer through the layers' own `update` (sliding windows keep their bookkeeping)."""
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.update(keys, values)


def overwrite_last_kv(cache: Cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write one entry per row and layer (`(B, heads, 1, head_dim)` each) over the last entry of every layer, in
    place. Mirrors `DynamicLayer.update`: its `keys` / `values` are the whole record of a full-attention layer (its
    length is their shape), so this is an append that replaced the last entry, without copying the cache. Not for
    sliding layers (`DynamicSlidingWindowLayer` also keeps `cumulative_length` and may have dropped entries)."""
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.keys[..., -1:, :].copy_(keys)
        layer.values[..., -1:, :].copy_(values)


def narrow_dynamic_cache(cache: Cache, rows: torch.LongTensor) -> Cache:
    """A throwaway dynamic cache holding only `rows` of `cache` (copies of their keys/values; `cache` is not
    touched). Layer settings (sliding window, `record_past`) are kept: shallow copies of the layer objects."""
    narrow = copy.copy(cache)
    narrow.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in narrow.layers:
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return narrow


def static_length(cache: Cache) -> torch.Tensor:
    """The filled length of a static cache as a 0-d tensor on the cache's device (`StaticLayer.cumulative_length`,
    kept as a tensor by transformers so that compiled graphs do not specialise on it)."""
    return cache.layers[0].cumulative_length


def set_static_length(cache: Cache, length: torch.Tensor | int) -> None:
    """Set every layer's filled length in place. Mirrors `StaticLayer.update` (writes at `cumulative_length`
    onwards, then adds the written count) and `StaticLayer.crop` (in-place `sub_`, keeping the static address)."""
    for layer in cache.layers:
        if isinstance(length, torch.Tensor):
            layer.cumulative_length.copy_(length)
        else:
            layer.cumulative_length.fill_(length)


def commit_static_slot(cache: Cache, length: torch.Tensor | int, index: torch.LongTensor) -> None:
    """Move each row's entry at slot `length + index[b]` to slot `length` in every layer and set the length to
    `length + 1` (in place: static addresses stay, as `StaticLayer.update` keeps them)."""
    taken = (length + index).view(-1, 1, 1, 1)  # each row's slot to move, the same for every layer
    slot = torch.as_tensor(length, device=taken.device).view(1)
    for layer in cache.layers:
        for entries in (layer.keys, layer.values):  # their head sizes may differ (multi-head latent attention)
            at = taken.to(entries.device).expand(-1, entries.shape[1], 1, entries.shape[-1])
            entries.index_copy_(2, slot.to(entries.device), entries.gather(2, at))
    set_static_length(cache, length + 1)


def static_capacity(cache: Cache) -> int:
    """Slots per layer of a static cache (`StaticLayer.max_cache_len`)."""
    return min(layer.max_cache_len for layer in cache.layers)


def new_static_cache(model, max_cache_len: int) -> Cache:
    """A fresh `StaticCache` for `model` with `max_cache_len` slots, as `GenerationMixin._prepare_static_cache`
    builds one (from the decoder's text config)."""
    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)


# ------------------------------------------------------------------------------------------- devices (accelerate)
def execution_device(module) -> torch.device:
    """The device `module` computes on: the `execution_device` of the accelerate hook that `from_pretrained(...,
    device_map=...)` / `dispatch_model` attached (its weights may sit on another GPU, the CPU or `meta` when
    offloaded), else the device of its first parameter.

    Mirrors accelerate's `AlignDevicesHook` (kept in the module's `_hf_hook`, alone or inside a `SequentialHook`),
    which moves a module's inputs and offloaded weights to `execution_device` before each forward, as transformers'
    `BarkModel.device` reads it."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


def input_device(model) -> torch.device:
    """Where the inputs of `model` go: its input embedding's execution device (the first GPU of a split model)."""
    return execution_device(model.get_input_embeddings())


# ------------------------------------------------------------------------------------------------- attention
def attention_implementation(model) -> str | None:
    """`config._attn_implementation`: the attention function the model's layers call (set by `from_pretrained` /
    `set_attn_implementation`)."""
    return getattr(model.config, "_attn_implementation", None)


_PACKING_SIBLINGS = contextvars.ContextVar("mara_hf_packing_siblings", default=False)
_PACKED_SDPA_LOCK = threading.Lock()
_packed_sdpa_users = 0
_replaced_sdpa: tuple[Any, bool] | None = None  # (the "sdpa" function replaced, whether it was a local override)


@contextlib.contextmanager
def packed_sibling_attention():
    """Within this context (this thread or task only), transformers' sdpa attention runs a chunk of sibling queries
    on the key/value heads themselves instead of copying them once per query head (`repeat_kv`).

    Mirrors `sdpa_attention_forward` (transformers/integrations/sdpa_attention.py): with grouped-query attention
    and a mask it calls `repeat_kv` on the keys and values, a copy of every layer's whole cache times the group
    size (`use_gqa_in_sdpa` keeps SDPA's own `enable_gqa` for calls without a mask), except for a single query token,
    whose query heads its `pack_gqa` (transformers 5.2x) lays out as the queries of their key/value head. A chunk of
    sibling tokens shares one mask pattern across heads, so the same packing holds for it: query `(B, heads, k, d)`
    becomes `(B, kv_heads, group * k, d)` and the mask's rows are tiled `group` times. The keys and values are read
    where they are; in a long context that copy was most of a chunk's time (4 siblings at batch 16 on a
    1,024-token cache, SmolLM2 on the CPU: 1.31 s with it, 0.52 s without; `benchmarks/cpu/16-packed-siblings/`).

    The function is swapped in `ALL_ATTENTION_FUNCTIONS` (the `AttentionInterface` every model looks "sdpa" up in,
    `GeneralInterface.__setitem__` / `__delitem__`: a local entry over the global one) while any thread is inside
    this context, and put back as it was when the last one leaves; outside the context, and for every call it does
    not pack, the replacement calls the function it replaced with the arguments it was given."""
    global _packed_sdpa_users, _replaced_sdpa
    with _PACKED_SDPA_LOCK:
        if _packed_sdpa_users == 0:
            _replaced_sdpa = (ALL_ATTENTION_FUNCTIONS["sdpa"], "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping)
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _sdpa_packing_siblings
        _packed_sdpa_users += 1
    token = _PACKING_SIBLINGS.set(True)
    try:
        yield
    finally:
        _PACKING_SIBLINGS.reset(token)
        with _PACKED_SDPA_LOCK:
            _packed_sdpa_users -= 1
            if _packed_sdpa_users == 0:
                replaced, local = _replaced_sdpa
                if local:
                    ALL_ATTENTION_FUNCTIONS["sdpa"] = replaced
                else:
                    del ALL_ATTENTION_FUNCTIONS["sdpa"]
                _replaced_sdpa = None


def _sdpa_packing_siblings(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' sdpa attention (the function `packed_sibling_attention` replaced), with a chunk of sibling
    queries packed onto the key/value heads inside that context."""
    replaced = _replaced_sdpa[0] if _replaced_sdpa is not None else sdpa_attention_forward
    group = getattr(module, "num_key_value_groups", 1)
    batch, heads, count, _ = query.shape
    if (
        is_torchdynamo_compiling()  # as transformers packs one query token only outside compilation
        or not _PACKING_SIBLINGS.get()
        or group <= 1
        or count <= 1
        or key.shape[1] * group != heads
        or not isinstance(attention_mask, torch.Tensor)
        or attention_mask.ndim != 4
        or attention_mask.shape[1] != 1  # one mask for all heads
        or attention_mask.shape[2] != count  # a row per query (not one broadcast over them)
        or dropout
        or any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks"))
    ):
        return replaced(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // group, group * count, query.shape[-1])
    mask = attention_mask[:, :, :, : key.shape[-2]].repeat(1, 1, group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    # As `sdpa_attention_forward` returns it: (B, count, heads, value dim).
    return out.reshape(batch, heads, count, value.shape[-1]).transpose(1, 2).contiguous(), None
