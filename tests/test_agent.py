"""Loading and saving agents: original .pth actors, the native format, the Hub (through a local cache)."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import decisive_agent, random_prompts, tiny_model
from mara_hf import MaraAgent, MaraLogitsProcessor
from mara_hf.agent import ORIGINAL_KEYS, shipped_agent_names


def original_actor(path, state_dim=32, seed=0):
    """An actor file exactly as the original MARA code saves it: a plain state dict of fp32 tensors."""
    agent = decisive_agent(state_dim=state_dim, seed=seed, reject_bias=9.0)
    state = {k: v.clone() for k, v in agent.state_dict().items()}
    assert set(state) == set(ORIGINAL_KEYS)
    torch.save(state, path)
    return agent


def test_architecture_matches_released_actor():
    agent = MaraAgent(state_dim=576)
    shapes = {k: tuple(v.shape) for k, v in agent.state_dict().items()}
    assert shapes == {
        "ln.weight": (576,), "ln.bias": (576,),
        "linear1.weight": (1024, 576), "linear1.bias": (1024,),
        "linear2.weight": (256, 1024), "linear2.bias": (256,),
        "output_linear.weight": (2, 256), "output_linear.bias": (2,),
    }
    states = torch.randn(2, 3, 576)
    x = torch.relu(agent.linear2(torch.relu(agent.linear1(agent.ln(states)))))
    expected = torch.softmax(agent.output_linear(x), dim=-1)
    torch.testing.assert_close(agent(states), expected)
    assert agent.accept_probability(states).shape == (2, 3)
    half = agent.accept_probability(states.to(torch.bfloat16))
    assert half.dtype == torch.float32  # computed in fp32 whatever the states' dtype


def test_original_pth_and_native_conversion_give_identical_outputs(tmp_path):
    pth = tmp_path / "llama_actor.pth"
    reference = original_actor(pth)
    agent = MaraAgent.from_pretrained(str(pth), base_model="tiny-llama")
    assert agent.state_dim == 32 and agent.source == "llama_actor.pth" and agent.base_model == "tiny-llama"
    for key, value in reference.state_dict().items():
        assert torch.equal(agent.state_dict()[key], value)

    native = tmp_path / "native"
    agent.save_pretrained(native)
    assert sorted(os.listdir(native)) == ["README.md", "config.json", "model.safetensors"]
    assert set(load_file(native / "model.safetensors")) == set(ORIGINAL_KEYS)
    config = json.loads((native / "config.json").read_text())
    assert config["state_dim"] == 32 and config["base_model"] == "tiny-llama" and config["fallback"] == "first"
    card = (native / "README.md").read_text()
    assert "MaraAgent.from_pretrained" in card and "tiny-llama" in card and "mara-hf" in card
    reloaded = MaraAgent.from_pretrained(native)

    model = tiny_model("llama")
    ids = torch.tensor([random_prompts(1, seed=5, lengths=(10,))[0]])
    outputs = [
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                       logits_processor=[MaraLogitsProcessor(a, model)])
        for a in (agent, reloaded)
    ]
    assert torch.equal(outputs[0], outputs[1])


class Malicious:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pth_that_pickles_code_is_refused(tmp_path):
    path = tmp_path / "evil_actor.pth"
    with open(path, "wb") as f:
        pickle.dump({"ln.weight": Malicious()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        MaraAgent.from_pretrained(str(path))
    torch.save({"ln.weight": torch.ones(4), "other": torch.ones(2)}, tmp_path / "odd_actor.pth")
    with pytest.raises(ValueError, match="not an original MARA actor: expected exactly the keys"):
        MaraAgent.from_pretrained(str(tmp_path / "odd_actor.pth"))


def test_missing_and_malformed_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="No MARA actor file"):
        MaraAgent.from_pretrained(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="has no 'config.json'"):
        MaraAgent.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hub repo id"):
        MaraAgent.from_pretrained("./not/here")
    with pytest.raises(ValueError, match="`filename` names an original MARA actor"):
        MaraAgent.from_pretrained("org/repo", filename="weights.bin")


def fake_hub_cache(cache_dir, repo_id, files, revision="main", commit="0" * 40):
    """Lay out files as huggingface_hub's cache stores a downloaded repo snapshot."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def test_hub_native_original_subfolder_and_revision_from_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here, be explicit
    native = tmp_path / "native"
    source = MaraAgent(state_dim=32, base_model="tiny-llama")
    source.save_pretrained(native)
    original_actor(tmp_path / "mistral_v3_2_1_actor.pth")
    cache = tmp_path / "cache"
    fake_hub_cache(cache, "org/agent", {"config.json": native / "config.json",
                                        "model.safetensors": native / "model.safetensors",
                                        "v2/config.json": native / "config.json",
                                        "v2/model.safetensors": native / "model.safetensors"})
    fake_hub_cache(cache, "IAAR-Shanghai/MARA_AGENTS",
                   {"mistral_v3_2_1_actor.pth": tmp_path / "mistral_v3_2_1_actor.pth"},
                   revision="v1", commit="1" * 40)

    agent = MaraAgent.from_pretrained("org/agent", cache_dir=cache)
    assert agent.base_model == "tiny-llama" and torch.equal(agent.linear1.weight, source.linear1.weight)
    assert MaraAgent.from_pretrained("org/agent", subfolder="v2", cache_dir=cache).state_dim == 32
    actor = MaraAgent.from_pretrained("IAAR-Shanghai/MARA_AGENTS", filename="mistral_v3_2_1_actor.pth",
                                      revision="v1", cache_dir=cache)
    assert actor.source == "mistral_v3_2_1_actor.pth"

    with pytest.raises(OSError, match="Cannot reach the Hugging Face Hub.*not in the local cache"):
        MaraAgent.from_pretrained("org/other-agent", cache_dir=cache)
    with pytest.raises(OSError, match="Cannot reach the Hugging Face Hub"):
        MaraAgent.from_pretrained("IAAR-Shanghai/MARA_AGENTS", filename="mistral_v3_2_1_actor.pth",
                                  revision="main", cache_dir=cache)


def test_bad_agent_config_values():
    with pytest.raises(ValueError, match="`state_dim` has to be a positive integer"):
        MaraAgent(state_dim=0)
    with pytest.raises(ValueError, match="`hidden_sizes` has to be two positive integers"):
        MaraAgent(state_dim=8, hidden_sizes=[16])
    with pytest.raises(ValueError, match="`fallback` has to be one of"):
        MaraAgent(state_dim=8, fallback="middle")
    with pytest.raises(ValueError, match=r"`accept_threshold` has to be a float in \(0, 1\)"):
        MaraAgent(state_dim=8, accept_threshold=1.5)
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match=r"`min_p` has to be a float in \[0, 1\) \(0: the paper's candidates"):
            MaraAgent(state_dim=8, min_p=bad)
    with pytest.raises(ValueError, match="states of size 8, but got states of size 5"):
        MaraAgent(state_dim=8).accept_probability(torch.zeros(5))


def test_accept_threshold_is_saved_and_older_configs_load_with_the_greedy_one(tmp_path):
    MaraAgent(state_dim=8, hidden_sizes=(4, 4), accept_threshold=0.2).save_pretrained(tmp_path / "calibrated")
    assert json.loads((tmp_path / "calibrated" / "config.json").read_text())["accept_threshold"] == 0.2
    assert MaraAgent.from_pretrained(tmp_path / "calibrated").accept_threshold == 0.2
    assert "accept a candidate when p(accept) > 0.2" in (tmp_path / "calibrated" / "README.md").read_text()
    MaraAgent(state_dim=8, hidden_sizes=(4, 4)).save_pretrained(tmp_path / "older")
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    del config["accept_threshold"]  # written before the threshold existed
    (tmp_path / "older" / "config.json").write_text(json.dumps(config))
    assert MaraAgent.from_pretrained(tmp_path / "older").accept_threshold == 0.5
    assert "p(accept) >" not in (tmp_path / "older" / "README.md").read_text()
    assert MaraAgent.from_pretrained("smollm2-vader").accept_threshold == 0.5


def test_min_p_is_saved_shown_and_older_configs_load_without_it(tmp_path):
    MaraAgent(state_dim=8, hidden_sizes=(4, 4), min_p=0.25).save_pretrained(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["min_p"] == 0.25
    assert MaraAgent.from_pretrained(tmp_path / "cut").min_p == 0.25
    assert MaraAgent.from_pretrained(tmp_path / "cut", min_p=0.0).min_p == 0.0
    assert "min-p 0.25 (none less probable than 0.25 x the top-1)" in (tmp_path / "cut" / "README.md").read_text()
    assert "min-p" not in MaraAgent(state_dim=8).generate_model_card().content
    for name in shipped_agent_names():  # written before min_p existed: the paper's candidate set
        assert MaraAgent.from_pretrained(name).min_p == 0.0


def test_sources_given_as_a_file_a_home_path_or_with_settings_the_actor_fixes(tmp_path, monkeypatch):
    from mara_hf.models import load_agent

    monkeypatch.setenv("HOME", str(tmp_path))
    agent = MaraAgent(state_dim=8, hidden_sizes=(16, 8))
    agent.save_pretrained(tmp_path / "native")
    actor = tmp_path / "mine_actor.pth"
    torch.save(dict(agent.state_dict()), actor)
    # `~` is the home folder, for a native folder and for a .pth actor alike
    torch.testing.assert_close(MaraAgent.from_pretrained("~/native").state_dict(), agent.state_dict())
    torch.testing.assert_close(MaraAgent.from_pretrained("~/mine_actor.pth").state_dict(), agent.state_dict())
    # a file where a folder or repo belongs is named as a file
    for source, filename in ((tmp_path / "native" / "config.json", None), (actor, "mine_actor.pth")):
        with pytest.raises(FileNotFoundError, match=r"is a file, not an agent folder or Hub repo id: pass the folder"):
            MaraAgent.from_pretrained(source, filename=filename)
    # settings: unknown ones, and the sizes an original actor's tensors give, are refused by name
    with pytest.raises(TypeError, match=r"Unknown agent setting\(s\) \['foo'\]"):
        MaraAgent.from_pretrained(actor, foo=1)
    with pytest.raises(TypeError, match=r"\['state_dim'\] cannot be overridden for an original MARA actor"):
        MaraAgent.from_pretrained(actor, state_dim=8)
    assert MaraAgent.from_pretrained(actor, base_model="org/model").base_model == "org/model"
    # --agent-file belongs to --agent's folder or repo, not to the default shipped agent
    with pytest.raises(ValueError, match="no --agent was given: add it"):
        load_agent(None, "mine_actor.pth")
