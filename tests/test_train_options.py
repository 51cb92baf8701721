"""Training hyperparameters declared once (`TrainConfig`, `SACConfig` field metadata): `mara-hf train`'s options are
generated from them with the flags and defaults they always had, parse back to the same configs, turn configs back
into options for the sweep script, and name the flag of a bad value."""

import argparse
import dataclasses
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from mara_hf import MaraAgent
from mara_hf.commands.train import SAC_PREFIX, add_train_arguments
from mara_hf.options import _hyperparameters, config_from_args, config_to_argv
from mara_hf.train import SACConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--prompts", "p.json", "--reward", "vader", "--out", "run"]


def parse(argv):
    args = add_train_arguments(argparse.ArgumentParser(prog="mara-hf train")).parse_args(REQUIRED + list(argv))
    return config_from_args(TrainConfig, args, sac=config_from_args(SACConfig, args, prefix=SAC_PREFIX))


def test_no_options_give_the_default_configs():
    assert parse([]) == TrainConfig()
    assert parse([]).sac == SACConfig()


def test_every_flag_of_earlier_releases_keeps_its_name_and_meaning():
    config = parse(["--iterations", "7", "--batch-size", "3", "--max-new-tokens", "9", "--kl-coef", "0.5",
                    "--top-k", "10", "--top-p", "0.9", "--fallback", "first", "--updates-per-rollout", "2",
                    "--learning-starts", "5", "--checkpoint-every", "4", "--seed", "3", "--hidden-sizes", "8", "4",
                    "--initial-accept", "0.7", "--schedule", "1", "4", "--lr", "1e-3", "--sac-batch-size", "32",
                    "--gamma", "0.9", "--tau", "0.1", "--buffer-size", "1000", "--initial-alpha", "0.2",
                    "--target-entropy", "0.3", "--max-grad-norm", "2", "--actor-delay", "6", "--no-autotune"])
    assert config == TrainConfig(
        iterations=7, rollout_batch_size=3, max_new_tokens=9, kl_coef=0.5, top_k=10, top_p=0.9, fallback="first",
        updates_per_rollout=2, learning_starts=5, checkpoint_every=4, seed=3, hidden_sizes=(8, 4),
        initial_accept=0.7, schedule=(1, 4),
        sac=SACConfig(actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3, batch_size=32, gamma=0.9, tau=0.1,
                      buffer_size=1000, initial_alpha=0.2, target_entropy=0.3, max_grad_norm=2.0, autotune=False,
                      actor_delay=6))
    # --actor-lr / --alpha-lr override --lr; --initial-accept 0 is the plain random initialisation
    config = parse(["--lr", "1e-3", "--alpha-lr", "3e-3", "--initial-accept", "0"])
    assert (config.sac.critic_lr, config.sac.actor_lr, config.sac.alpha_lr) == (1e-3, 1e-3, 3e-3)
    assert config.initial_accept is None
    assert parse(["--actor-lr", "5e-4"]).sac.actor_lr == 5e-4 and parse(["--actor-lr", "5e-4"]).sac.critic_lr == 3e-4
    assert parse(["--reject-cost", "0.01"]).reject_cost == 0.01
    assert parse(["--discount", "token"]).sac.discount == "token" and parse([]).sac.discount == "decision"
    assert parse(["--min-p", "0.25"]).min_p == 0.25 and parse([]).min_p == 0.0


def parsed_train_command(command: str) -> tuple[argparse.Namespace, TrainConfig]:
    argv = shlex.split(command.replace("\\\n", " "))[2:]
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(argv)
    return args, config_from_args(TrainConfig, args, sac=config_from_args(SACConfig, args, prefix=SAC_PREFIX))


def test_the_readme_training_commands_still_parse():
    """The shipped agents' training commands in the README: `smollm2-vader`'s gives the config the sweep script
    declares for it, `smollm2-fluent`'s and `smollm2-steady`'s the ones their config.json files record."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(mara-hf train --prompts [^\n]*--limit 25000[^`]*?)\n```", readme, re.S)
    by_out = {command.split("--out ")[1].split()[0]: command for command in commands}

    args, config = parsed_train_command(by_out["runs/k40-first"])
    sweep = load_sweep()
    reward, declared = sweep.CONFIGS["k40-first"]
    assert args.reward == reward
    assert dataclasses.replace(config, iterations=declared.iterations,
                               checkpoint_every=declared.checkpoint_every) == declared

    args, config = parsed_train_command(by_out["runs/k40-first-fluency-kl02-rc01-token"])
    recorded = MaraAgent.from_pretrained("smollm2-fluent").training_info.split("`")[1]
    recorded_args, recorded_config = parsed_train_command(recorded.replace("saferlhf_train.json",
                                                                           "data/prompts/saferlhf_train.json"))
    assert (args.reward, config) == (recorded_args.reward, recorded_config) and args.reward == "10*vader+10*fluency"

    args, config = parsed_train_command(by_out["runs/k40-first-fluency-kl02-rc01-dep05-rep05-token-probed"])
    recorded_args, recorded_config = parsed_train_command(
        MaraAgent.from_pretrained("smollm2-steady").training_info.split("`")[1])
    assert (args.reward, config) == (recorded_args.reward, recorded_config)
    assert (config.deployed_share, config.repeat_cost, config.probe_threshold) == (0.5, 0.5, 0.2)


def load_sweep():
    spec = importlib.util.spec_from_file_location("train_sweep", ROOT / "benchmarks" / "train_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_turn_into_options_and_back():
    unusual = TrainConfig(iterations=3, rollout_batch_size=5, kl_coef=0.25, reject_cost=0.02, top_k=7, top_p=0.8,
                          fallback="first", schedule=(1, 3), hidden_sizes=(12, 6), initial_accept=None, seed=4,
                          sac=SACConfig(critic_lr=1e-3, actor_lr=2e-4, alpha_lr=1e-3, batch_size=64, tau=0.5,
                                        target_entropy=0.1, autotune=False, actor_delay=3))
    argv = config_to_argv(unusual)
    assert "--no-autotune" in argv and argv[argv.index("--initial-accept") + 1] == "0"
    assert "--alpha-lr" not in argv  # equal to --lr, which it follows
    assert parse(argv) == unusual
    assert config_to_argv(TrainConfig()) == []
    for name, (reward, config) in load_sweep().CONFIGS.items():
        assert parse(config_to_argv(config)) == config, name
    with pytest.raises(ValueError, match=r"`max_grad_norm` = None has no command-line spelling \(--max-grad-norm\)"):
        config_to_argv(SACConfig(max_grad_norm=None))


def test_sweep_runs_every_configuration_once_per_seed():
    sweep = load_sweep()
    recipe = "k40-first-fluency10-token-dep05-rep05"
    assert sweep.planned_runs(["k40-first", recipe]) == {"k40-first": ("k40-first", None), recipe: (recipe, None)}
    assert sweep.planned_runs([recipe], [0, 2]) == {f"{recipe}-seed0": (recipe, 0), f"{recipe}-seed2": (recipe, 2)}
    assert sweep.parse_args(["--out", "x", "--seeds", "0", "2"]).seeds == [0, 2]
    reward, config = sweep.CONFIGS[recipe]
    assert sweep.train_options(recipe) == ["--reward", reward, *config_to_argv(config), "--no-progress"]
    seeded = sweep.train_options(recipe, seed=2)
    assert parse(seeded[2:-1]) == dataclasses.replace(config, seed=2)
    # validated under VADER and the run's own reward, unless that is VADER scaled (the same wins and losses)
    assert sweep.eval_rewards(recipe) == ["vader", "10*vader+10*fluency"]
    assert sweep.eval_rewards("k40-first") == ["vader"]


def test_help_is_generated_from_the_declarations():
    text = add_train_arguments(argparse.ArgumentParser(prog="mara-hf train")).format_help()
    flat = " ".join(text.split())
    for config_class in (TrainConfig, SACConfig):
        for field, _, _ in _hyperparameters(config_class):
            assert " ".join(field.metadata["help"].split()) in flat, field.name
    for flag in ("--batch-size", "--lr", "--sac-batch-size", "--no-autotune", "--reject-cost", "--hidden-sizes"):
        assert flag in text
    assert "--reject-cost REJECT_COST" in text and "(default: 0.0)" in flat
    assert "--actor-lr ACTOR_LR actor learning rate (default: --lr)" in flat
    assert "(default: 0.6 * log 2)" in flat and "(default: 1 2 4 8 16)" in flat


def test_a_bad_value_names_its_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^--tau: `tau` has to be a float in \(0, 1\], but is 2.0.$"):
        parse(["--tau", "2"])
    with pytest.raises(ValueError, match=r"^--batch-size: `rollout_batch_size` has to be a positive integer"):
        parse(["--batch-size", "0"])
    with pytest.raises(ValueError, match=r"^--reject-cost: `reject_cost` has to be a non-negative number"):
        parse(["--reject-cost", "-1"])
    with pytest.raises(ValueError, match=r"^--min-p: `min_p` has to be a float in \[0, 1\) \(0: the paper's"):
        parse(["--min-p", "1"])
    # a buffer too small to ever hold `learning_starts` transitions would train nothing, silently
    with pytest.raises(ValueError, match=r"^--learning-starts: `learning_starts` \(64\) is more than the replay buffer "
                                         r"holds \(`buffer_size` 40\): no update would ever run"):
        parse(["--learning-starts", "64", "--buffer-size", "40"])
    # --lr sets both learning rates: its bad value is named as --lr, not as the --actor-lr the user never gave
    with pytest.raises(ValueError, match=r"^--lr: `critic_lr` has to be a positive float, but is -1.0.$"):
        parse(["--lr", "-1"])
    with pytest.raises(ValueError, match=r"^--actor-lr: `actor_lr` has to be a positive float, but is -1.0.$"):
        parse(["--actor-lr", "-1"])
    from mara_hf.cli import main

    assert main(["train", "--prompts", "x.json", "--reward", "vader", "--out", str(tmp_path / "run"),
                 "--reject-cost", "-0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mara-hf train: error: --reject-cost: `reject_cost` has to be a non-negative number, but is "
                   "-0.5.")


def test_sweep_lists_its_configurations(capsys):
    load_sweep().main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(load_sweep().CONFIGS)
    fluent = next(line for line in lines if line.startswith("k40-first-fluency-rc01:"))
    assert "--reward '10*vader+5*fluency'" in fluent and "--reject-cost 0.01" in fluent


def test_sweep_validates_the_last_and_the_best_probed_actor_of_each_run(tmp_path):
    for folder in ("runs/probed/agent", "runs/probed/best_agent", "runs/plain/agent", "runs/failed"):
        (tmp_path / folder).mkdir(parents=True)
    agents = load_sweep().validated_agents(tmp_path, ["probed", "plain", "failed"])
    assert agents == {"probed": ("probed", tmp_path / "runs/probed/agent"),
                      "probed-best": ("probed", tmp_path / "runs/probed/best_agent"),
                      "plain": ("plain", tmp_path / "runs/plain/agent")}


def test_sweep_summary_reports_the_gain_per_changed_token():
    """A validated agent's line also gives the share of tokens that differ from the top-1 and the run's own reward
    gain per percent of them (VADER's for a VADER run), read from a committed `mara-hf eval` results.json."""
    sweep = load_sweep()
    results = json.loads((ROOT / "benchmarks" / "eval" / "smollm2-steady" / "min-p" / "threshold"
                          / "validation_t0.1_results.json").read_text())
    card = "10*vader+10*fluency"
    changed = 100 * results["agent"]["changed_rate"]
    line = sweep.summary("run", results, ["vader", card])
    assert line.startswith("run; validation gain +14.0 (")
    assert f", {card} gain +14.0," in line and "fallback rate 1.3%, 1.73 forwards per step" in line
    assert line.endswith(f"changed tokens {changed:.1f}% ({14.0 / changed:.2f} points of {card} gain per percent)")
    assert f"({results['rewards']['vader']['gain'] / changed:.2f} points of vader gain" in sweep.summary(
        "run", results, ["vader"])
    unchanged = {**results, "agent": {**results["agent"], "changed_rate": 0.0}}
    assert sweep.summary("run", unchanged, ["vader"]).endswith(
        "changed tokens 0.0% (n/a points of vader gain per percent)")
