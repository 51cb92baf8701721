"""Train several `mara-hf train` configurations side by side for a fixed wall-clock budget, then evaluate each
agent on held-out prompts with `mara-hf eval` (greedy, against the base model).

This is how the shipped `smollm2-vader` agent was chosen: four configurations (the default `--configs`), 6 minutes
each, all four sharing one H100, validated on the last 200 SafeRLHF *training* instructions (training reads the
first 25,000). More configurations aim at fluent, compute-aware agents (issue 11): a fluency term in the reward
(`10*vader+5*fluency`) and a cost per reject decision (`--reject-cost`).

    python benchmarks/train_sweep.py --minutes 6 --out runs/sweep               # GPU: the four at once
    python benchmarks/train_sweep.py --minutes 6 --configs k40-first k40-first-fluency k40-first-rc01 \
        k40-first-fluency-rc01 --out runs/sweep-fluent
    python benchmarks/train_sweep.py --minutes 30 --configs k40-first --device cpu --threads 2
    python benchmarks/train_sweep.py --minutes 6 --configs k40-first-fluency10-token-dep05-rep05 --seeds 0 1 2 \
        --out runs/sweep-seeds                                                   # one recipe, three seeds
    python benchmarks/train_sweep.py --list                                      # the configurations as options

The training prompts default to the repository's `data/prompts/saferlhf_train.json` (found from this file, so the
script runs from any folder); a missing or unreadable prompt file stops the sweep with a one-line error before any
run starts.

Every configuration is a `TrainConfig` (hyperparameters declared once, in `mara_hf/train/trainer.py` and
`mara_hf/train/sac.py`) plus a reward spec; its `mara-hf train` options are generated from it. Writes OUT/runs/NAME/
(metrics.jsonl, agent/, checkpoints/; best_agent/ with a greedy probe), OUT/evals/NAME/ (results.json, responses.jsonl;
OUT/evals/NAME-best/ for best_agent/) and prints one summary line per validated agent: validation gain (VADER, and the
run's own reward where it is another), KL, degenerate answers (the `fluency` screen), fallback rate, forwards per decode
step, and the share of changed tokens with the gain per percent of them (why that figure: `eval/targets.py`). With
`--seeds`, every configuration is trained once per seed, as NAME-seedS: the same recipe can end far apart with another
seed (`train/cpu-seed1-2026-11-28/`), so compare recipes over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mara_hf.data import load_prompts
from mara_hf.options import config_to_argv
from mara_hf.train import SACConfig, TrainConfig
from mara_hf.train.trainer import BEST_AGENT, FINAL_AGENT, PROBE_FILE

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "saferlhf_train.json"

# `smollm2-vader`'s run (`k40-first`): runs are stopped by --minutes, not by iterations or checkpoints.
SHIPPED = TrainConfig(
    rollout_batch_size=64, max_new_tokens=64, learning_starts=8000, updates_per_rollout=48, top_k=40, top_p=0.95,
    fallback="first", kl_coef=0.1, checkpoint_every=100000, iterations=100000, seed=0,
    sac=SACConfig(batch_size=512, tau=0.05, actor_delay=200, alpha_lr=3e-3, buffer_size=300000),
)
TONE = "10*vader"
FLUENT_TONE = "10*vader+5*fluency"
FLUENT10_TONE = "10*vader+10*fluency"
# `smollm2-fluent`'s objective (fluency weight 10, KL 0.2, reject cost 0.01, gamma per token taken) on the sweep's
# experience, a checkpoint every 20 rollouts, each with a greedy probe of 64 prompts at threshold 0.2
FLUENT10 = dataclasses.replace(
    SHIPPED, kl_coef=0.2, reject_cost=0.01, checkpoint_every=20, greedy_probe=64, probe_threshold=0.2,
    sac=dataclasses.replace(SHIPPED.sac, discount="token"))
CONFIGS: dict[str, tuple[str, TrainConfig]] = {
    "k10-last": (TONE, dataclasses.replace(SHIPPED, top_k=10, fallback="last")),
    "k40-last": (TONE, dataclasses.replace(SHIPPED, fallback="last")),
    "k40-last-kl05": (TONE, dataclasses.replace(SHIPPED, fallback="last", kl_coef=0.5)),
    "k40-first": (TONE, SHIPPED),
    # issue 11: fluency in the reward, a cost per reject decision, both
    "k40-first-fluency": (FLUENT_TONE, SHIPPED),
    "k40-first-rc01": (TONE, dataclasses.replace(SHIPPED, reject_cost=0.01)),
    "k40-first-fluency-rc01": (FLUENT_TONE, dataclasses.replace(SHIPPED, reject_cost=0.01)),
    # gamma per token taken (a reject does not postpone the reward), reject costs around the entropy bonus; a
    # checkpoint every 20 rollouts, each with the greedy fallback rate of 64 prompts (`--greedy-probe`)
    "k40-first-fluency-token-rc03": (FLUENT_TONE, dataclasses.replace(
        SHIPPED, reject_cost=0.03, checkpoint_every=20, greedy_probe=64,
        sac=dataclasses.replace(SHIPPED.sac, discount="token"))),
    "k40-first-fluency-token-rc10": (FLUENT_TONE, dataclasses.replace(
        SHIPPED, reject_cost=0.1, checkpoint_every=20, greedy_probe=64,
        sac=dataclasses.replace(SHIPPED.sac, discount="token", actor_delay=1000))),
    # `smollm2-fluent`'s objective (FLUENT10) with GPU-sized experience, probed at the threshold the SmolLM2 agents
    # ship with, plus: the token-level repetition cost of train/cpu-repeat-2026-11-28/ (`-rep05`); half the episodes
    # decided at that threshold, as in train/cpu-deployed-2026-11-28/ (`-dep05`); both, the objective of the default
    # `smollm2-steady` (train/cpu-dep-repeat-2026-11-28/)
    "k40-first-fluency10-token-rep05": (FLUENT10_TONE, dataclasses.replace(FLUENT10, repeat_cost=0.5)),
    "k40-first-fluency10-token-dep05": (FLUENT10_TONE, dataclasses.replace(FLUENT10, deployed_share=0.5)),
    "k40-first-fluency10-token-dep05-rep05": (FLUENT10_TONE, dataclasses.replace(
        FLUENT10, deployed_share=0.5, repeat_cost=0.5)),
    # the same with ReMax's reward baseline (train/cpu-baseline-2026-12-07/: closer to the base model on the CPU)
    "k40-first-fluency10-token-dep05-rep05-base": (FLUENT10_TONE, dataclasses.replace(
        FLUENT10, deployed_share=0.5, repeat_cost=0.5, reward_baseline="greedy")),
}
DEFAULT_CONFIGS = ["k10-last", "k40-last", "k40-last-kl05", "k40-first"]
"""The sweep `smollm2-vader` was chosen from."""


def train_options(name: str, seed: int | None = None) -> list[str]:
    """The `mara-hf train` options of a configuration (reward and hyperparameters; not prompts, output or device),
    with its seed replaced by `seed` if given."""
    reward, config = CONFIGS[name]
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    return ["--reward", reward, *config_to_argv(config), "--no-progress"]


def planned_runs(configs, seeds=None) -> dict[str, tuple[str, int | None]]:
    """`{run name: (configuration, seed)}`: each configuration under its own name, or with `seeds` once per seed
    as `NAME-seedS`."""
    if not seeds:
        return {name: (name, None) for name in configs}
    return {f"{name}-seed{seed}": (name, seed) for name in configs for seed in seeds}


def eval_rewards(name: str) -> list[str]:
    """The rewards a configuration's agents are validated under: VADER, and the run's own reward unless it is VADER
    scaled (a gain counts wins and losses, which scaling does not change)."""
    reward = CONFIGS[name][0]
    return ["vader"] if re.fullmatch(r"(\d+(\.\d*)?\*)?vader", reward) else ["vader", reward]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(PROMPTS),
                        help="training prompts (default: SafeRLHF train, data/prompts/saferlhf_train.json of the "
                             "repository)")
    parser.add_argument("--validation", type=int, default=200,
                        help="the last N prompts are held out for validation (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=25000,
                        help="train on the first N prompts (default: %(default)s, as the shipped agent)")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time per configuration")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=DEFAULT_CONFIGS,
                        help="configurations to train (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train every configuration once per seed, as NAME-seedS (default: each configuration's "
                             "own seed, under its name)")
    parser.add_argument("--list", action="store_true", help="print each configuration's options and exit")
    parser.add_argument("--model", default="smollm2", help="base model (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: mara-hf's default)")
    parser.add_argument("--threads", type=int, default=3, help="torch CPU threads per run")
    parser.add_argument("--out", help="sweep folder (required unless --list)")
    args = parser.parse_args(argv)
    if not args.list and not args.out:
        parser.error("--out is required")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for name in CONFIGS:
            print(f"{name}: mara-hf train {shlex.join(train_options(name))}")
        return
    try:
        prompts = load_prompts(args.prompts)
        if len(prompts) <= args.validation:
            raise ValueError(f"'{args.prompts}' holds {len(prompts)} prompts, not more than the {args.validation} "
                             "held out for validation (--validation).")
    except (OSError, ValueError) as err:
        print(f"train_sweep.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "evals").mkdir(parents=True, exist_ok=True)
    train_count = min(args.limit, len(prompts) - args.validation)
    validation = out / "validation.json"
    validation.write_text(json.dumps([{"instruction": p} for p in prompts[len(prompts) - args.validation:]]))
    cli = [sys.executable, "-m", "mara_hf.cli"]
    device = ["--model", args.model] + (["--device", args.device] if args.device else [])

    def start(command: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    started = time.time()
    planned = planned_runs(args.configs, args.seeds)
    runs = {
        name: start(cli + ["train", "--prompts", args.prompts, "--limit", str(train_count),
                           *train_options(config, seed), "--out", str(out / "runs" / name), "--threads",
                           str(args.threads), "--time-limit", str(args.minutes), *device], out / "runs" / f"{name}.log")
        for name, (config, seed) in planned.items()
    }
    for name, process in runs.items():
        if process.wait() != 0:
            print(f"{name}: training failed, see {out / 'runs' / f'{name}.log'}")
    print(f"training: {time.time() - started:.0f} s")
    agents = validated_agents(out, planned)
    rewards = {label: eval_rewards(planned[name][0]) for label, (name, _) in agents.items()}
    evals = {
        label: start(cli + ["eval", "--prompts", str(validation),
                            *[option for reward in rewards[label] for option in ("--reward", reward)],
                            "--agent", str(folder), "--batch-size", "50", "--out", str(out / "evals" / label),
                            *device],
                     out / "evals" / f"{label}.log")
        for label, (_, folder) in agents.items()
    }
    for label, process in evals.items():
        process.wait()
        name = agents[label][0]
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        results_path = out / "evals" / label / "results.json"
        if not results_path.exists():
            print(f"{label}: evaluation failed, see {out / 'evals' / f'{label}.log'}")
            continue
        results = json.loads(results_path.read_text())
        if label == name:
            head = f"{name}: {len(metrics)} rollouts, {metrics[-1]['updates']} updates"
        else:
            best = json.loads((out / "runs" / name / BEST_AGENT / PROBE_FILE).read_text())
            head = (f"{label}: the actor after rollout {best['iteration']} (the best greedy return of the probes, "
                    f"{best['return']:.3f})")
        print(summary(head, results, rewards[label]))


def summary(head: str, results: dict, rewards: list[str]) -> str:
    """One validated agent's line: its gains (`rewards`: VADER first, then the run's own reward if any), KL, degenerate
    answers, fallbacks, forwards per step, and the share of tokens that differ from the base model's top-1 with the
    last reward's gain per percent of them (`eval/targets.py` says why)."""
    vader, kl = results["rewards"]["vader"], results["kl_per_token"]
    own = "".join(f", {reward} gain {results['rewards'][reward]['gain']:+.1f}" for reward in rewards[1:])
    degenerate, agent = results["fluency"]["degenerate"], results["agent"]
    changed = 100 * agent["changed_rate"]
    per_changed = f"{results['rewards'][rewards[-1]]['gain'] / changed:.2f}" if changed else "n/a"
    return (f"{head}; validation gain "
            f"{vader['gain']:+.1f} ({vader['wins']}/{vader['ties']}/{vader['losses']}), VADER "
            f"{vader['mean_base']:.3f} -> {vader['mean_mara']:.3f}{own}, KL/token {kl['mara']:.2f} "
            f"(base {kl['base_reference']:.2f}), degenerate answers {degenerate['mara']} (base "
            f"{degenerate['base']}), fallback rate {agent['fallback_rate']:.1%}, "
            f"{agent['forwards_per_step']:.2f} forwards per step, changed tokens {changed:.1f}% ({per_changed} points "
            f"of {rewards[-1]} gain per percent)")


def validated_agents(out: Path, run_names) -> dict[str, tuple[str, Path]]:
    """`{label: (run name, agent folder)}` to validate: each run's last actor (`agent/`) under its name, and the
    actor with the best greedy return of its probes (`best_agent/`, runs with `greedy_probe`) under `NAME-best`."""
    agents = {}
    for name in run_names:
        run = out / "runs" / name
        if (run / FINAL_AGENT).is_dir():
            agents[name] = (name, run / FINAL_AGENT)
        if (run / BEST_AGENT).is_dir():
            agents[name + "-best"] = (name, run / BEST_AGENT)
    return agents


if __name__ == "__main__":
    main()
