"""Throughput of plain greedy `generate()` vs greedy `generate()` with `MaraLogitsProcessor`.

Same model, prompts and settings for both, in one run; prints a table (tokens/s and ratio vs plain) and writes
JSON. CPU default: SmolLM2-135M-Instruct at batch 1 and 8, 32 new tokens. CUDA default: a random-weight bf16
Llama-3-8B-shaped model at batch 1 and 16, 256-token prompts, 128 new tokens.

    python benchmarks/bench_processor.py
    python benchmarks/bench_processor.py --agent decisive --batch-sizes 1 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, default_out=str(common.RESULTS_DIR / "bench_processor.json"))
    parser.add_argument("--agent", choices=common.AGENTS, default="accept-all",
                        help="accept-all (p_accept ~ 1: pure overhead) or decisive (random, many rejections)")
    return common.resolve_defaults(parser.parse_args(argv))


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = common.load_model(args.model, args.device)
    agent = common.make_agent(args.agent, common.hidden_size(model), args.device, seed=args.seed)
    base_kwargs = common.base_generate_kwargs(model, args.max_new_tokens)
    print(f"model {args.model} on {args.device}, {args.max_new_tokens} new tokens, agent {args.agent}")

    results, identity = [], []
    for batch_size in args.batch_sizes:
        batches = common.make_batches(model, tokenizer, batch_size, args.num_prompts, args.prompt_tokens,
                                      args.seed, args.device)
        methods = [common.Method("plain"), common.Method("processor", args.agent, agent)]
        plain, processor = common.run_methods(model, batches, methods, base_kwargs, args.device,
                                              repeats=args.repeats, warmup_tokens=args.warmup_tokens,
                                              label=f"b{batch_size} ")
        results += [plain, processor]
        if args.agent == "accept-all":  # accepting every top-1 must reproduce plain greedy decoding
            identity += common.identity_lines([(plain, processor)])

    print()
    common.print_table(common.TABLE_HEADER, common.result_rows(results))
    print(common.TABLE_NOTE)
    for text, _, _ in identity:
        print(text)
    print(f"total time {time.perf_counter() - start:.0f} s")
    common.write_json(args.out, {
        "benchmark": "bench_processor",
        "settings": vars(args),
        "environment": common.environment(args.device, args.model),
        "results": [r.to_dict() for r in results],
        "identity_checks": [{"check": t, "identical": s, "detail": d} for t, s, d in identity],
    })


if __name__ == "__main__":
    main()
