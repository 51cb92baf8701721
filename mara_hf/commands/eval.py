"""`mara-hf eval`: its options and the command that builds the rewards, loads the prompts, the agent and the model,
runs [`mara_hf.evaluation.evaluate`] and prints the report."""

from __future__ import annotations

import argparse
import sys
import time

from ..data import add_prompt_arguments, load_prompts
from ..distributed.config import RAY_PREFIX, RayConfig
from ..evaluation.report import format_summary
from ..evaluation.runner import evaluate
from ..options import add_config_arguments, config_from_args
from ..rewards import REWARD_HELP
from .folders import check_out_folder


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mara-hf eval` (see [`run_eval`])."""
    from .. import models

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Answer a prompt file with the base model and with MARA (same decoding settings), score\n"
                          "both with rewards, report preference rate, gain, per-token KL, agent statistics and speed.\n"
                          "Resumable: re-running with the same --out skips the prompts already answered.")
    parser.epilog = (REWARD_HELP + "\n\nexample (from the repository root, which holds data/prompts/):\n"
                     "  mara-hf eval --prompts data/prompts/saferlhf_test.json --limit 50 --reward vader "
                     "--reward offensive\nthe same, answered by two Ray workers on this machine (pip install -e "
                     "\".[ray]\"):\n  mara-hf eval --prompts data/prompts/saferlhf_test.json --limit 50 --reward vader "
                     "--reward offensive --ray-workers 2")
    add_prompt_arguments(parser, limit_help="evaluate the first N prompts only")
    parser.add_argument("--reward", action="append", required=True, metavar="SPEC",
                        help="a reward (repeatable): vader, offensive, fluency, beaver-reward, beaver-cost, "
                             "hf:ID_OR_PATH, py:MODULE:FUNCTION or a weighted sum like 2*beaver-reward-1*beaver-cost "
                             "(see below)")
    models.add_model_argument(parser)
    models.add_agent_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--out", default="eval-results",
                        help="output folder: results.json, responses.jsonl, plots (default: eval-results)")
    parser.add_argument("--sample", action="store_true", help="sample (both sides, same seed) instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, ... (default: cuda if available; Ray workers use their GPU if they have one)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over instead of reusing the answers already in --out")
    parser.add_argument("--rescore", action="store_true",
                        help="score the answers already in --out again (after changing what a reward name means)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_config_arguments(parser.add_argument_group(
        "Ray (prompt batches answered by workers that each hold the model and the rewards; see the README)"),
        RayConfig, prefix=RAY_PREFIX)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """`mara-hf eval`: rewards are built first (so a bad spec fails before any model loads), then the prompts,
    the agent and the model; prints the summary."""
    from .. import models
    from ..rewards import parse_reward

    for option, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{option} has to be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit has to be at least 1.")
    check_out_folder(args.out, "results folder")
    ray_config = config_from_args(RayConfig, args, prefix=RAY_PREFIX)
    if ray_config.enabled:
        return _run_eval_on_ray(args, ray_config)
    placement = models.model_placement(args)
    device = models.default_device(args.device)  # the reward models' (a split base model places itself)
    cache: dict = {}
    rewards = {}
    for spec in args.reward:
        if spec not in rewards:
            rewards[spec] = parse_reward(spec, device=device, cache=cache)
    prompts = load_prompts(args.prompts, args.limit, args.prompt_field)
    agent = models.load_agent(args.agent, args.agent_file)
    print(f"agent: {args.agent or models.DEFAULT_AGENT}; model: {args.model} (loading...)", file=sys.stderr)
    model, tokenizer = models.load_base_model(args.model, **placement)
    started = time.perf_counter()
    results = evaluate(model, tokenizer, agent, prompts, rewards, **_settings_of(args))
    print(format_summary(results))
    print(f"[{time.perf_counter() - started:.1f} s]", file=sys.stderr)
    return 0


def _settings_of(args: argparse.Namespace) -> dict:
    """The evaluation settings the command's options give (the same for one process and for Ray workers)."""
    from .. import models

    return dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample, seed=args.seed,
        out_dir=args.out, resume=not args.no_resume, rescore=args.rescore, progress=not args.no_progress,
        generation_kwargs={"temperature": args.temperature} if args.sample else None,
        mara_kwargs=models.agent_overrides(args) or None,
    )


def _run_eval_on_ray(args: argparse.Namespace, ray_config: RayConfig) -> int:
    """`mara-hf eval --ray-workers N`: the workers load the model and the rewards; this process keeps the folder."""
    from .. import models
    from ..distributed.config import import_ray

    import_ray()  # a missing extra fails before anything loads
    if args.device_map is not None:
        raise ValueError("--device-map places one process's model; with --ray-workers each worker loads the model "
                         "on its own device: drop --device-map (or --ray-workers).")
    prompts = load_prompts(args.prompts, args.limit, args.prompt_field)
    agent = models.load_agent(args.agent, args.agent_file)
    from ..distributed.evaluation import evaluate_on_ray
    from ..distributed.pool import WorkerPool

    print(f"agent: {args.agent or models.DEFAULT_AGENT}; Ray: starting {ray_config.workers} workers, each loading "
          f"{args.model} and the rewards...", file=sys.stderr)
    started = time.perf_counter()
    with WorkerPool.from_specs(ray_config, args.model, list(dict.fromkeys(args.reward)), dtype=args.dtype) as pool:
        results = evaluate_on_ray(pool, agent, prompts, args.reward, **_settings_of(args))
    print(format_summary(results))
    print(f"[{time.perf_counter() - started:.1f} s]", file=sys.stderr)
    return 0
