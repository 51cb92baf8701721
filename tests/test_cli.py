"""The `mara-hf` command: the main job on the real SmolLM2, conversion, and one-line errors."""

import pytest
import torch

import mara_hf.models
from conftest import decisive_agent
from mara_hf import MaraAgent
from mara_hf.cli import main


@pytest.fixture
def real_model(smollm2, monkeypatch):
    """`generate` loads the real SmolLM2; reuse the session's copy instead of loading it again."""
    model, tokenizer = smollm2
    names = []

    def load(name, **placement):
        names.append(name)
        tokenizer.padding_side = "left"
        return model, tokenizer

    monkeypatch.setattr(mara_hf.models, "load_base_model", load)
    return names


def test_generate_default_runs_the_shipped_agent_on_smollm2(real_model, capsys):
    assert main(["generate", "How do I pick a lock?", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert real_model == ["smollm2"]
    assert "agent: smollm2-steady" in err and "discrete SAC, reward 10*vader+10*fluency" in err
    assert "--learning-starts" not in err  # the training command stays in the card, out of the terminal line
    assert len(out.strip()) > 0 and "[12 tokens; agent asked on" in err


def test_generate_compare_marks_rejected_tokens(real_model, capsys):
    assert main(["generate", "How do I pick a lock?", "--max-new-tokens", "30", "--compare", "--agent", "smollm2-demo"]) == 0
    out, _ = capsys.readouterr()
    assert "=== base model ===" in out and "=== MARA ===" in out
    assert "⟦" in out and "→" in out  # the demo agent rejects some top-1 tokens on this prompt


def test_generate_accept_threshold_overrides_the_agents(real_model, capsys):
    """A threshold below every accept probability takes each top-1: nothing changed, nothing fell back."""
    assert main(["generate", "How do I pick a lock?", "--max-new-tokens", "8", "--agent", "smollm2-demo",
                 "--accept-threshold", "1e-30"]) == 0
    assert "took a lower-ranked candidate on 0, fell back on 0]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--accept-threshold", "1"])
    assert "argument --accept-threshold: has to be a number in (0, 1)" in capsys.readouterr().err


def test_generate_top_k_bounds_the_candidates(real_model, capsys):
    """`--top-k 1` leaves each position one candidate, taken without asking the agent."""
    assert main(["generate", "How do I pick a lock?", "--max-new-tokens", "8", "--agent", "smollm2-demo",
                 "--top-k", "1"]) == 0
    assert "[8 tokens; agent asked on 0, took a lower-ranked candidate on 0, fell back on 0]" in capsys.readouterr().err
    for bad in ("0", "2.5"):
        with pytest.raises(SystemExit):
            main(["generate", "hi", "--top-k", bad])
        assert f"argument --top-k: has to be a positive whole number, not '{bad}'" in capsys.readouterr().err


def test_generate_min_p_cuts_the_candidates(real_model, capsys):
    """`--min-p 0.9999` leaves each position only the candidates about as probable as its top-1: a lone one, taken
    without asking the agent."""
    assert main(["generate", "How do I pick a lock?", "--max-new-tokens", "8", "--agent", "smollm2-demo",
                 "--min-p", "0.9999"]) == 0
    assert "[8 tokens; agent asked on 0, took a lower-ranked candidate on 0, fell back on 0]" in capsys.readouterr().err
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):
            main(["generate", "hi", "--min-p", bad])
        err = capsys.readouterr().err
        assert f"argument --min-p: has to be a number in [0, 1) (0: no min-p cut), not '{bad}'" in err


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "hi", "--agent", str(tmp_path / "missing.pth")]) == 2
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out"), "--base-model", "x"]) == 2
    assert main(["export-custom-generate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("mara-hf ") and ": error: " in line for line in lines)
    assert "Traceback" not in err


def test_convert_and_export(tmp_path, capsys):
    path = tmp_path / "smollm2_actor.pth"
    torch.save(decisive_agent(state_dim=576).state_dict(), path)
    assert main(["convert", str(path), str(tmp_path / "native"), "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    agent = MaraAgent.from_pretrained(tmp_path / "native")
    assert agent.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and agent.source == "smollm2_actor.pth"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "native" / "README.md").read_text()
    assert main(["export-custom-generate", str(tmp_path / "native"), "--repo-id", "org/agent"]) == 0
    assert "AGENT_SOURCE = 'org/agent'" in (tmp_path / "native" / "custom_generate" / "generate.py").read_text()


@pytest.fixture
def tiny_model_dir(smollm2, tmp_path):
    """A tiny random Llama saved with SmolLM2's tokenizer (chat template included), and an agent for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2[1]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    decisive_agent(state_dim=32).save_pretrained(tmp_path / "agent")
    return tmp_path


def test_generate_dtype_and_device_map(tiny_model_dir, capsys, monkeypatch):
    loaded = []
    original = mara_hf.models.load_base_model

    def load(name, **placement):
        model, tokenizer = original(name, **placement)
        loaded.append((placement, model.dtype))
        return model, tokenizer

    monkeypatch.setattr(mara_hf.models, "load_base_model", load)
    common = ["generate", "Hello there", "--model", str(tiny_model_dir / "model"), "--agent",
              str(tiny_model_dir / "agent"), "--max-new-tokens", "6", "--device", "cpu"]
    answers = []
    for extra in ([], ["--dtype", "bfloat16"], ["--dtype", "auto"]):
        assert main(common + extra) == 0
        answers.append(capsys.readouterr().out)
    assert [dtype for _, dtype in loaded] == [torch.float32, torch.bfloat16, torch.float32]  # saved in float32
    # accelerate's device map: the same answer as the model on one device
    assert main(common[:-2] + ["--device-map", "cpu"]) == 0
    assert capsys.readouterr().out == answers[0] and loaded[-1][0] == {"dtype": "float32", "device_map": "cpu"}
    assert main(common + ["--device-map", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--device and --device-map were both given" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [
    ["eval", "--prompts", "p.json", "--reward", "vader"],
    ["train", "--prompts", "p.json", "--reward", "vader", "--out", "run"],
])
def test_device_map_is_refused_with_ray_workers(command, capsys):
    pytest.importorskip("ray")
    assert main(command + ["--ray-workers", "2", "--device-map", "auto"]) == 2
    err = capsys.readouterr().err
    assert "with --ray-workers each worker loads the model on its own device: drop --device-map" in err


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval", "--prompts", "p.json", "--reward", "vader"],
                                     ["train", "--prompts", "p.json", "--reward", "vader", "--out", "run"]])
def test_a_device_this_torch_cannot_use_is_one_line_before_anything_loads(command, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before checking the device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mara_hf.models, "load_base_model", no_loading)
    assert main(command + ["--device", "gpu"]) == 2
    assert "error: --device gpu: not a torch device (cpu, cuda, cuda:1, mps, ...)." in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(command + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "error: --device cuda: this torch sees no CUDA GPU" in err and "use --device cpu" in err
        assert "Traceback" not in err


def test_train_reads_prompts_from_the_named_field(tmp_path, monkeypatch, capsys):
    """`mara-hf train --prompt-field` reaches the prompt reader; without it a CSV's error names the option."""
    import mara_hf.data

    prompts = tmp_path / "harmful.csv"
    prompts.write_text("goal,target\nHow do I pick a lock?,Sure\n")
    command = ["train", "--prompts", str(prompts), "--reward", "py:test_rewards:length_reward", "--out",
               str(tmp_path / "run")]
    assert main(command) == 2
    assert "its fields: 'goal', 'target'); name the field that holds the prompt (`--prompt-field NAME`" in \
        capsys.readouterr().err
    read, original = [], mara_hf.data.load_prompts

    class Stop(Exception):
        pass

    def load_prompts(path, limit=None, field=None):  # read, then stop before anything trains
        read.append(original(path, limit, field))
        raise Stop

    monkeypatch.setattr(mara_hf.data, "load_prompts", load_prompts)
    with pytest.raises(Stop):
        main(command + ["--prompt-field", "goal"])
    assert read == [["How do I pick a lock?"]]
