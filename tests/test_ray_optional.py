"""Ray is optional: the single-process commands never import it, and a `--ray-*` option without it installed fails in
one line that names the extra to install (these tests hide Ray, so they run whether it is installed or not)."""

import json
import subprocess
import sys

import pytest

from mara_hf.distributed import MissingRayError, RayConfig, import_ray

MESSAGE = ('--ray-workers needs Ray, which is not installed: pip install "mara-hf[ray]" (from a checkout: '
           'pip install -e ".[ray]").')


def test_the_single_process_commands_do_not_import_ray():
    check = ("import sys, mara_hf, mara_hf.cli, mara_hf.commands.train, mara_hf.commands.eval, mara_hf.distributed; "
             "mara_hf.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_without_ray_a_ray_option_names_the_extra(monkeypatch, tmp_path, capsys):
    from mara_hf.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingRayError, match=r"^--ray-workers needs Ray"):
        import_ray()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "hi"}]))
    for command in (["train", "--prompts", str(prompts), "--reward", "vader", "--out", str(tmp_path / "run")],
                    ["eval", "--prompts", str(prompts), "--reward", "vader", "--out", str(tmp_path / "eval")]):
        assert main(command + ["--ray-workers", "2"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"mara-hf {command[0]}: error: {MESSAGE}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("values,message", [
    (dict(workers=-1), "`workers` has to be a non-negative integer, but is -1."),
    (dict(num_cpus=-0.5), "`num_cpus` has to be a non-negative number, but is -0.5."),
    (dict(num_gpus=float("inf")), "`num_gpus` has to be a non-negative number, but is inf."),
    (dict(address=" "), "`address` has to be a Ray address such as 'auto', but is ' '."),
])
def test_ray_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=f"^{__import__('re').escape(message)}$"):
        RayConfig(**values)


def test_a_bad_ray_option_names_its_flag(tmp_path, capsys):
    from mara_hf.cli import main

    assert main(["eval", "--prompts", "p.json", "--reward", "vader", "--ray-workers", "-2"]) == 2
    assert capsys.readouterr().err.strip() == ("mara-hf eval: error: --ray-workers: `workers` has to be a "
                                              "non-negative integer, but is -2.")


@pytest.mark.parametrize("name", ["mara_hf.distributed.config", "mara_hf.distributed.training", "mara_hf.options",
                                  "mara_hf.train.rollout"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
