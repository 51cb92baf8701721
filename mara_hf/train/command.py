"""`mara-hf train`: train a MARA agent for a base model on a prompt file with a reward."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
import types
import typing
from pathlib import Path

import torch

from .sac import SACConfig
from .trainer import FINAL_AGENT, METRICS_FILE, Trainer, TrainConfig

EXAMPLE = """example (from the repository root, which holds data/prompts/; the shipped SmolLM2 agent's exact command is
in its model card and the README):
  mara-hf train --prompts data/prompts/saferlhf_train.json --reward vader --out runs/vader --iterations 200"""


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .. import models
    from ..rewards import REWARD_HELP

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Train a MARA agent with discrete soft actor-critic: batched rollouts of the accept/reject\n"
                          "MDP, a sentence-level reward at the end of each answer plus a token-level KL penalty to\n"
                          "the base model (and, with --reject-cost, a cost per reject decision). Re-running with the\n"
                          "same --out resumes from the latest checkpoint.")
    parser.epilog = REWARD_HELP + "\n\n" + EXAMPLE
    parser.add_argument("--prompts", required=True,
                        help="JSON list of objects with 'instruction', or JSON Lines with 'instruction' or 'prompt'")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="the sentence-level reward: vader, offensive, fluency, beaver-reward, hf:ID_OR_PATH, "
                             "py:MODULE:FUNCTION or a weighted sum like 10*vader+5*fluency (see below)")
    models.add_model_argument(parser)
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, agent/")
    parser.add_argument("--init-agent", default=None, help="start from this agent instead of a fresh one")
    add_config_arguments(parser.add_argument_group("run"), TrainConfig)
    add_config_arguments(parser.add_argument_group("soft actor-critic"), SACConfig, prefix=SAC_PREFIX)
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


# ---------------------------------------------------------------------------------------------- options
SAC_PREFIX = "sac_"
"""Namespace prefix of the `SACConfig` options (`args.sac_tau`), apart from `TrainConfig`'s."""


def _hyperparameters(config_class) -> list[tuple[dataclasses.Field, object, object]]:
    """`(field, type, default)` of every field of the dataclass `config_class` that has a `help` (a nested config
    has none)."""
    hints, defaults = typing.get_type_hints(config_class), config_class()
    return [(f, hints[f.name], getattr(defaults, f.name)) for f in dataclasses.fields(config_class)
            if "help" in f.metadata]


def _flag(field: dataclasses.Field, default=None) -> str:
    if "flag" in field.metadata:
        return field.metadata["flag"]
    return ("--no-" if default is True else "--") + field.name.replace("_", "-")


def _value_type(hint):
    """`X` of `X | None`; other types as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_config_arguments(group, config_class, prefix: str = "") -> None:
    """One option per hyperparameter of the dataclass `config_class` (`TrainConfig`, `SACConfig`), built from each
    field: the flag (`--field-name`, or metadata `flag`; a bool that defaults to true is `--no-field-name`), its
    type (a `Literal` gives choices, `tuple[int, ...]` / `tuple[int, int]` several values), its default and its
    metadata `help`. Metadata `same_as` gives an option no default of its own (it follows another field), `none`
    the command-line spelling of None, `default_text` how the default is shown. Values land in
    `args.<prefix><field name>`; [`config_from_args`] builds the dataclass back."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for field, hint, default in _hyperparameters(config_class):
        meta, hint = field.metadata, _value_type(hint)
        if hint is bool:
            group.add_argument(_flag(field, default), dest=prefix + field.name, help=meta["help"],
                               action="store_false" if default else "store_true")
            continue
        options, shown = {"type": hint, "default": default}, meta.get("default_text", default)
        if typing.get_origin(hint) is typing.Literal:
            options.update(type=str, choices=list(typing.get_args(hint)))
        elif typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            options.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items), default=list(default))
            shown = " ".join(map(str, default))
        if "same_as" in meta:
            options["default"], shown = None, _flag(fields[meta["same_as"]])
        flag = _flag(field)
        group.add_argument(flag, dest=prefix + field.name, metavar=flag[2:].upper().replace("-", "_"),
                           help=f"{meta['help']} (default: {shown})".replace("%", "%%"), **options)


def config_from_args(config_class, args: argparse.Namespace, prefix: str = "", **values):
    """The dataclass `config_class` from the options [`add_config_arguments`] added (plus `values`, e.g. a nested
    config). A bad value raises the dataclass's own `ValueError`, prefixed with the option's flag."""
    found = {}
    for field, hint, default in _hyperparameters(config_class):
        value = getattr(args, prefix + field.name)
        if isinstance(value, list):
            value = tuple(value)
        if "none" in field.metadata and value == _value_type(hint)(field.metadata["none"]):
            value = None  # e.g. --initial-accept 0
        found[field.name] = value
    for field, _, _ in _hyperparameters(config_class):
        if found[field.name] is None and "same_as" in field.metadata:
            found[field.name] = found[field.metadata["same_as"]]
    try:
        return config_class(**found, **values)
    except ValueError as err:
        named = re.match(r"`(\w+)`", str(err))
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        if named is None or named[1] not in fields:
            raise
        raise ValueError(f"{_flag(fields[named[1]])}: {err}") from None


def config_to_argv(config) -> list[str]:
    """The `mara-hf train` options that give `config` (a `TrainConfig` with its `sac`, or a `SACConfig`): one
    per hyperparameter that differs from its default, so `config_from_args` of their parse is `config` again."""
    argv = []
    for field, hint, default in _hyperparameters(type(config)):
        value, meta = getattr(config, field.name), field.metadata
        if "same_as" in meta:
            default = getattr(config, meta["same_as"])
        if value == default:
            continue
        if _value_type(hint) is bool:
            argv.append(_flag(field, default))
        elif value is None:
            if "none" not in meta:
                raise ValueError(f"`{field.name}` = None has no command-line spelling ({_flag(field)}).")
            argv += [_flag(field), meta["none"]]
        else:
            argv += [_flag(field), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    for field in dataclasses.fields(config):
        if dataclasses.is_dataclass(getattr(config, field.name)):  # the learner's options after the run's
            argv += config_to_argv(getattr(config, field.name))
    return argv


def check_out_folder(out: str) -> None:
    """Refuse an unusable --out before anything is loaded: a file, or below a file or an unwritable folder."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out '{out}' is a file, not a run folder: give a folder (new or of an earlier run).")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the filesystem root always exists
    if not existing.is_dir():
        raise ValueError(f"--out '{out}' cannot be created: '{existing}' is a file; give another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out '{out}' is not writable ('{existing}' is not): give another folder.")


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from .. import models
    from ..data import load_prompts
    from ..rewards import parse_reward

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit has to be at least 1.")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError("--time-limit has to be positive (minutes).")
    check_out_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(TrainConfig, args, sac=config_from_args(SACConfig, args, prefix=SAC_PREFIX))
    device = models.default_device(args.device)
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
