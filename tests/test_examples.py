"""The offline scripts of examples/ run as their docstrings say (smaller settings), each in its own process.

`examples/mara_agents_hub.py` needs the Hub (a released agent and its 7B base model) and is not run here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_drop_in(tmp_path):
    out = run_example("drop_in.py", "--max-new-tokens", "8", cwd=tmp_path)
    assert "MaraStats(tokens=8," in out


def test_fused_checks_itself_against_the_drop_in_and_the_mixin(tmp_path):
    out = run_example("fused.py", "--max-new-tokens", "8", cwd=tmp_path)
    assert "fused == drop-in: True" in out and "mixin == fused: True" in out


def test_train_smollm2_trains_saves_and_decodes(tmp_path):
    pytest.importorskip("vaderSentiment")
    out = run_example("train_smollm2.py", "--iterations", "1", "--out", "run", cwd=tmp_path)
    assert "agent saved to run/agent" in out
    assert json.loads((tmp_path / "run" / "agent" / "config.json").read_text())["state_dim"] == 576


def test_eval_prompt_file_writes_its_results(tmp_path):
    pytest.importorskip("vaderSentiment")
    out = run_example("eval_prompt_file.py", "--limit", "2", "--max-new-tokens", "8", "--out", "ev", cwd=tmp_path)
    assert "wrote results.json" in out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["n_prompts"] == 2 and "vader" in results["rewards"]
