"""Throughput of plain greedy `generate()`, the drop-in `MaraLogitsProcessor` and the fused loop
(`custom_generate=mara_generate`), with an accept-all agent (pure overhead) and a decisive random agent (many
rejections), on the same model and prompts.

For MARA runs it also reports forwards per generated token, forwards per decode step and the share of tokens the
agent decided; `--schedules` compares lazy-evaluation chunk schedules of the fused path; the largest batch size's
tokens/s divided by batch 1's shows how each method scales. Greedy outputs of the processor and the fused path
(and of plain vs accept-all) are compared and the result printed.

CPU default: SmolLM2-135M-Instruct, batch 1 and 8, 32 new tokens. CUDA default: random bf16 Llama-3-8B shape,
batch 1 and 16, 256-token prompts, 128 new tokens.

    python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --agents decisive --batch-sizes 1 --schedules 1,8 1,4 1,2,4,8,16 1,40
"""

from __future__ import annotations

import argparse
import time

import common
from mara_hf.schedule import DEFAULT_SCHEDULE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, default_out=str(common.RESULTS_DIR / "bench_generate.json"))
    parser.add_argument("--agents", nargs="+", choices=common.AGENTS, default=list(common.AGENTS),
                        help="agents to run with the processor and the fused path (default: both)")
    parser.add_argument("--schedules", nargs="+", type=common.parse_schedule, default=[DEFAULT_SCHEDULE],
                        help="chunk schedules of the fused path, each as comma-separated boundaries starting with 1, "
                             "e.g. --schedules 1,8 1,4 1,2,4,8,16 1,40 (default: the library default "
                             f"{','.join(map(str, DEFAULT_SCHEDULE))}); the processor uses the default")
    parser.add_argument("--no-processor", action="store_true", help="skip the drop-in processor runs")
    return common.resolve_defaults(parser.parse_args(argv))


def build_methods(args, agents: dict) -> list[common.Method]:
    methods = [common.Method("plain")]
    if not args.no_processor:
        methods += [common.Method("processor", name, agents[name]) for name in args.agents]
    for name in args.agents:
        methods += [common.Method("fused", name, agents[name], schedule) for schedule in args.schedules]
    return methods


def identity_pairs(results: list[common.MethodResult]) -> list[tuple]:
    """Processor (or, without processor runs, the first fused schedule) vs every fused schedule per agent; plain
    vs the accept-all processor and fused path."""
    by_name = {r.method.name: r for r in results}
    plain = by_name["plain"]
    pairs = []
    first_fused = {}
    for r in results:
        if r.method.kind != "fused":
            continue
        reference = by_name.get(f"processor/{r.method.agent_name}")
        if reference is None:
            reference = first_fused.setdefault(r.method.agent_name, r)
        if reference is not r:
            pairs.append((reference, r))
        if r.method.agent_name == "accept-all":
            pairs.append((plain, r))
    if "processor/accept-all" in by_name:
        pairs.append((plain, by_name["processor/accept-all"]))
    return pairs


def scaling_lines(results: list[common.MethodResult], batch_sizes: list[int]) -> list[dict]:
    """tokens/s at the largest batch size divided by tokens/s at batch 1, per method."""
    if 1 not in batch_sizes or max(batch_sizes) == 1:
        return []
    big = max(batch_sizes)
    speed = {(r.method.name, r.batch_size): r.tokens_per_second for r in results}
    lines = []
    for (name, size), tps in speed.items():
        if size == 1 and (name, big) in speed:
            ratio = speed[(name, big)] / tps
            lines.append({"method": name, "batch": big, "ratio": ratio})
            print(f"  {name:<28} batch-{big} / batch-1 tokens/s = {ratio:.2f}")
    return lines


def best_schedules(results: list[common.MethodResult]) -> dict:
    """Per agent and batch size, the fused schedule with the highest tokens/s."""
    best = {}
    for r in results:
        if r.method.kind != "fused":
            continue
        key = f"{r.method.agent_name}/batch{r.batch_size}"
        if key not in best or r.tokens_per_second > best[key][1]:
            best[key] = (",".join(map(str, r.method.schedule)), r.tokens_per_second)
    for key, (schedule, tps) in best.items():
        print(f"  fastest fused schedule for {key}: {schedule} ({tps:.1f} tok/s)")
    return {k: {"schedule": s, "tokens_per_second": t} for k, (s, t) in best.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = common.load_model(args.model, args.device)
    dim = common.hidden_size(model)
    agents = {name: common.make_agent(name, dim, args.device, seed=args.seed) for name in args.agents}
    base_kwargs = common.base_generate_kwargs(model, args.max_new_tokens)
    methods = build_methods(args, agents)
    print(f"model {args.model} on {args.device}, {args.max_new_tokens} new tokens, {len(methods)} methods")

    results = []
    for batch_size in args.batch_sizes:
        batches = common.make_batches(model, tokenizer, batch_size, args.num_prompts, args.prompt_tokens,
                                      args.seed, args.device)
        results += common.run_methods(model, batches, methods, base_kwargs, args.device, repeats=args.repeats,
                                      warmup_tokens=args.warmup_tokens, label=f"b{batch_size} ")

    print()
    common.print_table(common.TABLE_HEADER, common.result_rows(results))
    print(common.TABLE_NOTE)
    print("scaling:")
    scaling = scaling_lines(results, args.batch_sizes)
    print("schedules:")
    best = best_schedules(results)
    print("identity:")
    identity = []
    for batch_size in args.batch_sizes:
        identity += common.identity_lines(identity_pairs([r for r in results if r.batch_size == batch_size]))
    print(f"total time {time.perf_counter() - start:.0f} s")

    settings = dict(vars(args), schedules=[list(s) for s in args.schedules])
    common.write_json(args.out, {
        "benchmark": "bench_generate",
        "settings": settings,
        "environment": common.environment(args.device, args.model),
        "results": [r.to_dict() for r in results],
        "scaling_largest_over_batch1": scaling,
        "fastest_fused_schedule": best,
        "identity_checks": [{"check": t, "identical": s, "detail": d} for t, s, d in identity],
    })


if __name__ == "__main__":
    main()
