"""Train several `mara-hf train` configurations side by side for a fixed wall-clock budget, then evaluate each
agent on held-out prompts with `mara-hf eval` (greedy, against the base model).

This is how the shipped `smollm2-vader` agent was chosen: four configurations, 6 minutes each, all four sharing
one H100, validated on the last 200 SafeRLHF *training* instructions (training reads the first 25,000).

    python benchmarks/train_sweep.py --minutes 6 --out runs/sweep               # GPU: all configurations at once
    python benchmarks/train_sweep.py --minutes 30 --configs k40-first --device cpu --threads 2

Writes OUT/runs/NAME/ (metrics.jsonl, agent/, checkpoints/), OUT/evals/NAME/ (results.json, responses.jsonl)
and prints one summary line per configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "saferlhf_train.json"

COMMON = [
    "--reward", "10*vader", "--batch-size", "64", "--max-new-tokens", "64", "--learning-starts", "8000",
    "--updates-per-rollout", "48", "--sac-batch-size", "512", "--tau", "0.05", "--actor-delay", "200",
    "--alpha-lr", "3e-3", "--buffer-size", "300000", "--checkpoint-every", "100000", "--iterations", "100000",
    "--no-progress", "--seed", "0",
]
CONFIGS = {
    "k10-last": ["--top-k", "10", "--fallback", "last", "--kl-coef", "0.1"],
    "k40-last": ["--top-k", "40", "--fallback", "last", "--kl-coef", "0.1"],
    "k40-last-kl05": ["--top-k", "40", "--fallback", "last", "--kl-coef", "0.5"],
    "k40-first": ["--top-k", "40", "--fallback", "first", "--kl-coef", "0.1"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(PROMPTS), help="training prompts (default: SafeRLHF train)")
    parser.add_argument("--validation", type=int, default=200,
                        help="the last N prompts are held out for validation (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=25000,
                        help="train on the first N prompts (default: %(default)s, as the shipped agent)")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time per configuration")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--model", default="smollm2", help="base model (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: mara-hf's default)")
    parser.add_argument("--threads", type=int, default=3, help="torch CPU threads per run")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "evals").mkdir(parents=True, exist_ok=True)
    prompts = json.loads(Path(args.prompts).read_text())
    train_count = min(args.limit, len(prompts) - args.validation)
    validation = out / "validation.json"
    validation.write_text(json.dumps(prompts[len(prompts) - args.validation:]))
    cli = [sys.executable, "-m", "mara_hf.cli"]
    device = ["--model", args.model] + (["--device", args.device] if args.device else [])

    def start(command: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    started = time.time()
    runs = {
        name: start(cli + ["train", "--prompts", args.prompts, "--limit", str(train_count), *COMMON, *CONFIGS[name],
                           "--out", str(out / "runs" / name), "--threads", str(args.threads),
                           "--time-limit", str(args.minutes), *device], out / "runs" / f"{name}.log")
        for name in args.configs
    }
    for name, process in runs.items():
        if process.wait() != 0:
            print(f"{name}: training failed, see {out / 'runs' / f'{name}.log'}")
    print(f"training: {time.time() - started:.0f} s")
    evals = {
        name: start(cli + ["eval", "--prompts", str(validation), "--reward", "vader", "--agent",
                           str(out / "runs" / name / "agent"), "--batch-size", "50", "--out",
                           str(out / "evals" / name), *device], out / "evals" / f"{name}.log")
        for name in args.configs if (out / "runs" / name / "agent").is_dir()
    }
    for name, process in evals.items():
        process.wait()
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        results_path = out / "evals" / name / "results.json"
        if not results_path.exists():
            print(f"{name}: evaluation failed, see {out / 'evals' / f'{name}.log'}")
            continue
        results = json.loads(results_path.read_text())
        vader, kl = results["rewards"]["vader"], results["kl_per_token"]
        print(f"{name}: {len(metrics)} rollouts, {metrics[-1]['updates']} updates; validation gain "
              f"{vader['gain']:+.1f} ({vader['wins']}/{vader['ties']}/{vader['losses']}), VADER "
              f"{vader['mean_base']:.3f} -> {vader['mean_mara']:.3f}, KL/token {kl['mara']:.2f} "
              f"(base {kl['base_reference']:.2f})")


if __name__ == "__main__":
    main()
