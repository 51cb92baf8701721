"""Decoding speed of MARA against plain greedy `generate()`, and greedy identity, through the public API only.

Methods (each with every agent it applies to):

- `plain`: greedy `generate()` (dynamic cache), the reference of every ratio;
- `plain-static`: greedy with `cache_implementation="static"` (compiled by `generate` on CUDA; on CPU only with
  `--compile`), the reference of the static MARA ratios;
- `processor`: `logits_processor=[MaraLogitsProcessor(agent, model)]` (dynamic cache);
- `fused`: `custom_generate=mara_generate, mara_agent=agent, mara_schedule=...` (dynamic cache);
- `fused-static`: the same with `cache_implementation="static"` (compiled where `generate` compiles);
- `prompt` (speed runs, always): plain greedy with one new token, i.e. the prompt's forward and the first token.
  Every call of the other methods includes that much too; taking it off their time gives each method's cost per
  decode step (`decode_ms_per_step`) and its ratio to plain's over the decode steps alone (`decode_ratio_vs_plain`).
  With short answers the prompt's forward is a large part of every call (on the CPU at batch 16 with 32 new tokens,
  about half of plain greedy's time), which brings the ratios of whole calls closer to 1 than the decode steps are.

Agents: `accept-all` (MARA's pure overhead), `calibrated` (random, its accept bias set to reject `--reject-share`
of the top-1 candidates of plain greedy decoding on the benchmark prompts, like a trained agent), `reject-all`
(every candidate evaluated at every step: the worst case) and `shipped` (the trained SmolLM2 agent).

Speed (default): per batch size one untimed warm-up call per method (the same call as the timed ones, so compiling
happens there), then `--rounds` rounds in which every batch runs every method, the order rotated from batch to batch
and round to round; per method the median, min and max over rounds, and its ratio to `plain` (and `plain-static`)
in the same run. CUDA timings are bracketed by `torch.cuda.synchronize()`. `--identity`: float32, TF32 off, every
method once; greedy outputs compared (plain vs accept-all and reject-all, which both decode plain greedy's tokens;
processor vs fused, dynamic and static, for the other agents).

Defaults on CUDA: random bf16 Llama-3-8B shape, random 256-token prompts, batch 1 and 16, 64 new tokens, 3 rounds
(about 8 minutes on an H100, most of it compiling). On CPU: SmolLM2-135M-Instruct float32 on the SafeRLHF test
prompts of data/prompts/ (`--prompts NAME`: another file there), batch 1 and 16, 32 new tokens, 1 torch thread.
`--model tiny-random` is a smoke test.

    python benchmarks/bench_generate.py --out benchmarks/gpu/h100                  # speed, CUDA
    python benchmarks/bench_generate.py --identity --out benchmarks/gpu/h100       # identity, CUDA (fp32)
    python benchmarks/bench_generate.py --agents shipped --batch-sizes 1 16         # CPU, the trained agent
    python benchmarks/bench_generate.py --model tiny-random --out runs/smoke       # smoke test, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CompileConfig

import common
from common import logger
from mara_hf import MaraAgent, MaraLogitsProcessor, MaraStats, mara_generate
from mara_hf.data import answer_lengths
from mara_hf.schedule import validate_schedule

KINDS = ("plain", "plain-static", "processor", "fused", "fused-static")
PROMPT = "prompt"  # the method every speed run adds: plain greedy with one new token (the prompt's forward)
GREEDY_AGENTS = ("accept-all", "reject-all")  # agents whose output is plain greedy's (fallback "first")

# Rough cost of a decode step relative to plain dynamic greedy, from issue 10's H100 measurements before its
# optimisations; for the printed time estimate only. Static methods: `STATIC_STEP` of that when compiled.
STEP_COST = {
    "processor": {"accept-all": 2.1, "reject-all": 4.0, None: 2.6},
    "fused": {"accept-all": 1.15, "reject-all": 3.5, None: 2.0},
}
STATIC_STEP = 0.3
COMPILE_SECONDS = {"cuda": 60.0, "cpu": 60.0}  # guessed, per compiled method and batch size


# ---------------------------------------------------------------------------------------------------- methods
def schedule_text(schedule) -> str:
    return schedule if isinstance(schedule, str) else ",".join(map(str, schedule))


def parse_schedule(text: str):
    """argparse type: "auto" or comma-separated boundaries ("1,8" -> (1, 8), "40" -> (40,))."""
    if text == "auto":
        return "auto"
    try:
        return validate_schedule(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad schedule {text!r}: {err}") from None


@dataclass
class Method:
    """One decoding setup of the public API."""

    kind: str
    agent_name: str | None = None
    agent: MaraAgent | None = None
    schedule: object = "auto"
    compile_config: CompileConfig | None = None  # CPU --compile: generate compiles static-cache calls anyway

    @property
    def static(self) -> bool:
        return self.kind.endswith("-static")

    @property
    def name(self) -> str:
        if self.agent_name is None:
            return self.kind
        name = f"{self.kind}/{self.agent_name}"
        return name if self.kind == "processor" else f"{name}/{schedule_text(self.schedule)}"

    def call_kwargs(self, model, device: str):
        """`generate` kwargs for one call and a function returning its MARA stats (None for plain) afterwards.
        A fresh processor / stats object per call, made outside the timed region."""
        kwargs = {}
        if self.static:
            kwargs["cache_implementation"] = "static"
            if self.compile_config is not None:
                kwargs["compile_config"] = self.compile_config
        if self.kind == PROMPT:
            return dict(max_new_tokens=1, min_new_tokens=1), lambda: None
        if self.kind.startswith("plain"):
            return kwargs, lambda: None
        if self.kind == "processor":
            processor = MaraLogitsProcessor(self.agent, model, schedule=self.schedule)
            return dict(kwargs, logits_processor=[processor]), lambda: processor.stats
        stats = MaraStats(self.agent.top_k, device=device)
        kwargs.update(custom_generate=mara_generate, mara_agent=self.agent, mara_schedule=self.schedule,
                      mara_stats=stats)
        return kwargs, lambda: stats


def build_methods(args, agents: dict[str, MaraAgent], compile_config) -> list[Method]:
    methods = []
    for kind in args.methods:
        if kind.startswith("plain"):
            methods.append(Method(kind, compile_config=compile_config))
        elif kind == "processor":
            methods += [Method(kind, name, agents[name]) for name in args.processor_agents]
        else:
            names = args.static_agents if kind == "fused-static" else args.agents
            methods += [Method(kind, name, agents[name], schedule, compile_config)
                        for name in names for schedule in args.schedules]
    return methods


# ---------------------------------------------------------------------------------------------------- timing
def compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (a rise inside a timed call means it compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def count_new_tokens(sequences: torch.Tensor, prompt_length: int, eos_token_ids) -> int:
    """Generated tokens over all rows: per row, those after the prompt up to and including the first EOS."""
    return int(answer_lengths(sequences[:, prompt_length:], list(eos_token_ids)).sum())


@dataclass
class Call:
    seconds: float
    sequences: torch.Tensor  # on CPU
    tokens: int
    steps: int
    stats: dict | None
    graphs: int  # graphs compiled during the call


def timed_call(model, inputs: dict, method: Method, base_kwargs: dict, device: str) -> Call:
    """One `generate` call as a user makes it (generate runs under its own `no_grad`), timed."""
    extra, read_stats = method.call_kwargs(model, device)
    graphs = compiled_graphs()
    common.synchronize(device)
    start = time.perf_counter()
    sequences = model.generate(**inputs, **{**base_kwargs, **extra})
    common.synchronize(device)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    stats = read_stats()
    return Call(
        seconds=seconds,
        sequences=sequences.cpu(),
        tokens=count_new_tokens(sequences, prompt_length, base_kwargs["eos_token_id"]),
        steps=sequences.shape[1] - prompt_length,
        stats=None if stats is None else stats.to_dict(),
        graphs=compiled_graphs() - graphs,
    )


def add_stats(total: dict | None, stats: dict) -> dict:
    """Sum the counters of two `MaraStats.to_dict()` results (rates are recomputed in `summarize_stats`)."""
    keys = ("tokens", "agent_decided", "fallbacks", "forwards", "nonfinite")
    lists = ("accepted_index_histogram", "search_length_histogram")
    if total is None:
        return {k: stats[k] for k in keys + lists}
    total = dict(total)
    for k in keys:
        total[k] += stats[k]
    for k in lists:
        total[k] = [a + b for a, b in zip(total[k], stats[k])]
    return total


def summarize_stats(total: dict, steps: int) -> dict:
    """Counters plus the rates the tables print. `top1_accept_rate` / `top1_reject_share`: shares of the tokens the
    agent decided (more than one candidate) where it accepted / rejected the top-1."""

    def ratio(a, b):
        return a / b if b else float("nan")

    accepted_top1 = total["accepted_index_histogram"][0]
    return dict(
        total,
        forwards_per_token=ratio(total["forwards"], total["tokens"]),
        forwards_per_step=ratio(total["forwards"], steps),
        agent_decided_rate=ratio(total["agent_decided"], total["tokens"]),
        top1_accept_rate=ratio(accepted_top1, total["agent_decided"]),
        top1_reject_share=ratio(total["agent_decided"] - accepted_top1, total["agent_decided"]),
        fallback_rate=ratio(total["fallbacks"], total["agent_decided"]),
    )


@dataclass
class MethodRun:
    """One method at one batch size: every call's seconds, the first round's outputs and MARA stats."""

    method: Method
    batch_size: int
    num_batches: int
    compiled: bool
    warmup_seconds: float | None = None
    warmup_graphs: int = 0
    round_seconds: list[float] = field(default_factory=list)  # per round, summed over batches
    tokens: int = 0  # generated tokens per round
    steps: int = 0  # decode steps per round (summed over batches)
    stats: dict | None = None  # summed over the first round's batches
    outputs: list[torch.Tensor] = field(default_factory=list)  # first round, per batch
    timed_graphs: int = 0  # graphs compiled inside timed calls (should be 0)

    def add(self, call: Call, round_index: int) -> None:
        self.timed_graphs += call.graphs
        if round_index == 0:
            self.tokens += call.tokens
            self.steps += call.steps
            self.outputs.append(call.sequences)
            if call.stats is not None:
                self.stats = add_stats(self.stats, call.stats)


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_record(run: MethodRun, references: dict[str, MethodRun]) -> dict:
    """The JSON record of one method at one batch size; ratios divide tokens/s by the reference's (same batch
    size, same run): of the medians, and per round (paired) as median/min/max."""
    seconds = run.round_seconds
    tps = [run.tokens / s for s in seconds]
    record = {
        "method": run.method.name,
        "kind": run.method.kind,
        "agent": run.method.agent_name,
        "schedule": None if run.method.agent is None or run.method.kind == "processor"
        else schedule_text(run.method.schedule),
        "processor_schedule": schedule_text(run.method.schedule) if run.method.kind == "processor" else None,
        "static_cache": run.method.static,
        "compiled": run.compiled,
        "batch_size": run.batch_size,
        "batches": run.num_batches,
        "rounds": len(seconds),
        "tokens_per_round": run.tokens,
        "steps_per_round": run.steps,
        "warmup_seconds": run.warmup_seconds,
        "graphs_compiled_in_warmup": run.warmup_graphs,
        "graphs_compiled_in_timed_calls": run.timed_graphs,
        "seconds_per_round": seconds,
        "seconds": spread(seconds),
        "tokens_per_second": spread(tps),
        "ms_per_step": spread([1000 * s / run.steps for s in seconds]) if run.steps else None,
        "mara_stats": summarize_stats(run.stats, run.steps) if run.stats else None,
    }
    for label, reference in references.items():
        if label == PROMPT or run.method.kind == PROMPT or reference is None or not reference.round_seconds:
            continue
        ref_tps = [reference.tokens / s for s in reference.round_seconds]
        record[f"ratio_vs_{label}"] = statistics.median(tps) / statistics.median(ref_tps)
        paired = [a / b for a, b in zip(tps, ref_tps)]
        record[f"paired_ratio_vs_{label}"] = spread(paired)
    record.update(decode_record(run, references.get(PROMPT), references.get("plain")))
    return record


def decode_seconds(run: MethodRun, prompt: MethodRun | None) -> list[float] | None:
    """Per round, `run`'s seconds less the prompt's in the same round (both summed over the same batches): the
    time of its decode steps after the first token. None without a prompt run, for the prompt itself, or where a
    round's difference is not positive (a model too small to time)."""
    if prompt is None or run.method.kind == PROMPT or not prompt.round_seconds:
        return None
    decode = [s - p for s, p in zip(run.round_seconds, prompt.round_seconds)]
    return decode if decode and min(decode) > 0 and run.steps > prompt.steps else None


def decode_record(run: MethodRun, prompt: MethodRun | None, plain: MethodRun | None) -> dict:
    """`decode_ms_per_step` (median/min/max over rounds) and, against plain, `decode_ratio_vs_plain` (the same
    tokens in fewer or more decode seconds: plain's median decode seconds over this method's) with its per-round
    `paired_decode_ratio_vs_plain`. Empty where `decode_seconds` has none."""
    decode = decode_seconds(run, prompt)
    if decode is None:
        return {}
    steps = run.steps - prompt.steps
    record = {"decode_ms_per_step": spread([1000 * d / steps for d in decode])}
    plain_decode = None if plain is None else decode_seconds(plain, prompt)
    if plain_decode is not None:
        record["decode_ratio_vs_plain"] = statistics.median(plain_decode) / statistics.median(decode)
        record["paired_decode_ratio_vs_plain"] = spread([p / d for p, d in zip(plain_decode, decode)])
    return record


# ---------------------------------------------------------------------------------------------------- identity
def identity_pairs(runs: list[MethodRun]) -> list[tuple[MethodRun, MethodRun]]:
    """Pairs whose greedy outputs must be equal: plain vs plain-static; plain (and plain-static for static methods)
    vs every method of an agent that decodes plain greedy's tokens (accept-all, reject-all); for the other agents
    the processor vs every fused method (without a processor run: the first fused method)."""
    by_name = {r.method.name: r for r in runs}
    plain, plain_static = by_name.get("plain"), by_name.get("plain-static")
    pairs = []
    if plain and plain_static:
        pairs.append((plain, plain_static))
    agents = list(dict.fromkeys(r.method.agent_name for r in runs if r.method.agent_name))
    for agent in agents:
        mine = [r for r in runs if r.method.agent_name == agent]
        if agent in GREEDY_AGENTS:
            for r in mine:
                if plain:
                    pairs.append((plain, r))
                if plain_static and r.method.static:
                    pairs.append((plain_static, r))
        else:
            reference = by_name.get(f"processor/{agent}") or mine[0]
            pairs += [(reference, r) for r in mine if r is not reference]
    return pairs


def compare_outputs(a: MethodRun, b: MethodRun) -> tuple[bool, str]:
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


def identity_records(runs: list[MethodRun], dtype: str) -> list[dict]:
    records = []
    for a, b in identity_pairs(runs):
        same, detail = compare_outputs(a, b)
        records.append({"a": a.method.name, "b": b.method.name, "batch_size": a.batch_size, "dtype": dtype,
                        "identical": same, "detail": detail})
        logger.info(f"  batch {a.batch_size}: {'IDENTICAL' if same else 'DIFFER   '} {a.method.name} vs "
                    f"{b.method.name}{'' if same else ': ' + detail}")
    return records


# ---------------------------------------------------------------------------------------------------- the run
def run_batch_size(model, batches, methods: list[Method], base_kwargs, device: str, *, rounds: int, compiled: set,
                   plain_warmup: Call | None, on_round) -> list[MethodRun]:
    """Warm up every method once (the same call as the timed ones), then `rounds` rounds over all batches with the
    methods' order rotated per batch and round. `on_round(runs, round)` is called after each round."""
    batch_size = batches[0]["input_ids"].shape[0]
    runs = [MethodRun(m, batch_size, len(batches), compiled=m.name in compiled) for m in methods]
    for run in runs:
        call = plain_warmup if run.method.kind == "plain" and plain_warmup is not None else timed_call(
            model, batches[0], run.method, base_kwargs, device)
        run.warmup_seconds, run.warmup_graphs = call.seconds, call.graphs
        logger.info(f"  b{batch_size} warm-up {run.method.name:<34} {call.seconds:8.2f} s"
                    + (f"  ({call.graphs} graphs compiled)" if call.graphs else ""))
    n = len(runs)
    for r in range(rounds):
        seconds = [0.0] * n
        for b, inputs in enumerate(batches):
            shift = (r * len(batches) + b) % n
            for i in [(shift + j) % n for j in range(n)]:
                call = timed_call(model, inputs, runs[i].method, base_kwargs, device)
                runs[i].add(call, r)
                seconds[i] += call.seconds
                if call.graphs:
                    logger.info(f"  WARNING: {runs[i].method.name} compiled {call.graphs} graphs inside a timed call")
        for run, sec in zip(runs, seconds):
            run.round_seconds.append(sec)
        on_round(runs, r)
    return runs


def identity_batch_size(model, batches, methods: list[Method], base_kwargs, device: str,
                        compiled: set) -> list[MethodRun]:
    """Every method once per batch (outputs only; the times are recorded but are not a benchmark)."""
    batch_size = batches[0]["input_ids"].shape[0]
    runs = [MethodRun(m, batch_size, len(batches), compiled=m.name in compiled) for m in methods]
    for run in runs:
        for inputs in batches:
            call = timed_call(model, inputs, run.method, base_kwargs, device)
            run.add(call, 0)
            run.warmup_seconds = (run.warmup_seconds or 0.0) + call.seconds
        logger.info(f"  b{batch_size} {run.method.name:<34} {run.warmup_seconds:8.2f} s")
    return runs


def estimate_seconds(methods: list[Method], plain_seconds: dict[int, float], calls_per_batch: int,
                     batches: dict[int, int], compiled: set, device: str) -> float:
    """Rough total time of the remaining calls: each method's plain step time (measured: the plain warm-up call)
    times `STEP_COST`, plus `COMPILE_SECONDS` per compiled method and batch size."""
    total = 0.0
    for batch_size, plain in plain_seconds.items():
        for m in methods:
            if m.kind.startswith("plain") or m.kind == PROMPT:
                factor = 1.0  # (an upper bound for the prompt's call)
            else:
                costs = STEP_COST["processor" if m.kind == "processor" else "fused"]
                factor = costs.get(m.agent_name, costs[None])
            if m.name in compiled:
                factor *= STATIC_STEP
                total += COMPILE_SECONDS["cuda" if device.startswith("cuda") else "cpu"]
            calls = calls_per_batch - (1 if m.kind == "plain" else 0)  # plain's warm-up already ran
            total += plain * factor * calls * batches[batch_size]
    return total


def table_rows(records: list[dict]) -> list[list[str]]:
    f = common.fmt
    rows = []
    for rec in records:
        s = rec["mara_stats"] or {}
        tps = rec["tokens_per_second"]
        paired = rec.get("paired_ratio_vs_plain")
        rows.append([
            str(rec["batch_size"]),
            rec["method"] + (" (compiled)" if rec["compiled"] else ""),
            f(tps and tps["median"], ".1f"),
            f"{f(tps and tps['min'], '.1f')}-{f(tps and tps['max'], '.1f')}",
            f(rec["ms_per_step"] and rec["ms_per_step"]["median"], ".1f"),
            f(rec.get("ratio_vs_plain"), ".3f"),
            f"{f(paired and paired['min'], '.2f')}-{f(paired and paired['max'], '.2f')}",
            f(rec.get("ratio_vs_plain_static"), ".3f"),
            f(rec.get("decode_ratio_vs_plain"), ".3f"),
            f(s.get("forwards_per_step"), ".2f"),
            f(100 * s["top1_accept_rate"] if s else None, ".1f"),
            f(100 * s["fallback_rate"] if s else None, ".1f"),
        ])
    return rows


HEADER = ["batch", "method", "tok/s", "min-max", "ms/step", "vs plain", "per round", "vs static", "decode vs plain",
          "fwd/step", "top1 acc %", "fallback %"]
NOTE = ("tok/s: median over rounds (min-max); vs plain / vs static: median tok/s over plain's / plain-static's in "
        "this run; per round: the same ratio round by round (min-max); decode vs plain: the same ratio over the "
        "decode steps alone (each call less the prompt method's call, which runs the prompt's forward and the first "
        "token, in the same round); fwd/step: MARA forwards per decode step "
        "(processor: on top of generate's own; fused: all); top1 acc %: share of agent-decided tokens whose top-1 "
        "the agent accepted; fallback %: every candidate rejected.")


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=common.default_device(), help="torch device (default: cuda if available)")
    parser.add_argument("--model", choices=common.MODELS, default=None,
                        help="llama3-8b-random (random Llama-3-8B shape; default on CUDA, CUDA only), "
                             "llama3-8b-4layers-random (its widths, 4 layers: quick to compile, for --identity), "
                             "smollm2 (SmolLM2-135M-Instruct; default on CPU), tiny-random (smoke test) or "
                             "deep-tiny-random (tiny-random's widths at Llama-3-8B's 32 layers: a host-bound step, as "
                             "eager 8B steps on a GPU are)")
    parser.add_argument("--dtype", choices=common.DTYPES, default=None,
                        help="model dtype (default: bfloat16 for random models on CUDA, else float32; --identity "
                             "always float32)")
    parser.add_argument("--identity", action="store_true",
                        help="identity check instead of timing: float32, TF32 off, every method once, greedy "
                             "outputs compared")
    parser.add_argument("--methods", nargs="+", choices=KINDS, default=list(KINDS), help="method kinds to run")
    parser.add_argument("--agents", nargs="+", type=common.agent_spec, default=None, metavar="AGENT",
                        help=f"agents of the fused methods, each one of {', '.join(common.AGENTS)}, or NAME:min_p=P "
                             "for that agent with its candidates cut by min-p P (default: accept-all calibrated "
                             "reject-all, plus shipped on smollm2; --identity: accept-all calibrated, plus shipped on "
                             "smollm2)")
    parser.add_argument("--processor-agents", nargs="+", type=common.agent_spec, default=None, metavar="AGENT",
                        help="agents of the processor (default: accept-all and shipped of --agents; --identity: "
                             "all of --agents)")
    parser.add_argument("--static-agents", nargs="+", type=common.agent_spec, default=None, metavar="AGENT",
                        help="agents of fused-static (default: --agents without reject-all)")
    parser.add_argument("--schedules", nargs="+", type=parse_schedule, default=["auto"],
                        help="mara_schedule values of the fused methods: auto and/or boundaries such as 1,8 or 40 "
                             "(default: auto); the processor uses auto")
    parser.add_argument("--reject-share", type=float, default=0.3,
                        help="share of plain greedy's top-1 candidates the calibrated agent rejects (default 0.3)")
    parser.add_argument("--calibration-steps", type=int, default=16,
                        help="greedy steps whose top-1 states calibrate the agent (default 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes (default: 1 16; --identity on CUDA: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per row, forced via min_new_tokens (default: 64 on CUDA, 32 on CPU, 8 for "
                             "tiny-random; --identity on CUDA: 32)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per batch size, rounded up to whole batches (default: one batch)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length of the random models (default: 256; 32 for tiny-random); SmolLM2 reads "
                             "--prompts with its chat template")
    parser.add_argument("--prompts", type=common.prompt_name, default="saferlhf_test", metavar="NAME",
                        help="SmolLM2's prompts: the first ones of data/prompts/NAME.json (default: saferlhf_test; "
                             "also beavertails_test, hhrlhf_test, saferlhf_train)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3; fewer only for smoke tests)")
    parser.add_argument("--compile", action="store_true",
                        help="off CUDA: let generate compile the static-cache methods (CompileConfig with "
                             "_compile_all_devices), as it does on CUDA by default")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model, prompts and calibrated agent")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, torch's default on CUDA; 0: torch's default)")
    parser.add_argument("--out", default=None,
                        help="output folder for speed.json / speed.log (identity.json / identity.log with "
                             "--identity), e.g. benchmarks/gpu/h100 (default: benchmarks/results/<model>-<device>)")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.model is None:
        args.model = "llama3-8b-random" if cuda else "smollm2"
    tiny = args.model == "tiny-random"
    if args.identity:
        args.dtype = "float32"
    elif args.dtype is None:
        args.dtype = str(common.default_dtype(args.model, args.device)).removeprefix("torch.")
    if args.agents is None:
        args.agents = ["accept-all", "calibrated"] + ([] if args.identity else ["reject-all"])
        args.agents += ["shipped"] if args.model == "smollm2" else []
    if args.processor_agents is None:  # identity: every agent (the processor is the reference of fused)
        args.processor_agents = list(args.agents) if args.identity else [
            a for a in args.agents if a in ("accept-all", "shipped")]
    if args.static_agents is None:
        args.static_agents = [a for a in args.agents if a != "reject-all" or args.identity]
    if args.batch_sizes is None:
        args.batch_sizes = [16] if args.identity and cuda else [1, 16]
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if tiny else (32 if args.identity or not cuda else 64)
    if args.prompt_tokens is None:
        args.prompt_tokens = 32 if tiny else 256
    for name in ("rounds", "max_new_tokens", "calibration_steps", "prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} has to be at least 1")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes have to be at least 1")
    if args.out is None:
        args.out = str(common.RESULTS_DIR / f"{args.model}-{args.device.split(':')[0]}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    mode = "identity" if args.identity else "speed"
    out = Path(args.out)
    log_path = common.open_log(out, mode)
    json_path = out / f"{mode}.json"
    start = time.perf_counter()
    try:
        return run(args, argv, mode, json_path, log_path, start)
    finally:
        common.close_log()


def run(args, argv, mode: str, json_path: Path, log_path: Path, start: float) -> dict:
    device, cuda = args.device, args.device.startswith("cuda")
    common.set_threads(args.threads, device)
    if args.identity and cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    compile_config = None
    if args.compile and not cuda:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True
    compiling = cuda or args.compile
    settings = dict(vars(args), schedules=[schedule_text(s) for s in args.schedules])
    if compiling and ("plain-static" in args.methods or "fused-static" in args.methods):
        # Each method runs as if alone in its process: without a higher limit, the 9th recompilation of a compiled
        # function (several agents, batch sizes and chunk shapes) would silently fall back to eager code.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        settings["dynamo_recompile_limit"] = dynamo_config.recompile_limit

    logger.info(f"bench_generate {mode}: {common.command_record('bench_generate.py', argv)['command_line']}")
    model, tokenizer = common.load_model(args.model, device, common.DTYPES[args.dtype], seed=args.seed)
    base_kwargs = common.base_generate_kwargs(model, args.max_new_tokens)
    batches = {bs: common.make_batches(model, tokenizer, bs, common.batches_for(args.num_prompts, bs),
                                       args.prompt_tokens, args.seed, device, args.prompts)
               for bs in args.batch_sizes}

    names = list(dict.fromkeys(args.agents + args.processor_agents + args.static_agents))
    calibration_inputs = batches[max(args.batch_sizes)][0]
    agents, agent_records = {}, {}
    for name in names:
        agents[name], agent_records[name] = common.make_agent(
            name, model, calibration_inputs, reject_share=args.reject_share, seed=args.seed,
            steps=args.calibration_steps)
    if "calibrated" in agent_records:
        rec = agent_records["calibrated"]
        logger.info(f"calibrated agent: rejects {100 * rec['reject_share_on_calibration_states']:.1f}% of "
                    f"{rec['calibration_states']} top-1 states of plain greedy (target "
                    f"{100 * args.reject_share:.0f}%), accept bias shifted by {rec['bias_shift']:+.4f}")

    methods = build_methods(args, agents, compile_config)
    if not args.identity:
        methods.append(Method(PROMPT))
    compiled = {m.name for m in methods if m.static and compiling}
    payload = {
        "benchmark": "bench_generate",
        "mode": mode,
        "command": common.command_record("bench_generate.py", argv),
        "settings": settings,
        "environment": common.environment(device),
        "agents": agent_records,
        "methods": [m.name for m in methods],
        "log": log_path.name,
        "complete": False,
        "results": [],
        "identity": [],
    }

    # Plain warm-ups first: their times give the estimate (and count as plain's warm-up).
    plain = next((m for m in methods if m.kind == "plain"), Method("plain"))
    plain_calls = {bs: timed_call(model, batches[bs][0], plain, base_kwargs, device) for bs in args.batch_sizes}
    calls_per_batch = 1 if args.identity else 1 + args.rounds
    estimate = estimate_seconds(methods, {bs: c.seconds for bs, c in plain_calls.items()}, calls_per_batch,
                                {bs: len(b) for bs, b in batches.items()}, compiled, device)
    payload["estimated_seconds"] = time.perf_counter() - start + estimate
    logger.info(f"model {args.model} ({args.dtype}) on {device}, {args.max_new_tokens} new tokens, batch sizes "
                f"{args.batch_sizes}, {len(methods)} methods, "
                + ("identity check" if args.identity else f"{args.rounds} rounds"))
    logger.info(f"estimated total time: ~{payload['estimated_seconds'] / 60:.1f} min (plain step times measured "
                f"now; other methods from issue 10's H100 ratios; compiling guessed at "
                f"{COMPILE_SECONDS['cuda' if cuda else 'cpu']:.0f} s per compiled method and batch size)")
    if not args.identity and args.rounds < 3:
        logger.info(f"NOTE: {args.rounds} round(s): medians of fewer than 3 rounds are for smoke tests only")

    done: list[dict] = []
    for bs in args.batch_sizes:
        logger.info(f"batch size {bs} ({len(batches[bs])} batch(es))")
        if args.identity:
            runs = identity_batch_size(model, batches[bs], methods, base_kwargs, device, compiled)
        else:
            def on_round(runs, r, bs=bs):
                records = records_of(runs)
                payload["results"] = done + records
                payload["elapsed_seconds"] = time.perf_counter() - start
                common.write_json(json_path, payload)
                round_seconds = sum(run.round_seconds[-1] for run in runs)
                logger.info(f"  b{bs} round {r + 1}/{args.rounds}: {round_seconds:.1f} s, elapsed "
                            f"{payload['elapsed_seconds']:.0f} s")

            runs = run_batch_size(model, batches[bs], methods, base_kwargs, device, rounds=args.rounds,
                                  compiled=compiled, plain_warmup=plain_calls[bs], on_round=on_round)
        done += records_of(runs)
        payload["identity"] += identity_records(runs, args.dtype)
        payload["results"] = done
        payload["elapsed_seconds"] = time.perf_counter() - start
        common.write_json(json_path, payload)

    if not args.identity:
        logger.info("\n" + common.table(HEADER, table_rows(done)))
        logger.info(NOTE)
    same = sum(r["identical"] for r in payload["identity"])
    logger.info(f"identity ({args.dtype}): {same} of {len(payload['identity'])} pairs identical"
                + ("" if args.identity or args.dtype == "float32" else
                   " (informational: bf16 kernels flip near-ties; the check is --identity)"))
    payload["complete"] = True
    payload["elapsed_seconds"] = time.perf_counter() - start
    common.write_json(json_path, payload)
    logger.info(f"total time {payload['elapsed_seconds']:.0f} s (estimated {payload['estimated_seconds']:.0f} s); "
                f"wrote {json_path} and {log_path}")
    return payload


def records_of(runs: list[MethodRun]) -> list[dict]:
    by_name = {r.method.name: r for r in runs}
    records = []
    for run in runs:
        references = {"plain": by_name.get("plain"), PROMPT: by_name.get(PROMPT)}
        if run.method.static:
            references["plain_static"] = by_name.get("plain-static")
        records.append(run_record(run, references))
    return records


if __name__ == "__main__":
    main()
