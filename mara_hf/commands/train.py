"""`mara-hf train`: train a MARA agent for a base model on a prompt file with a reward."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from ..data import add_prompt_arguments
from ..distributed.config import RAY_PREFIX, RayConfig
from ..options import add_config_arguments, config_from_args
from ..train.sac import SACConfig
from ..train.trainer import BEST_AGENT, FINAL_AGENT, METRICS_FILE, Trainer, TrainConfig
from .folders import check_out_folder

EXAMPLE = """example (from the repository root, which holds data/prompts/; the shipped SmolLM2 agent's exact command is
in its model card and the README):
  mara-hf train --prompts data/prompts/saferlhf_train.json --reward vader --out runs/vader --iterations 200
with two Ray rollout workers on this machine (pip install -e ".[ray]"):
  mara-hf train --prompts data/prompts/saferlhf_train.json --reward vader --out runs/vader-ray --ray-workers 2"""


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .. import models
    from ..rewards import REWARD_HELP

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Train a MARA agent with discrete soft actor-critic: batched rollouts of the accept/reject\n"
                          "MDP, a sentence-level reward at the end of each answer plus a token-level KL penalty to\n"
                          "the base model (and, with --reject-cost, a cost per reject decision). Re-running with the\n"
                          "same --out resumes from the latest checkpoint.")
    parser.epilog = REWARD_HELP + "\n\n" + EXAMPLE
    add_prompt_arguments(parser, limit_help="use the first N prompts only")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="the sentence-level reward: vader, offensive, fluency, beaver-reward, hf:ID_OR_PATH, "
                             "py:MODULE:FUNCTION or a weighted sum like 10*vader+5*fluency (see below)")
    models.add_model_argument(parser)
    parser.add_argument("--out", required=True,
                        help="run folder: metrics.jsonl, checkpoints/, agent/ (and probed/, best_agent/ with "
                             "--greedy-probe)")
    parser.add_argument("--init-agent", default=None, help="start from this agent instead of a fresh one")
    add_config_arguments(parser.add_argument_group("run"), TrainConfig)
    add_config_arguments(parser.add_argument_group("soft actor-critic"), SACConfig, prefix=SAC_PREFIX)
    system = parser.add_argument_group("system")
    system.add_argument("--device", default=None,
                        help="cpu, cuda, ... (default: cuda if available); with --ray-workers, the learner's device")
    system.add_argument("--threads", type=int, default=None, help="torch CPU threads (with --ray-workers: the learner's)")
    system.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    system.add_argument("--no-resume", action="store_true",
                        help="refuse to continue a run already in --out (default: resume it)")
    system.add_argument("--no-progress", action="store_true")
    system.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop after the iteration that ends past this many minutes (checkpoint and agent "
                             "written; run again to continue)")
    add_config_arguments(parser.add_argument_group(
        "Ray (rollout workers; the learner stays in this process; see the README)"), RayConfig, prefix=RAY_PREFIX)
    return parser


# ---------------------------------------------------------------------------------------------- options
SAC_PREFIX = "sac_"
"""Namespace prefix of the `SACConfig` options (`args.sac_tau`), apart from `TrainConfig`'s."""


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from .. import models
    from ..data import load_prompts
    from ..rewards import parse_reward

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit has to be at least 1.")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError("--time-limit has to be positive (minutes).")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads has to be at least 1 (leave it out for torch's default).")
    check_out_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(TrainConfig, args, sac=config_from_args(SACConfig, args, prefix=SAC_PREFIX))
    ray_config = config_from_args(RayConfig, args, prefix=RAY_PREFIX)
    if ray_config.enabled:
        from ..distributed.config import import_ray

        import_ray()  # a missing extra fails before anything loads
        if args.device_map is not None:
            raise ValueError("--device-map places one process's model; with --ray-workers each worker loads the "
                             "model on its own device: drop --device-map (or --ray-workers).")
    placement = models.model_placement(args)
    device = models.default_device(args.device)  # the learner's and the reward's
    reward = None if ray_config.enabled else parse_reward(args.reward, device=device)  # workers load their own
    prompts = load_prompts(args.prompts, args.limit, args.prompt_field)
    agent = models.load_agent(args.init_agent) if args.init_agent else None
    base_model = models.SMOLLM2_HUB_ID if args.model in models.SMOLLM2_NAMES else args.model
    command = "mara-hf train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    options = dict(agent=agent, base_model_name=base_model,
                   description=f"discrete SAC, reward {args.reward}, {len(prompts)} prompts; `{command}`",
                   tensorboard=args.tensorboard, progress=not args.no_progress)
    started = time.perf_counter()
    if ray_config.enabled:
        from ..distributed.pool import WorkerPool
        from ..distributed.training import DistributedTrainer

        print(f"Ray: starting {ray_config.workers} rollout workers, each loading {args.model} and the reward "
              f"(the learner runs here, on {device})...", file=sys.stderr)
        with WorkerPool.from_specs(ray_config, args.model, [args.reward], dtype=args.dtype) as pool:
            print("Ray workers: " + "; ".join(f"{i['slot']}: {i['host']} pid {i['pid']} on {i['device']}"
                                             for i in pool.info), file=sys.stderr)
            trainer = DistributedTrainer(pool, prompts, args.reward, args.out, config, device=device, **options)
            _report_buffer(trainer)
            trainer.train(resume=not args.no_resume,
                          time_limit=None if args.time_limit is None else 60 * args.time_limit)
    else:
        print(f"model: {args.model} (loading...)", file=sys.stderr)
        model, tokenizer = models.load_base_model(args.model, **placement)
        trainer = Trainer(model, tokenizer, prompts, reward, args.out, config, **options)
        _report_buffer(trainer)
        trainer.train(resume=not args.no_resume, time_limit=None if args.time_limit is None else 60 * args.time_limit)
    print(f"wrote {args.out}/{FINAL_AGENT} (agent), {args.out}/{METRICS_FILE} "
          f"[{time.perf_counter() - started:.0f} s this session]")
    best = trainer.best_probe()
    if best is not None:
        print(f"best greedy return {best['return']:.3f} after rollout {best['iteration']}: {args.out}/{BEST_AGENT}")
    return 0


def _report_buffer(trainer) -> None:
    print(f"replay buffer: {trainer.config.sac.buffer_size} transitions, {trainer.buffer.nbytes / 2**20:.0f} MiB "
          f"(fp16 states of size {trainer.buffer.state_dim}), allocated once", file=sys.stderr)
