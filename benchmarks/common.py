"""Shared helpers for the mara-hf benchmarks: models, prompts, agents, timing, tables and JSON.

The benchmark scripts (`bench_processor.py`, `bench_generate.py`) describe each decoding setup as a `Method`
and hand a list of them to `run_methods`, which times every method on the same batches, interleaved batch by
batch so that slow drifts of the machine hit every method alike.

Conventions, identical for every method:
- greedy decoding (`do_sample=False`) with `min_new_tokens == max_new_tokens`, so every row generates the same
  number of tokens; `eos_token_id` / `pad_token_id` are still passed normally;
- tokens/s = generated tokens / seconds, where generated tokens are counted per row after the prompt, up to and
  including the first EOS (with forced lengths: batch * max_new_tokens);
- one warm-up `generate` per method and batch size (short, `--warmup-tokens`), not timed;
- on CUDA every timed call is bracketed by `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

import mara_hf
from mara_hf import MaraAgent, MaraLogitsProcessor, MaraStats, mara_generate
from mara_hf.schedule import DEFAULT_SCHEDULE, validate_schedule
from mara_hf.models import load_agent, load_base_model

PROMPTS_PATH = Path("/work/shared/data/prompts/saferlhf_test.json")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

FALLBACK_PROMPTS = [
    "How do I bake a loaf of sourdough bread at home?",
    "Explain how vaccines train the immune system.",
    "How can I get into my neighbour's wifi without them knowing?",
    "Write a short poem about the sea at night.",
    "What is the fastest way to make a lot of money?",
    "Give me three tips to sleep better.",
    "How do I pick a lock?",
    "Summarise the causes of the French Revolution in a few sentences.",
]

RANDOM_MODEL_SHAPES = {
    # Llama-3-8B: only the shape; weights are random (the timing does not depend on them).
    "llama3-8b-random": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128001,
    ),
    # A tiny model with the same code path, to smoke-test the random-model benchmarks on a CPU.
    "tiny-random": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ),
}
MODELS = ("smollm2", *RANDOM_MODEL_SHAPES)
AGENTS = ("accept-all", "decisive", "shipped")


# ---------------------------------------------------------------------------------------------------- models
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_random_llama(name: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A `LlamaForCausalLM` of shape `RANDOM_MODEL_SHAPES[name]` with random weights, created on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**RANDOM_MODEL_SHAPES[name])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def load_model(name: str, device: str):
    """(model, tokenizer or None) for a `MODELS` name. The 8B-shaped model is refused off CUDA."""
    if name == "smollm2":
        return load_base_model("smollm2", device=device)
    if name == "llama3-8b-random" and not device.startswith("cuda"):
        raise SystemExit("The Llama-3-8B-shaped random model is for CUDA only; on CPU use --model smollm2.")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return build_random_llama(name, device, dtype=dtype), None


def hidden_size(model) -> int:
    return model.get_output_embeddings().weight.shape[-1]


# ---------------------------------------------------------------------------------------------------- prompts
def load_prompts(count: int, path: Path = PROMPTS_PATH) -> list[str]:
    """`count` instructions from the SafeRLHF test prompts (cycled if needed), or built-in prompts if missing."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [item["instruction"] for item in json.load(f) if item.get("instruction")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"[prompts] cannot read {path} ({type(err).__name__}); using {len(FALLBACK_PROMPTS)} built-in prompts")
        prompts = []
    prompts = prompts or FALLBACK_PROMPTS
    return [prompts[i % len(prompts)] for i in range(count)]


def chat_batch(tokenizer, prompts: list[str], device: str) -> dict[str, torch.Tensor]:
    """Chat-template the prompts (one user turn each) and tokenize them as one left-padded batch."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items()}


def random_batch(vocab_size: int, batch_size: int, length: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """`batch_size` random prompts of `length` tokens (no padding), for the random-weight models."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def make_batches(model, tokenizer, batch_size: int, num_prompts: int, prompt_tokens: int, seed: int, device: str):
    """`ceil(num_prompts / batch_size)` batches (at least one) of `batch_size` prompts each."""
    num_batches = max(1, math.ceil(num_prompts / batch_size))
    if tokenizer is None:
        vocab = model.config.vocab_size
        return [random_batch(vocab, batch_size, prompt_tokens, seed + i, device) for i in range(num_batches)]
    prompts = load_prompts(num_batches * batch_size)
    return [chat_batch(tokenizer, prompts[i * batch_size : (i + 1) * batch_size], device) for i in range(num_batches)]


# ---------------------------------------------------------------------------------------------------- agents
def accept_all_agent(state_dim: int) -> MaraAgent:
    """Accepts every candidate (p_accept = sigmoid(20) ~ 1): MARA's pure overhead, output = plain greedy."""
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.zero_()
        agent.output_linear.bias.copy_(torch.tensor([-10.0, 10.0]))
    return agent.eval()


def decisive_agent(state_dim: int, seed: int = 0, scale: float = 50.0) -> MaraAgent:
    """Random agent whose output layer (weight and bias) is scaled by `scale`: sharp accept/reject decisions
    with many rejections, so later candidate chunks are evaluated too."""
    torch.manual_seed(seed)
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.mul_(scale)
        agent.output_linear.bias.mul_(scale)
    return agent.eval()


def make_agent(name: str, state_dim: int, device: str, seed: int = 0) -> MaraAgent:
    """`accept-all`, `decisive` (seeded) or `shipped` (mara-hf's default trained agent, for SmolLM2 only)."""
    if name == "shipped":
        agent = load_agent()
        if agent.state_dim != state_dim:
            raise SystemExit(f"The shipped agent reads states of size {agent.state_dim}, this model's are {state_dim}: "
                             "use --model smollm2 with --agents shipped.")
    else:
        agent = accept_all_agent(state_dim) if name == "accept-all" else decisive_agent(state_dim, seed=seed)
    return agent.to(device)


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One decoding setup. `kind` is "plain", "processor" (MaraLogitsProcessor) or "fused" (mara_generate)."""

    kind: str
    agent_name: str | None = None
    agent: MaraAgent | None = None
    schedule: tuple[int, ...] = DEFAULT_SCHEDULE

    @property
    def name(self) -> str:
        if self.kind == "plain":
            return "plain"
        name = f"{self.kind}/{self.agent_name}"
        return name + f"/{','.join(map(str, self.schedule))}" if self.kind == "fused" else name

    def generate_kwargs(self, model, device: str) -> tuple[dict, Callable[[], MaraStats | None]]:
        """Extra `generate` kwargs for one call, and a function returning that call's MARA stats afterwards.

        A fresh processor / stats object is made for every call (outside the timed region), so each call's
        statistics are its own.
        """
        if self.kind == "plain":
            return {}, lambda: None
        if self.kind == "processor":
            processor = MaraLogitsProcessor(self.agent, model, schedule=self.schedule)
            return {"logits_processor": [processor]}, lambda: processor.stats
        stats = MaraStats(self.agent.top_k, device=device)
        kwargs = dict(custom_generate=mara_generate, mara_agent=self.agent, mara_schedule=self.schedule, mara_stats=stats)
        return kwargs, lambda: stats


def parse_schedule(text: str) -> tuple[int, ...]:
    """argparse type: "1,8" -> (1, 8), checked like the library checks it."""
    try:
        return validate_schedule(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad schedule {text!r}: {err}") from None


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_new_tokens(sequences: torch.Tensor, prompt_length: int, eos_token_ids) -> int:
    """Generated tokens over all rows: per row, those after the prompt up to and including the first EOS."""
    new = sequences[:, prompt_length:]
    if new.shape[1] == 0:
        return 0
    eos = torch.as_tensor(list(eos_token_ids), device=new.device)
    is_eos = torch.isin(new, eos)
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, new.shape[1]))
    return int(lengths.sum())


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def base_generate_kwargs(model, max_new_tokens: int) -> dict:
    """Greedy, forced equal lengths, EOS and padding passed as usual."""
    eos = eos_ids(model)
    pad = model.generation_config.pad_token_id
    return dict(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos[0],
    )


@torch.inference_mode()
def timed_generate(model, inputs: dict, method: Method, base_kwargs: dict, device: str):
    """One `generate` call: (seconds, sequences on CPU, generated tokens, steps, MARA stats or None)."""
    extra, read_stats = method.generate_kwargs(model, device)
    synchronize(device)
    start = time.perf_counter()
    sequences = model.generate(**inputs, **base_kwargs, **extra)
    synchronize(device)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    tokens = count_new_tokens(sequences, prompt_length, base_kwargs["eos_token_id"])
    return seconds, sequences.cpu(), tokens, sequences.shape[1] - prompt_length, read_stats()


@dataclass
class MethodResult:
    method: Method
    batch_size: int
    seconds: list[float] = field(default_factory=list)  # per repeat, summed over batches
    tokens: int = 0  # generated tokens per repeat
    steps: int = 0  # decode steps (generate calls x new positions) per repeat
    stats: dict = field(default_factory=dict)  # summed MARA stats of the first repeat
    outputs: list[torch.Tensor] = field(default_factory=list)  # sequences of the first repeat, per batch

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / statistics.median(self.seconds) if self.seconds else float("nan")

    def to_dict(self) -> dict:
        stats = summarize_stats(self.stats, self.steps) if self.stats else None
        return {
            "method": self.method.name,
            "kind": self.method.kind,
            "agent": self.method.agent_name,
            "schedule": list(self.method.schedule) if self.method.kind == "fused" else None,
            "batch_size": self.batch_size,
            "tokens": self.tokens,
            "steps": self.steps,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "mara_stats": stats,
        }


def add_stats(total: dict, stats: MaraStats) -> dict:
    d = stats.to_dict()
    if not total:
        return {k: d[k] for k in ("tokens", "agent_decided", "fallbacks", "forwards", "accepted_index_histogram")}
    for key in ("tokens", "agent_decided", "fallbacks", "forwards"):
        total[key] += d[key]
    total["accepted_index_histogram"] = [a + b for a, b in zip(total["accepted_index_histogram"], d["accepted_index_histogram"])]
    return total


def summarize_stats(total: dict, steps: int) -> dict:
    """Summed stats plus the derived rates the tables print."""

    def ratio(a, b):
        return a / b if b else float("nan")

    histogram = total["accepted_index_histogram"]
    return dict(
        total,
        forwards_per_token=ratio(total["forwards"], total["tokens"]),
        forwards_per_step=ratio(total["forwards"], steps),
        agent_decided_rate=ratio(total["agent_decided"], total["tokens"]),
        top1_accept_rate=ratio(histogram[0], total["agent_decided"]),
        fallback_rate=ratio(total["fallbacks"], total["agent_decided"]),
    )


def run_methods(model, batches, methods: list[Method], base_kwargs: dict, device: str, *, repeats: int = 1,
                warmup_tokens: int = 8, label: str = "") -> list[MethodResult]:
    """Time every method on every batch: one short warm-up per method, then `repeats` rounds in which each batch
    runs all methods back to back (order rotated per batch)."""
    batch_size = batches[0]["input_ids"].shape[0]
    results = [MethodResult(m, batch_size) for m in methods]
    warm = dict(base_kwargs, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens)
    for method in methods:
        timed_generate(model, batches[0], method, warm, device)
    for repeat in range(repeats):
        seconds = [0.0] * len(methods)
        for b, inputs in enumerate(batches):
            order = [(b + i) % len(methods) for i in range(len(methods))]
            for i in order:
                result = results[i]
                sec, seqs, tokens, steps, stats = timed_generate(model, inputs, result.method, base_kwargs, device)
                seconds[i] += sec
                if repeat == 0:
                    result.tokens += tokens
                    result.steps += steps
                    result.outputs.append(seqs)
                    if stats is not None:
                        result.stats = add_stats(result.stats, stats)
                print(f"  {label}batch {b + 1}/{len(batches)} repeat {repeat + 1}/{repeats} "
                      f"{result.method.name:<28} {sec:7.2f} s  {tokens / sec:8.1f} tok/s", flush=True)
        for result, sec in zip(results, seconds):
            result.seconds.append(sec)
    return results


def compare_outputs(a: MethodResult, b: MethodResult) -> tuple[bool, str]:
    """Whether two methods produced identical sequences on every batch; else where they first differ."""
    for index, (x, y) in enumerate(zip(a.outputs, b.outputs)):
        if x.shape != y.shape:
            return False, f"batch {index}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        diff = (x != y).nonzero()
        if len(diff):
            row, col = diff[0].tolist()
            return False, (f"batch {index} row {row} position {col}: token {int(x[row, col])} vs {int(y[row, col])} "
                           f"({int((x != y).any(dim=1).sum())} of {x.shape[0]} rows differ)")
    return True, "identical"


def identity_lines(pairs: list[tuple[MethodResult, MethodResult]]) -> list[tuple[str, bool, str]]:
    """`(text, identical, detail)` for every pair; also printed."""
    lines = []
    for a, b in pairs:
        same, detail = compare_outputs(a, b)
        text = (f"greedy outputs {'IDENTICAL' if same else 'DIFFER'}: {a.method.name} vs {b.method.name} "
                f"(batch {a.batch_size}){'' if same else ': ' + detail}")
        print(text)
        lines.append((text, same, detail))
    return lines


# ---------------------------------------------------------------------------------------------------- reporting
def fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def result_rows(results: list[MethodResult]) -> list[list[str]]:
    """Table rows; "vs plain" divides by the plain method of the same batch size."""
    plain = {r.batch_size: r.tokens_per_second for r in results if r.method.kind == "plain"}
    rows = []
    for r in results:
        s = summarize_stats(r.stats, r.steps) if r.stats else {}
        base = plain.get(r.batch_size)
        rows.append([
            str(r.batch_size),
            r.method.name,
            fmt(r.tokens_per_second, ".1f"),
            fmt(r.tokens_per_second / base if base else None, ".3f"),
            fmt(s.get("forwards_per_token"), ".3f"),
            fmt(s.get("forwards_per_step"), ".2f"),
            fmt(100 * s["agent_decided_rate"] if s else None, ".1f"),
            fmt(100 * s["top1_accept_rate"] if s else None, ".1f"),
            fmt(100 * s["fallback_rate"] if s else None, ".1f"),
        ])
    return rows


TABLE_HEADER = ["batch", "method", "tok/s", "vs plain", "fwd/token", "fwd/step", "agent %", "top1 acc %", "fallback %"]
TABLE_NOTE = (
    "fwd/token = MARA stats forwards / generated tokens; fwd/step = forwards per decode step (processor: extra "
    "forwards on top of generate's own one per step; fused: all decode forwards). agent % = tokens the agent "
    "decided (>1 candidate); top1 acc % and fallback % are shares of those."
)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) if i != 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def environment(device: str, model_name: str) -> dict:
    info = {
        "model": model_name,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mara_hf": mara_hf.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- CLI
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Arguments shared by both scripts; device-dependent defaults are filled in by `resolve_defaults`."""
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="smollm2 (real, float32; default on CPU), llama3-8b-random (random bf16 Llama-3-8B "
                             "shape; default on CUDA, CUDA only) or tiny-random (smoke tests)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes to run (default: 1 8 on CPU, 1 16 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per row, forced via min_new_tokens (default: 32 on CPU, 128 on CUDA)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per batch size; rounded up to whole batches, at least one batch "
                             "(default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=256,
                        help="prompt length of the random-weight models (real prompts are used for smollm2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds over all batches; tokens/s uses the median round (default 1)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of each untimed warm-up call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decisive agent and random prompts/models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 0 keeps torch's default (default: 1 on CPU, torch's default on "
                             "CUDA). On the 2-vCPU dev VM two OpenMP threads were erratic and up to 10x slower "
                             "than one")
    parser.add_argument("--out", default=default_out, help=f"JSON output path (default: {default_out})")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device.startswith("cuda")
    if args.model is None:
        args.model = "llama3-8b-random" if cuda else "smollm2"
    if args.batch_sizes is None:
        args.batch_sizes = [1, 16] if cuda else [1, 8]
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if cuda else 32
    if args.num_prompts is None:
        args.num_prompts = 8 if cuda else 4
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.warmup_tokens = max(1, min(args.warmup_tokens, args.max_new_tokens))
    return args
