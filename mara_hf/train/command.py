"""`mara-hf train`: train a MARA agent for a base model on a prompt file with a reward."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from .sac import SACConfig
from .trainer import FINAL_AGENT, METRICS_FILE, Trainer, TrainConfig

EXAMPLE = """example (the shipped SmolLM2 agent; see its model card for the exact command):
  mara-hf train --prompts saferlhf_train.json --reward vader --out runs/smollm2-vader --iterations 200"""


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .. import models
    from ..rewards import REWARD_HELP

    defaults, sac = TrainConfig(), SACConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Train a MARA agent with discrete soft actor-critic: batched rollouts of the accept/reject\n"
                          "MDP, a sentence-level reward at the end of each answer plus a token-level KL penalty to\n"
                          "the base model. Re-running with the same --out resumes from the latest checkpoint.")
    parser.epilog = REWARD_HELP + "\n\n" + EXAMPLE
    parser.add_argument("--prompts", required=True,
                        help="JSON list of objects with 'instruction', or JSON Lines with 'instruction' or 'prompt'")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="the sentence-level reward: vader, offensive, beaver-reward, hf:ID_OR_PATH, "
                             "py:MODULE:FUNCTION or a weighted sum like vader+0.5*offensive (see below)")
    models.add_model_argument(parser)
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, agent/")
    parser.add_argument("--init-agent", default=None, help="start from this agent instead of a fresh one")
    run = parser.add_argument_group("run")
    run.add_argument("--iterations", type=int, default=defaults.iterations, help="rollouts (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=defaults.rollout_batch_size,
                     help="prompts per rollout (default: %(default)s)")
    run.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    run.add_argument("--kl-coef", type=float, default=defaults.kl_coef,
                     help="token-level KL penalty coefficient (default: %(default)s)")
    run.add_argument("--top-k", type=int, default=defaults.top_k)
    run.add_argument("--top-p", type=float, default=defaults.top_p)
    run.add_argument("--fallback", choices=["first", "last"], default=defaults.fallback,
                     help="when every candidate is rejected: force the last (paper MDP, default) or take the top-1; "
                          "recorded in the agent so inference does the same")
    run.add_argument("--updates-per-rollout", type=int, default=defaults.updates_per_rollout)
    run.add_argument("--learning-starts", type=int, default=defaults.learning_starts,
                     help="transitions in the buffer before updates start (default: %(default)s)")
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="iterations")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--hidden-sizes", type=int, nargs=2, default=list(defaults.hidden_sizes))
    run.add_argument("--initial-accept", type=float, default=defaults.initial_accept,
                     help="a fresh actor starts accepting every candidate with about this probability "
                          "(default: %(default)s; 0 for the plain random initialisation)")
    run.add_argument("--schedule", type=int, nargs="+", default=list(defaults.schedule),
                     help="lazy chunk boundaries of the rollouts (default: %(default)s: a sampled actor rarely "
                          "walks far)")
    learner = parser.add_argument_group("soft actor-critic")
    learner.add_argument("--lr", type=float, default=sac.actor_lr, help="actor, critic and alpha learning rate")
    learner.add_argument("--actor-lr", type=float, default=None, help="actor learning rate (default: --lr)")
    learner.add_argument("--alpha-lr", type=float, default=None, help="temperature learning rate (default: --lr)")
    learner.add_argument("--sac-batch-size", type=int, default=sac.batch_size)
    learner.add_argument("--gamma", type=float, default=sac.gamma)
    learner.add_argument("--tau", type=float, default=sac.tau)
    learner.add_argument("--buffer-size", type=int, default=sac.buffer_size)
    learner.add_argument("--initial-alpha", type=float, default=sac.initial_alpha)
    learner.add_argument("--target-entropy", type=float, default=sac.target_entropy,
                         help="in nats (default: 0.6 * log 2)")
    learner.add_argument("--max-grad-norm", type=float, default=sac.max_grad_norm)
    learner.add_argument("--actor-delay", type=int, default=sac.actor_delay,
                         help="first updates that train the critics only (default: %(default)s)")
    learner.add_argument("--no-autotune", action="store_true", help="keep alpha fixed at --initial-alpha")
    system = parser.add_argument_group("system")
    system.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    system.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    system.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    system.add_argument("--no-resume", action="store_true",
                        help="refuse to continue a run already in --out (default: resume it)")
    system.add_argument("--no-progress", action="store_true")
    system.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop after the iteration that ends past this many minutes (checkpoint and agent "
                             "written; run again to continue)")
    return parser


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from .. import models
    from ..evaluation import load_prompts
    from ..rewards import parse_reward

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit has to be at least 1.")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError("--time-limit has to be positive (minutes).")
    if args.threads:
        torch.set_num_threads(args.threads)
    sac = SACConfig(actor_lr=args.actor_lr or args.lr, critic_lr=args.lr, alpha_lr=args.alpha_lr or args.lr, batch_size=args.sac_batch_size,
                    gamma=args.gamma, tau=args.tau, buffer_size=args.buffer_size, initial_alpha=args.initial_alpha,
                    target_entropy=args.target_entropy, max_grad_norm=args.max_grad_norm,
                    autotune=not args.no_autotune, actor_delay=args.actor_delay)
    config = TrainConfig(iterations=args.iterations, rollout_batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef, top_k=args.top_k,
                         top_p=args.top_p, fallback=args.fallback, updates_per_rollout=args.updates_per_rollout,
                         learning_starts=args.learning_starts, checkpoint_every=args.checkpoint_every,
                         seed=args.seed, hidden_sizes=tuple(args.hidden_sizes), sac=sac,
                         initial_accept=args.initial_accept or None, schedule=tuple(args.schedule))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = parse_reward(args.reward, device=device)
    prompts = load_prompts(args.prompts, args.limit)
    agent = models.load_agent(args.init_agent) if args.init_agent else None
    print(f"model: {args.model} (loading...)", file=sys.stderr)
    model, tokenizer = models.load_base_model(args.model, device=device)
    base_model = models.SMOLLM2_HUB_ID if args.model in models.SMOLLM2_NAMES else args.model
    command = "mara-hf train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    trainer = Trainer(model, tokenizer, prompts, reward, args.out, config, agent=agent, base_model_name=base_model,
                      description=f"discrete SAC, reward {args.reward}, {len(prompts)} prompts; `{command}`",
                      tensorboard=args.tensorboard, progress=not args.no_progress)
    print(f"replay buffer: {config.sac.buffer_size} transitions, {trainer.buffer.nbytes / 2**20:.0f} MiB "
          f"(fp16 states of size {trainer.buffer.state_dim}), allocated once", file=sys.stderr)
    started = time.perf_counter()
    trainer.train(resume=not args.no_resume, time_limit=None if args.time_limit is None else 60 * args.time_limit)
    print(f"wrote {args.out}/{FINAL_AGENT} (agent), {args.out}/{METRICS_FILE} "
          f"[{time.perf_counter() - started:.0f} s this session]")
    return 0
