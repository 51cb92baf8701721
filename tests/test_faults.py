"""Bad input and faults (issue 13): every damaged file a one-line error naming it, NaN agents refused, training
resume that never duplicates or stalls, and the agent on the Hub mixin's own hooks (issue 14)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin

from conftest import decisive_agent
from mara_hf import MaraAgent
from mara_hf.agent import SHIPPED_AGENTS
from mara_hf.cli import main
from mara_hf.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from test_train import even_token_rate, make_trainer, small_config, word_prompts, word_tokenizer


def saved_agent(path, **settings):
    agent = decisive_agent(state_dim=8, seed=3)
    for name, value in settings.items():
        setattr(agent, name, value)
    agent.save_pretrained(path)
    return agent


def one_error_line(capsys, command: str) -> str:
    """The one error line the command printed last (progress lines such as "model: ... (loading...)" may come first)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"mara-hf {command}: error: "), err
    assert err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------------------- agent files
@pytest.mark.parametrize("damage", ["third", "empty", "garbage"])
def test_damaged_native_weights_are_one_line_errors(tmp_path, capsys, damage):
    saved_agent(tmp_path / "agent")
    weights = tmp_path / "agent" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"third": data[: len(data) // 3], "empty": b"", "garbage": b"\x07" * 64}[damage])
    with pytest.raises(ValueError, match=re.escape(f"'{weights}' is not a readable safetensors file")):
        MaraAgent.from_pretrained(tmp_path / "agent")
    assert main(["generate", "hi", "--agent", str(tmp_path / "agent"), "--max-new-tokens", "4"]) == 2
    line = one_error_line(capsys, "generate")
    assert str(weights) in line and "save or download the agent again" in line


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "has to hold a JSON object of agent settings (state_dim, hidden_sizes, ...), but holds a JSON list"),
    ('{"state_dim": 8, "top_k": ', "is not valid JSON (Expecting value: line 1 column 27 (char 26))"),
    ('{"hidden_sizes": [4, 4]}', "is not a MARA agent config: it has no 'state_dim'"),
    ('{"state_dim": 8, "top_k": 0}', "is not a valid MARA agent config: `top_k` has to be a strictly positive integer"),
    ('{"state_dim": 8, "hidden_sizes": 5}', "is not a valid MARA agent config: 'int' object is not iterable"),
])
def test_bad_config_json_names_the_file(tmp_path, capsys, content, message):
    saved_agent(tmp_path / "agent")
    config = tmp_path / "agent" / "config.json"
    config.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"'{config}' {message}")):
        MaraAgent.from_pretrained(tmp_path / "agent")
    assert main(["generate", "hi", "--agent", str(tmp_path / "agent")]) == 2
    assert str(config) in one_error_line(capsys, "generate")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    saved_agent(tmp_path / "agent")
    config = json.loads((tmp_path / "agent" / "config.json").read_text())
    (tmp_path / "agent" / "config.json").write_text(json.dumps({**config, "hidden_sizes": [16, 16]}))
    weights = tmp_path / "agent" / "model.safetensors"
    with pytest.raises(ValueError, match=re.escape(
            f"'{weights}' does not fit its config.json (state size 8, hidden sizes [16, 16]): 'linear1.weight' has "
            "shape [1024, 8], expected [16, 8].")):
        MaraAgent.from_pretrained(tmp_path / "agent")


def poison(agent: MaraAgent, value: float) -> MaraAgent:
    with torch.no_grad():
        agent.output_linear.weight[0, 0] = value
    return agent


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_weights_that_are_not_floating_point_are_refused_at_load(tmp_path, dtype):
    from safetensors.torch import save_file

    agent = decisive_agent(state_dim=8)
    agent.save_pretrained(tmp_path / "native")
    state = {k: v.to(dtype) if k == "linear1.weight" else v for k, v in agent.state_dict().items()}
    save_file(state, tmp_path / "native" / "model.safetensors")
    torch.save(state, tmp_path / "int_actor.pth")
    for source in (tmp_path / "native", tmp_path / "int_actor.pth"):
        with pytest.raises(ValueError, match=re.escape(f"holds weights that are not floating point (linear1.weight "
                                                       f"({dtype}))")):
            MaraAgent.from_pretrained(source)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, capsys, value):
    poison(decisive_agent(state_dim=8), value).save_pretrained(tmp_path / "native")
    weights = tmp_path / "native" / "model.safetensors"
    message = re.escape(f"'{weights}' holds NaN or infinite weights (in output_linear.weight)")
    with pytest.raises(ValueError, match=message):
        MaraAgent.from_pretrained(tmp_path / "native")

    pth = tmp_path / "nan_actor.pth"
    torch.save(poison(decisive_agent(state_dim=8), value).state_dict(), pth)
    with pytest.raises(ValueError, match=re.escape(f"'{pth}' holds NaN or infinite weights (in output_linear.weight)")):
        MaraAgent.from_pretrained(str(pth))
    # converting refuses too, and writes nothing
    assert main(["convert", str(pth), str(tmp_path / "converted"), "--base-model", "x"]) == 2
    assert "holds NaN or infinite weights" in one_error_line(capsys, "convert")
    assert not (tmp_path / "converted").exists()


def test_pth_with_inconsistent_shapes_is_named(tmp_path):
    state = decisive_agent(state_dim=8).state_dict()
    state["linear2.weight"] = torch.zeros(256, 7)
    torch.save(state, tmp_path / "odd_actor.pth")
    with pytest.raises(ValueError, match=re.escape(
            f"'{tmp_path / 'odd_actor.pth'}' does not fit the sizes read from its tensors (state size 8, hidden "
            "sizes [1024, 256]): 'linear2.weight' has shape [256, 7], expected [256, 1024].")):
        MaraAgent.from_original_pth(tmp_path / "odd_actor.pth")


def test_missing_relative_agent_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(
            "No agent folder 'runs/vader': the folder 'runs' exists here but has no 'vader' (read as a local path, "
            "not as a Hub repo id); check the path.")):
        MaraAgent.from_pretrained("runs/vader")
    assert main(["generate", "hi", "--agent", "runs/vader"]) == 2
    assert "No agent folder 'runs/vader'" in one_error_line(capsys, "generate")
    # when it could be either, the message says both
    with pytest.raises(OSError, match=re.escape("('org/agent' is not a local folder either)")):
        MaraAgent.from_pretrained("org/agent")
    shipped = r"nor a shipped agent \(smollm2-demo, smollm2-fluent, smollm2-steady, smollm2-vader\)"
    with pytest.raises(FileNotFoundError, match=shipped):
        MaraAgent.from_pretrained("smollm2-vadr")


# ---------------------------------------------------------------------------------------------- hub mixin hooks
def test_shipped_agents_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("smollm2-vader", "smollm2-fluent", "smollm2-steady", "smollm2-demo"):
        by_name = MaraAgent.from_pretrained(name)
        by_path = MaraAgent.from_pretrained(SHIPPED_AGENTS / name)
        assert by_name.config == by_path.config
        assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values()))
    # a local folder of that name is what the user means
    saved_agent(tmp_path / "smollm2-vader", base_model="mine")
    assert MaraAgent.from_pretrained("smollm2-vader").base_model == "mine"


def test_shipped_config_records_no_machine_path():
    for name in ("smollm2-vader", "smollm2-fluent", "smollm2-steady", "smollm2-demo"):
        text = (SHIPPED_AGENTS / name / "config.json").read_text()
        assert not re.search(r"(?<![\w.])/(tmp|home|root|work|Users|var)/", text), name
    training = json.loads((SHIPPED_AGENTS / "smollm2-vader" / "config.json").read_text())["training"]
    assert "--prompts saferlhf_train.json" in training and "--out runs/k40-first" in training


def test_config_keeps_the_key_training_and_the_mixin_hooks_load_and_save(tmp_path):
    agent = decisive_agent(state_dim=8, seed=1)
    agent.training_info = "by hand"
    agent.fallback = "last"  # changed after construction: the saved config follows the agent, not its __init__
    agent.save_pretrained(tmp_path / "agent")
    config = json.loads((tmp_path / "agent" / "config.json").read_text())
    assert config["training"] == "by hand" and "training_info" not in config and config["fallback"] == "last"
    assert sorted(os.listdir(tmp_path / "agent")) == ["README.md", "config.json", "model.safetensors"]

    # config.json files written before the rename (key `training`) load, and `training=` still overrides it
    loaded = MaraAgent.from_pretrained(tmp_path / "agent")
    assert loaded.training_info == "by hand" and loaded.training is False  # nn.Module's flag is untouched (eval)
    assert MaraAgent.from_pretrained(tmp_path / "agent", training="other").training_info == "other"
    with pytest.raises(TypeError, match=re.escape("Unknown agent setting(s) ['colour']: the keyword arguments")):
        MaraAgent.from_pretrained(tmp_path / "agent", colour="red")

    # the mixin's own public from_pretrained reaches the same agent through the `_from_pretrained` hook
    via_mixin = PyTorchModelHubMixin.from_pretrained.__func__(MaraAgent, str(tmp_path / "agent"))
    assert isinstance(via_mixin, MaraAgent) and via_mixin.config == loaded.config
    assert all(torch.equal(a, b) for a, b in zip(via_mixin.state_dict().values(), agent.state_dict().values()))


def test_model_card_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The usage example of a saved agent's card, executed as it stands, from the folder above the agent."""
    from conftest import tiny_model

    monkeypatch.chdir(tmp_path)
    tiny_model().save_pretrained("tiny-lm")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained("tiny-lm")
    agent = decisive_agent(state_dim=32)
    agent.base_model = "tiny-lm"
    agent.save_pretrained("my-agent")
    card = (tmp_path / "my-agent" / "README.md").read_text()
    code = re.search(r"```python\n(.+?)```", card, re.S).group(1)
    assert 'MaraAgent.from_pretrained("my-agent")' in code and 'from_pretrained("tiny-lm")' in code
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_shipped_cards_examples_run_as_written(smollm2, monkeypatch, capsys):
    """The shipped cards load the agent by name (works after `pip install`, not only from a checkout) and the
    offline SmolLM2; run with 8 new tokens instead of 64 to stay fast, reusing the session's SmolLM2."""
    import mara_hf.models

    monkeypatch.setattr(mara_hf.models, "load_base_model", lambda name: smollm2 if name == "smollm2" else None)
    codes = {}
    for name in ("smollm2-vader", "smollm2-fluent", "smollm2-steady", "smollm2-demo"):
        card = (SHIPPED_AGENTS / name / "README.md").read_text()
        codes[name] = re.search(r"```python\n(.+?)```", card, re.S).group(1)
        assert f'MaraAgent.from_pretrained("{name}")' in codes[name] and "mara_hf/agents" not in card
        # a card's evaluation commands evaluate its own agent, not whichever is the default
        evals = [line for line in card.splitlines() if line.startswith("mara-hf eval ")]
        assert all(f"--agent {name} " in line for line in evals), name
    for name in ("smollm2-fluent", "smollm2-steady", "smollm2-demo"):
        assert codes[name] == codes["smollm2-vader"].replace("smollm2-vader", name)
    code = codes["smollm2-vader"]
    assert code.count("max_new_tokens=64") == 2
    exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=8"), "README.md", "exec"), {})
    processor_answer, fused_answer = capsys.readouterr().out.strip().split("\n")[-2:]
    assert processor_answer == fused_answer and processor_answer.strip()


# ---------------------------------------------------------------------------------------------- training runs
def checkpointed_run(tmp_path, iterations=4):
    run = tmp_path / "run"
    make_trainer(run, small_config(iterations=iterations)).train()  # checkpoints at 2 and 4
    return run, run / "checkpoints" / "step-0000004"


def truncate(path, fraction=0.5):
    os.truncate(path, int(path.stat().st_size * fraction))


@pytest.mark.parametrize("file, problem", [
    ("trainer.safetensors", "is not a readable safetensors file"),
    ("trainer.json", "is not valid JSON"),
    ("agent/model.safetensors", "is not a readable safetensors file"),
    ("agent/config.json", "is not valid JSON"),
])
def test_damaged_checkpoint_names_the_file_and_the_previous_checkpoint(tmp_path, file, problem):
    run, step4 = checkpointed_run(tmp_path)
    truncate(step4 / file)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as info:
        make_trainer(run, small_config(iterations=6)).train()
    message = str(info.value)
    assert message.startswith("Checkpoint 'step-0000004' cannot be read: ") and "\n" not in message
    assert f"'{step4 / file}' {problem}" in message
    assert message.endswith(f"To go on, delete the folder '{step4}' and run again to resume from the previous "
                            "checkpoint, 'step-0000002'.")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the run folder is as it was


def test_deleting_a_damaged_checkpoint_resumes_from_the_previous_one_exactly(tmp_path):
    config = small_config(iterations=6)
    whole = make_trainer(tmp_path / "whole", config).train()
    run, step4 = checkpointed_run(tmp_path)
    truncate(step4 / "trainer.safetensors")
    with pytest.raises(CheckpointError):
        make_trainer(run, config).train()
    shutil.rmtree(step4)  # what the message says
    assert latest_checkpoint(run / "checkpoints").name == "step-0000002"
    resumed = make_trainer(run, config).train()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_damaged_only_checkpoint_says_how_to_start_over(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, small_config(iterations=2)).train()
    truncate(run / "checkpoints" / "step-0000002" / "trainer.json")
    with pytest.raises(CheckpointError, match=re.escape(
            f"To go on, delete the folder '{run / 'checkpoints'}' to start the run over, or use another output "
            "folder.")):
        make_trainer(run, small_config(iterations=4)).train()


def test_latest_pointer_that_is_damaged_or_names_a_deleted_folder(tmp_path):
    agent = MaraAgent(state_dim=4, hidden_sizes=(8, 8))
    for step in (1, 2):
        save_checkpoint(tmp_path, f"step-{step:07d}", agent, {"step": step})
    (tmp_path / "latest").write_text("")  # emptied
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    (tmp_path / "latest").write_text("step-0000009\n")  # names a folder that was deleted
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    (tmp_path / "latest").write_text("step-0000002\n")
    (tmp_path / "step-0000002" / "trainer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(
            "Checkpoint 'step-0000002' cannot be read: it lacks trainer.safetensors. To go on, delete the folder "
            f"'{tmp_path / 'step-0000002'}' and run again to resume from the previous checkpoint, 'step-0000001'.")):
        latest_checkpoint(tmp_path)
    shutil.rmtree(tmp_path / "step-0000002")
    assert latest_checkpoint(tmp_path).name == "step-0000001"


def test_cli_train_damaged_checkpoint_is_one_line(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    from conftest import tiny_model

    tiny_model().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in word_prompts(6)]))
    out = tmp_path / "run"
    args = ["train", "--prompts", str(prompts), "--reward", "py:test_train:even_token_rate", "--model", str(model_dir),
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--learning-starts", "1",
            "--updates-per-rollout", "1", "--sac-batch-size", "4", "--hidden-sizes", "8", "8",
            "--checkpoint-every", "1", "--no-progress", "--device", "cpu"]
    assert main(args + ["--iterations", "2"]) == 0
    capsys.readouterr()
    truncate(out / "checkpoints" / "step-0000002" / "trainer.safetensors")
    assert main(args + ["--iterations", "3"]) == 2
    line = one_error_line(capsys, "train")
    assert "trainer.safetensors" in line and "'step-0000001'" in line


def killed_in_iteration(n):
    calls = {"n": 0}

    def reward(prompts, responses):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return even_token_rate(prompts, responses)

    return reward


def metric_iterations(run):
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_restart_without_a_checkpoint_leaves_no_old_metric_lines(tmp_path):
    config = small_config(iterations=3, checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, config, killed_in_iteration(3)).train()  # two iterations logged, no checkpoint
    assert metric_iterations(tmp_path) == [1, 2] and latest_checkpoint(tmp_path / "checkpoints") is None
    make_trainer(tmp_path, config).train()
    assert metric_iterations(tmp_path) == [1, 2, 3]
    # files already holding the duplicates keep the last line of each iteration
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2] + lines) + "\n")
    make_trainer(tmp_path, small_config(iterations=4, checkpoint_every=10)).train()
    assert metric_iterations(tmp_path) == [1, 2, 3, 4]
    # a fresh run (resume=False) in a folder without checkpoints does not keep old lines either
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text('{"iteration": 1, "reward": 0.5}\n')
    make_trainer(tmp_path / "fresh", small_config(iterations=1, checkpoint_every=10)).train(resume=False)
    assert metric_iterations(tmp_path / "fresh") == [1]
    assert json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text())["reward"] != 0.5


def test_half_written_last_metric_line_does_not_block_resume(tmp_path):
    config = small_config(iterations=6)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, config, killed_in_iteration(6)).train()  # checkpoint at 4, lines 1-5
    metrics = tmp_path / "metrics.jsonl"
    data = metrics.read_bytes()
    metrics.write_bytes(data[: len(data) - 40])  # killed while writing line 5
    make_trainer(tmp_path, config).train()
    assert metric_iterations(tmp_path) == [1, 2, 3, 4, 5, 6]

    # a damaged line in the middle is named, and the file is left alone
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:30]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"Line 3 of '{metrics}' is not a metrics record")):
        make_trainer(tmp_path, small_config(iterations=7)).train()
    assert metrics.read_text() == "\n".join(lines) + "\n"


def test_checkpoints_and_agents_follow_the_umask(tmp_path):
    """Every file, the safetensors ones included (safetensors' own writer makes them owner-only)."""
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, "step-0000001", MaraAgent(state_dim=4, hidden_sizes=(8, 8)), {"t": torch.ones(2)})
        MaraAgent(state_dim=4, hidden_sizes=(8, 8)).save_pretrained(tmp_path / "agent")
    finally:
        os.umask(previous)
    paths = [tmp_path / "step-0000001", tmp_path / "latest", *(tmp_path / "step-0000001").rglob("*"),
             *(tmp_path / "agent").iterdir()]
    assert {p.name for p in paths} >= {"trainer.json", "trainer.safetensors", "model.safetensors", "config.json"}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path.name, oct(mode))  # group and others can read


@pytest.mark.parametrize(("command", "folder"), [("train", "run folder"), ("eval", "results folder")])
def test_cli_out_that_is_a_file_is_refused_before_loading(command, folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "hi"}]))
    (tmp_path / "taken").write_text("not a folder")
    base = [command, "--prompts", str(prompts), "--reward", "vader", "--model", str(tmp_path / "no-such-model")]
    assert main(base + ["--out", str(tmp_path / "taken")]) == 2
    assert f"--out '{tmp_path / 'taken'}' is a file, not a {folder}" in one_error_line(capsys, command)
    assert main(base + ["--out", str(tmp_path / "taken" / "out")]) == 2
    assert f"'{tmp_path / 'taken'}' is a file" in one_error_line(capsys, command)
    assert (tmp_path / "taken").read_text() == "not a folder"
    if command == "train":
        assert main(base + ["--out", str(tmp_path / "run"), "--threads", "0"]) == 2
        assert "--threads has to be at least 1" in one_error_line(capsys, command)


def test_export_custom_generate_again_keeps_one_card_section_and_a_broken_card_changes_nothing(tmp_path):
    from mara_hf import export_custom_generate
    from mara_hf.hub import SECTION_TITLE

    folder = tmp_path / "agent"
    saved_agent(folder)
    export_custom_generate(folder)  # local use first: the folder's absolute path
    export_custom_generate(folder, "org/mara-agent")  # then for the Hub repo it will be pushed to
    card = (folder / "README.md").read_text()
    assert card.count(SECTION_TITLE) == 1 and 'custom_generate="org/mara-agent"' in card
    assert str(folder.resolve()) not in card
    assert "AGENT_SOURCE = 'org/mara-agent'" in (folder / "custom_generate" / "generate.py").read_text()

    broken = tmp_path / "broken"
    saved_agent(broken)
    (broken / "README.md").write_text("---\ntags: [a\n---\ntext\n")
    with pytest.raises(ValueError, match="README.md' is not a model card whose header parses .* fix or remove its "
                                         "YAML header"):
        export_custom_generate(broken)
    assert not (broken / "custom_generate").exists()
    assert (broken / "README.md").read_text() == "---\ntags: [a\n---\ntext\n"
