"""Evaluation: base vs MARA on a prompt set, rewards, preference rate, KL, agent statistics, files, resume, and the
`mara-hf eval` entry points. A tiny random Llama with SmolLM2's vocabulary and the real SmolLM2 tokenizer keep it
fast and realistic (chat template, EOS, left padding)."""

import argparse
import copy
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mara_hf.models
from conftest import constant_agent, decisive_agent
from mara_hf import mara_generate
from mara_hf.commands.eval import add_eval_arguments, run_eval
from mara_hf.fluency import FLUENCY_DEFINITION, fluency, is_degenerate
from mara_hf.data import encode_chat_prompts
from mara_hf.evaluation import (
    INDEX_PLOT,
    RESPONSES_FILE,
    RESULTS_FILE,
    REWARDS_PLOT,
    evaluate,
    format_summary,
    summarize,
    teacher_forced_nll,
    write_plots,
)
from test_rewards import length_reward, smollm2_tokenizer, vowel_reward

PROMPTS = [
    "How do I pick a lock?",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me three tips to sleep better, please, in detail.",
    "Say hello.",
    "Explain why the sky is blue to a five year old child.",
]
REWARDS = {"length": length_reward, "vowels": vowel_reward}
SETTINGS = dict(max_new_tokens=8, batch_size=4, progress=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def agent():
    return decisive_agent(state_dim=16, seed=1, reject_bias=1.0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, model, tokenizer, agent):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=out, **SETTINGS)
    lines = [json.loads(line) for line in (out / RESPONSES_FILE).read_text().splitlines()]
    return out, results, lines


def count_generate_calls(monkeypatch, model):
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_ids").shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# results


def test_results_file_holds_the_summary(evaluated):
    out, results, _ = evaluated
    on_disk = json.loads((out / RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"n_prompts", "rewards", "kl_per_token", "agent", "fluency", "speed", "settings",
                            "settings_id", "generated_now", "reused", "files"}
    assert on_disk["n_prompts"] == len(PROMPTS) and on_disk["generated_now"] == len(PROMPTS)
    assert on_disk["settings"]["max_new_tokens"] == 8 and on_disk["settings"]["do_sample"] is False
    assert "KL(delta_y || p_base)" in on_disk["kl_per_token"]["definition"]


def test_win_tie_loss_preference_and_gain(evaluated):
    _, results, lines = evaluated
    by_index = sorted(lines, key=lambda r: r["index"])
    for name in REWARDS:
        r = results["rewards"][name]
        base = [line["rewards"]["base"][name] for line in by_index]
        mara = [line["rewards"]["mara"][name] for line in by_index]
        assert r["wins"] + r["ties"] + r["losses"] == len(PROMPTS)
        assert r["wins"] == sum(m > b for b, m in zip(base, mara))
        assert r["losses"] == sum(m < b for b, m in zip(base, mara))
        assert r["gain"] == pytest.approx(100 * (r["wins"] - r["losses"]) / len(PROMPTS))
        assert r["preference_rate"] == pytest.approx(100 * r["wins"] / len(PROMPTS))
        assert r["mean_base"] == pytest.approx(sum(base) / len(base))
        assert r["mean_mara"] == pytest.approx(sum(mara) / len(mara))
    # the rewards really scored the texts
    for line in lines:
        assert line["rewards"]["base"]["length"] == pytest.approx(len(line["base"]) / 10, rel=1e-6)
        assert line["rewards"]["mara"]["length"] == pytest.approx(len(line["mara"]) / 10, rel=1e-6)


def test_responses_lines(evaluated, tokenizer):
    _, results, lines = evaluated
    assert sorted((line["index"], line["prompt"]) for line in lines) == list(enumerate(PROMPTS))
    for line in lines:
        assert set(line) >= {"index", "prompt", "base", "mara", "rewards", "changed", "mara_marked", "tokens",
                             "nll_sum", "agent", "batch", "seconds"}
        assert 1 <= line["tokens"]["mara"] <= 8 and 1 <= line["tokens"]["base"] <= 8
        assert line["agent"]["tokens"] == line["tokens"]["mara"]
        for mark in line["changed"]:
            assert f"⟦{mark['top1']}→{mark['taken']}⟧" in line["mara_marked"]
            assert mark["top1"] != mark["taken"] or mark["taken"] == ""
    # this agent rejects top-1 tokens, so MARA changed something
    assert results["agent"]["changed_tokens"] == sum(len(line["changed"]) for line in lines) > 0
    assert results["agent"]["answers_changed"] == sum(line["mara"] != line["base"] for line in lines) > 0


def test_agent_statistics_equal_the_fused_loops_own(evaluated, model, tokenizer, agent):
    """The per-prompt counts summed over the file equal MaraStats of the same generate calls."""
    _, results, _ = evaluated
    totals = {"tokens": 0, "agent_decided": 0, "fallbacks": 0, "histogram": torch.zeros(agent.top_k, dtype=torch.long)}
    for start in range(0, len(PROMPTS), 4):
        inputs = encode_chat_prompts(tokenizer, PROMPTS[start:start + 4], "cpu")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True)
        stats = out.mara_stats
        totals["tokens"] += stats.tokens
        totals["agent_decided"] += stats.agent_decided
        totals["fallbacks"] += stats.fallbacks
        totals["histogram"] += torch.tensor(stats.accepted_index_histogram)
    summary = results["agent"]
    assert summary["tokens"] == totals["tokens"] == results["speed"]["mara_tokens"]
    assert summary["agent_decided"] == totals["agent_decided"]
    assert summary["fallbacks"] == totals["fallbacks"]
    assert summary["accepted_index_histogram"] == totals["histogram"].tolist()
    assert summary["agent_decided_rate"] == pytest.approx(totals["agent_decided"] / totals["tokens"])


def test_cost_and_fallback_rate_equal_the_fused_loops_own(tmp_path, model, tokenizer, agent):
    """Forwards per decode step / per token and the fallback rate, from MaraStats of the same generate calls (with a
    fixed chunk schedule: "auto" learns the agent across calls, so a replay would cost less)."""
    fixed = {"mara_schedule": (1, 8)}
    results = evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=tmp_path, mara_kwargs=fixed, **SETTINGS)
    lines = [json.loads(line) for line in (tmp_path / RESPONSES_FILE).read_text().splitlines()]
    forwards = steps = tokens = fallbacks = decided = 0
    for start in range(0, len(PROMPTS), 4):
        inputs = encode_chat_prompts(tokenizer, PROMPTS[start:start + 4], "cpu")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             custom_generate=mara_generate, mara_agent=agent, return_dict_in_generate=True, **fixed)
        forwards += out.mara_stats.forwards
        steps += out.sequences.shape[1] - inputs["input_ids"].shape[1]
        tokens += out.mara_stats.tokens
        fallbacks += out.mara_stats.fallbacks
        decided += out.mara_stats.agent_decided
    a = results["agent"]
    assert a["forwards"] == pytest.approx(forwards) and a["decode_steps"] == pytest.approx(steps)
    assert a["forwards_per_step"] == pytest.approx(forwards / steps) and a["forwards_per_step"] >= 1
    assert a["forwards_per_token"] == pytest.approx(forwards / tokens)
    assert a["cost_prompts"] == len(PROMPTS) and "forwards_per_step" in a["cost_definition"]
    assert a["fallback_rate"] == pytest.approx(fallbacks / decided)
    # each line carries its batch's counts (4 + 2 prompts)
    assert sorted(line["batch"]["rows"] for line in lines) == [2, 2, 4, 4, 4, 4]


def test_degenerate_answers_of_both_sides(tmp_path, evaluated):
    """The share of degenerate answers is the fluency screen's, for both sides, with its definition."""
    _, results, lines = evaluated
    fluency_summary = results["fluency"]
    assert fluency_summary["definition"] == FLUENCY_DEFINITION
    for side in ("base", "mara"):
        flagged = sum(is_degenerate(line["prompt"], line[side]) for line in lines)
        assert fluency_summary["degenerate"][side] == flagged
        assert fluency_summary["degenerate_rate"][side] == pytest.approx(flagged / len(PROMPTS))
        mean = sum(fluency(line["prompt"], line[side]) for line in lines) / len(lines)
        assert fluency_summary["mean_fluency"][side] == pytest.approx(mean)
    # a scripted file: MARA loops on one answer of two, the base model on none
    records = [dict(line, prompt=p, base=b, mara=m) for line, p, b, m in zip(
        lines, ["Why?", "How?"], ["Because it rains.", "Slowly and carefully."],
        ["Because because because because.", "Slowly and carefully."])]
    summary = summarize(records, list(REWARDS))
    assert summary["fluency"]["degenerate"] == {"base": 0, "mara": 1}
    assert summary["fluency"]["degenerate_rate"] == {"base": 0.0, "mara": 0.5}
    # files written before the cost was recorded still summarise
    old = [{k: v for k, v in line.items() if k != "batch"} for line in lines]
    assert summarize(old, list(REWARDS))["agent"]["forwards_per_step"] is None


def test_summary_sums_are_correctly_rounded_on_every_python(evaluated):
    """Float sums are exact before rounding (`math.fsum`): Python 3.11's `sum` loses the 1.0 below (1e16 + 1.0 is
    1e16 in floats), 3.12's compensated `sum` keeps it; a summary must not depend on which Python made it."""
    _, _, lines = evaluated
    name = next(iter(REWARDS))
    values = [1e16, 1.0, -1e16]
    records = [dict(lines[0], rewards={"base": {name: v}, "mara": {name: v}}, seconds={"base": v, "mara": v})
               for v in values]
    summary = summarize(records, [name])
    assert summary["rewards"][name]["mean_base"] == 1 / 3
    assert summary["speed"]["base_seconds"] == 1.0


def test_text_report_shows_fluency_fallbacks_and_cost(evaluated):
    _, results, _ = evaluated
    text = format_summary(results)
    a, f = results["agent"], results["fluency"]
    assert f"({a['fallback_rate']:.1%} of its decisions)" in text
    assert f"cost: {a['forwards_per_step']:.2f} forwards per decode step (plain greedy: 1)" in text
    assert (f"degenerate answers (fluency <= -0.5): base {f['degenerate']['base']} "
            f"({f['degenerate_rate']['base']:.1%}), MARA {f['degenerate']['mara']}") in text


def test_teacher_forced_nll_matches_the_generation_logits(model, tokenizer):
    """-log p_base of generated tokens from one teacher-forced forward (left padding, EOS cut) equals the sum over
    generate's own raw logits, step by step."""
    inputs = encode_chat_prompts(tokenizer, PROMPTS[:3], "cpu")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    lengths = torch.tensor([6, 3, 5])
    expected = torch.zeros(3, dtype=torch.float64)
    for step, logits in enumerate(out.logits):
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, new[:, step:step + 1]).squeeze(1)
        expected -= torch.where(step < lengths, logprobs, torch.zeros_like(logprobs)).double()
    got = teacher_forced_nll(model, inputs["input_ids"], inputs["attention_mask"], new, lengths)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_kl_is_token_weighted_mean_of_the_lines(evaluated):
    _, results, lines = evaluated
    kl = results["kl_per_token"]
    assert kl["mara"] == pytest.approx(
        sum(x["nll_sum"]["mara"] for x in lines) / sum(x["tokens"]["mara"] for x in lines))
    assert kl["base_reference"] == pytest.approx(
        sum(x["nll_sum"]["base"] for x in lines) / sum(x["tokens"]["base"] for x in lines))
    assert kl["mara"] > 0 and kl["base_reference"] > 0
    speed = results["speed"]
    assert speed["base_tokens_per_s"] == pytest.approx(speed["base_tokens"] / speed["base_seconds"])
    assert speed["mara_tokens_per_s"] > 0


def test_a_tokenizer_without_a_pad_token_answers_alike_and_is_left_as_it_was(tmp_path, model, tokenizer, agent,
                                                                               evaluated):
    """Llama's and Mistral's tokenizers have no pad token: evaluation pads with EOS (any id would do: padding is
    masked or cut off), gives the same answers, and does not give the tokenizer one."""
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    evaluate(model, bare, agent, PROMPTS, REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    assert bare.pad_token is None
    lines = [json.loads(line) for line in (tmp_path / RESPONSES_FILE).read_text().splitlines()]

    def answers(found):
        return sorted((line["index"], line["base"], line["mara"], line["nll_sum"]) for line in found)

    assert answers(lines) == answers(evaluated[2])


def test_accept_all_agent_ties_everywhere(tmp_path, model, tokenizer):
    """An agent that accepts every top-1 decodes exactly like greedy: every prompt ties, gain 0, same KL."""
    results = evaluate(model, tokenizer, constant_agent(16, accept=True), PROMPTS[:4], REWARDS, out_dir=tmp_path,
                       plots=False, **SETTINGS)
    for r in results["rewards"].values():
        assert (r["wins"], r["ties"], r["losses"], r["gain"]) == (0, 4, 0, 0.0)
        assert r["mean_base"] == r["mean_mara"]
    assert results["agent"]["changed_tokens"] == 0 and results["agent"]["answers_changed"] == 0
    assert results["kl_per_token"]["mara"] == pytest.approx(results["kl_per_token"]["base_reference"])
    assert results["files"]["plots"] == [] and not (tmp_path / REWARDS_PLOT).exists()


def test_plots_written(evaluated):
    out, results, _ = evaluated
    assert results["files"]["plots"] == [REWARDS_PLOT, INDEX_PLOT]
    for name in (REWARDS_PLOT, INDEX_PLOT):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_plots_skipped_with_a_warning_without_matplotlib(evaluated, tmp_path, monkeypatch, capsys):
    _, results, lines = evaluated
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert write_plots(lines, list(REWARDS), results["agent"], tmp_path) == []
    assert "matplotlib is not installed, skipping plots (pip install matplotlib)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# resume


def test_resume_generates_only_missing_prompts(tmp_path, model, tokenizer, agent, monkeypatch):
    calls = count_generate_calls(monkeypatch, model)
    first = evaluate(model, tokenizer, agent, PROMPTS[:4], REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    assert calls == [4, 4] and first["generated_now"] == 4  # base + MARA, one batch

    calls.clear()
    full = evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    assert calls == [2, 2] and (full["generated_now"], full["reused"]) == (2, 4)
    assert len((tmp_path / RESPONSES_FILE).read_text().splitlines()) == 6

    calls.clear()
    (tmp_path / RESULTS_FILE).unlink()
    again = evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    assert calls == [] and (again["generated_now"], again["reused"]) == (0, 6)
    for key in ("rewards", "kl_per_token", "agent", "speed"):
        assert again[key] == full[key]
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["reused"] == 6

    # a new reward on resume: scored from the saved answers, nothing regenerated
    again = evaluate(model, tokenizer, agent, PROMPTS, {**REWARDS, "prompt": lambda p, r: [len(x) for x in p]},
                     out_dir=tmp_path, plots=False, **SETTINGS)
    assert calls == [] and again["rewards"]["prompt"]["ties"] == 6
    lines = [json.loads(line) for line in (tmp_path / RESPONSES_FILE).read_text().splitlines()]
    assert all("prompt" in line["rewards"]["mara"] for line in lines)

    # same name, new meaning: kept unless rescore=True
    doubled = {"length": lambda p, r: [2 * len(x) / 10 for x in r], "vowels": vowel_reward}
    kept = evaluate(model, tokenizer, agent, PROMPTS, doubled, out_dir=tmp_path, plots=False, **SETTINGS)
    assert kept["rewards"]["length"] == full["rewards"]["length"]
    rescored = evaluate(model, tokenizer, agent, PROMPTS, doubled, out_dir=tmp_path, plots=False, rescore=True,
                        **SETTINGS)
    assert calls == []
    assert rescored["rewards"]["length"]["mean_mara"] == pytest.approx(2 * full["rewards"]["length"]["mean_mara"])
    evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=tmp_path, plots=False, rescore=True, **SETTINGS)

    # a crash in the middle of a line: the half line is dropped and that prompt answered again
    text = (tmp_path / RESPONSES_FILE).read_text().splitlines(keepends=True)
    (tmp_path / RESPONSES_FILE).write_text("".join(text[:-1]) + text[-1][:40])
    again = evaluate(model, tokenizer, agent, PROMPTS, REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    assert calls == [1, 1] and (again["generated_now"], again["reused"]) == (1, 5)
    lines = [json.loads(line) for line in (tmp_path / RESPONSES_FILE).read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(6))

    # resume=False starts over
    calls.clear()
    evaluate(model, tokenizer, agent, PROMPTS[:2], REWARDS, out_dir=tmp_path, resume=False, plots=False, **SETTINGS)
    assert calls == [2, 2] and len((tmp_path / RESPONSES_FILE).read_text().splitlines()) == 2


def test_resume_refuses_other_settings_and_broken_files(tmp_path, model, tokenizer, agent):
    evaluate(model, tokenizer, agent, PROMPTS[:1], REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)
    with pytest.raises(ValueError, match=r"holds answers generated with other settings .* use another out_dir "
                                         r"\(--out\) or resume=False \(--no-resume\)"):
        evaluate(model, tokenizer, agent, PROMPTS[:1], REWARDS, out_dir=tmp_path, plots=False,
                 **{**SETTINGS, "max_new_tokens": 5})
    with open(tmp_path / RESPONSES_FILE, "a") as handle:
        handle.write("{not json}\n")
    with pytest.raises(ValueError, match="Line 2 of .* is not a response record"):
        evaluate(model, tokenizer, agent, PROMPTS[:1], REWARDS, out_dir=tmp_path, plots=False, **SETTINGS)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prompts=[]), ValueError, "`prompts` is empty"),
        (dict(prompts="one prompt"), TypeError, "`prompts` has to be a list of strings"),
        (dict(rewards={}), ValueError, "`rewards` has to be a non-empty dict"),
        (dict(rewards={"x": "vader"}), TypeError, "Reward 'x' is a str, not a callable"),
        (dict(max_new_tokens=0), ValueError, "`max_new_tokens` has to be a positive integer, got 0"),
        (dict(batch_size=0), ValueError, "`batch_size` has to be a positive integer, got 0"),
        (dict(generation_kwargs={"do_sample": True}), ValueError, "`generation_kwargs` cannot set do_sample"),
        (dict(mara_kwargs={"top_k": 3}), ValueError, "`mara_kwargs` takes MARA options"),
    ],
)
def test_evaluate_validates_arguments(tmp_path, model, tokenizer, agent, kwargs, error, message):
    arguments = dict(prompts=PROMPTS[:1], rewards=REWARDS, max_new_tokens=4, batch_size=2, out_dir=tmp_path)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        evaluate(model, tokenizer, agent, **arguments)


# ---------------------------------------------------------------------------------------------------------------
# mara-hf eval


def eval_parser():
    return add_eval_arguments(argparse.ArgumentParser(prog="mara-hf eval"))


def test_eval_help_documents_the_rewards():
    text = eval_parser().format_help()
    for name in ("vader", "offensive", "fluency", "repetition", "beaver-reward", "beaver-cost", "beaver-reward[eos]",
                 "max_length=512", "hf:ID_OR_PATH", "py:MOD:FUNC", "10*vader+5*fluency",
                 "2*beaver-reward-1*beaver-cost", "--prompts", "--limit", "--max-new-tokens", "--batch-size",
                 "--out", "--sample", "--seed", "--agent-file"):
        assert name in text, name
    args = eval_parser().parse_args(["--prompts", "p.json", "--reward", "vader"])
    assert (args.max_new_tokens, args.batch_size, args.out, args.model, args.limit) == (64, 8, "eval-results",
                                                                                         "smollm2", None)


@pytest.fixture
def fake_loading(monkeypatch, model, tokenizer, agent):
    loaded = []

    def load_base_model(name, device=None, dtype=None):
        loaded.append(name)
        return model, tokenizer

    monkeypatch.setattr(mara_hf.models, "load_base_model", load_base_model)
    monkeypatch.setattr(mara_hf.models, "load_agent", lambda source=None, filename=None: agent)
    return loaded


def test_run_eval_end_to_end(tmp_path, fake_loading, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in PROMPTS]))
    args = eval_parser().parse_args(["--prompts", str(prompts), "--limit", "3",
                                     "--reward", "py:test_rewards:length_reward",
                                     "--reward", "2*py:test_rewards:length_reward-py:test_rewards:vowel_reward",
                                     "--max-new-tokens", "6", "--batch-size", "2", "--out", str(tmp_path / "out"),
                                     "--no-progress"])
    assert run_eval(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "mara-hf eval" not in captured.err  # no progress bar
    assert fake_loading == ["smollm2"]
    assert "3 prompts (3 answered now, 0 reused)" in out and "py:test_rewards:length_reward" in out
    assert "KL per token" in out and "tokens/s" in out and "wrote results.json, responses.jsonl" in out
    assert "degenerate answers (fluency <= -0.5): base" in out and "forwards per decode step" in out
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert list(results["rewards"]) == ["py:test_rewards:length_reward",
                                        "2*py:test_rewards:length_reward-py:test_rewards:vowel_reward"]
    line = json.loads((tmp_path / "out" / RESPONSES_FILE).read_text().splitlines()[0])
    combined = line["rewards"]["mara"]["2*py:test_rewards:length_reward-py:test_rewards:vowel_reward"]
    assert combined == pytest.approx(2 * len(line["mara"]) / 10 - sum(c in "aeiou" for c in line["mara"]), abs=1e-4)


def test_run_eval_reads_a_csv_column_named_by_prompt_field(tmp_path, fake_loading, capsys):
    """Harmful-prompt sets often come as CSV (AdvBench: goal,target): `--prompt-field` names the column; without
    it the error lists the columns and names the option."""
    prompts = tmp_path / "harmful.csv"
    prompts.write_text("goal,target\n" + "".join(f'"{p}",Sure\n' for p in PROMPTS[:2]))
    argv = ["--prompts", str(prompts), "--reward", "py:test_rewards:length_reward", "--max-new-tokens", "3",
            "--batch-size", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(ValueError, match=r"its fields: 'goal', 'target'\); name the field .*`--prompt-field NAME`"):
        run_eval(eval_parser().parse_args(argv))
    assert run_eval(eval_parser().parse_args(argv + ["--prompt-field", "goal"])) == 0
    assert "2 prompts (2 answered now, 0 reused)" in capsys.readouterr().out
    lines = (tmp_path / "out" / RESPONSES_FILE).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == PROMPTS[:2]


def test_run_eval_fallback_threshold_and_top_k_override_the_agents(tmp_path, model, tokenizer, monkeypatch, capsys):
    """`--fallback last` with an agent that rejects everything: MARA takes each step's last candidate (answers differ
    from the base model's), recorded in the settings; without it the agent's own `"first"` gives the base answers,
    and so do `--accept-threshold` below the agent's accept probabilities, `--top-k 1` and `--min-p 0.9999` (a lone
    candidate per step, taken without asking)."""
    monkeypatch.setattr(mara_hf.models, "load_base_model", lambda name, device=None, dtype=None: (model, tokenizer))
    monkeypatch.setattr(mara_hf.models, "load_agent", lambda source=None, filename=None: constant_agent(16, False))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in PROMPTS[:2]]))
    answers = {}
    # the agent's p(accept) is about 2e-9: a threshold of 1e-9 accepts every top-1 (the base answers again)
    for name, options, kwargs in [(None, [], {}), ("last", ["--fallback", "last"], {"mara_fallback": "last"}),
                                  ("low", ["--fallback", "last", "--accept-threshold", "1e-9"],
                                   {"mara_fallback": "last", "mara_accept_threshold": 1e-9}),
                                  ("top1", ["--fallback", "last", "--top-k", "1"],
                                   {"mara_fallback": "last", "mara_top_k": 1}),
                                  ("minp", ["--fallback", "last", "--min-p", "0.9999"],
                                   {"mara_fallback": "last", "mara_min_p": 0.9999})]:
        out = tmp_path / str(name)
        argv = ["--prompts", str(prompts), "--reward", "py:test_rewards:length_reward", "--max-new-tokens", "4",
                "--batch-size", "2", "--out", str(out)] + options
        assert run_eval(eval_parser().parse_args(argv)) == 0
        results = json.loads((out / RESULTS_FILE).read_text())
        assert results["settings"]["mara_kwargs"] == kwargs
        answers[name] = [json.loads(line) for line in (out / RESPONSES_FILE).read_text().splitlines()]
    assert all(line["mara"] == line["base"] for line in answers[None] + answers["low"] + answers["top1"] +
               answers["minp"])
    assert all(line["mara"] != line["base"] for line in answers["last"])
    assert "mara-hf eval" in capsys.readouterr().err  # the progress bar, on by default
    defaults = eval_parser().parse_args(["--prompts", "p", "--reward", "vader"])
    assert defaults.fallback is None and defaults.accept_threshold is None and defaults.top_k is None
    assert defaults.min_p is None


def test_run_eval_checks_rewards_before_loading_models(tmp_path, fake_loading):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "hi"}]))
    args = eval_parser().parse_args(["--prompts", str(prompts), "--reward", "helpfulness"])
    with pytest.raises(ValueError, match="Unknown reward 'helpfulness'.*known rewards: vader, offensive"):
        run_eval(args)
    args = eval_parser().parse_args(["--prompts", str(tmp_path / "missing.json"),
                                     "--reward", "py:test_rewards:length_reward"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(args)
    args = eval_parser().parse_args(["--prompts", str(prompts), "--reward", "py:test_rewards:length_reward",
                                     "--batch-size", "0"])
    with pytest.raises(ValueError, match="--batch-size has to be at least 1"):
        run_eval(args)
    assert fake_loading == []


def test_run_eval_with_vader(tmp_path, fake_loading, capsys):
    pytest.importorskip("vaderSentiment")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    args = eval_parser().parse_args(["--prompts", str(prompts), "--reward", "vader", "--max-new-tokens", "4",
                                     "--out", str(tmp_path / "out")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert -1 <= results["rewards"]["vader"]["mean_mara"] <= 1


# ---------------------------------------------------------------------------------------------------------------
# results folders move between machines


def test_an_agents_min_p_keys_the_answers_and_older_files_keep_their_id(model, tokenizer, agent):
    """An agent that cuts its candidates by min-p answers differently, so its settings say so; an agent without a
    cut has the settings evaluations written before min_p existed had (their files still resume)."""
    from mara_hf.evaluation import EvalSettings
    from mara_hf.evaluation.store import answer_settings, fingerprint

    settings = EvalSettings()
    plain = answer_settings(model, tokenizer, agent, settings)
    assert "agent_min_p" not in plain
    agent.min_p = 0.1
    try:
        cut = answer_settings(model, tokenizer, agent, settings)
    finally:
        agent.min_p = 0.0
    assert cut["agent_min_p"] == 0.1 and fingerprint(cut) != fingerprint(plain)


def test_fingerprint_names_the_model_without_a_machine_path(tmp_path, model, tokenizer, agent, monkeypatch):
    """The same model loaded from another folder of the same name (another machine, another virtualenv) resumes
    the answers instead of refusing them: the settings name the model by its folder's name, not its path."""
    for machine in ("one", "two"):
        model.save_pretrained(tmp_path / machine / "tiny-llama")
    first = LlamaForCausalLM.from_pretrained(tmp_path / "one" / "tiny-llama").eval()
    results = evaluate(first, tokenizer, agent, PROMPTS[:2], REWARDS, out_dir=tmp_path / "out", plots=False,
                       **SETTINGS)
    assert results["settings"]["model"] == "tiny-llama" == mara_hf.models.model_name(first)
    assert str(tmp_path / "one") not in (tmp_path / "out" / RESULTS_FILE).read_text()

    second = LlamaForCausalLM.from_pretrained(tmp_path / "two" / "tiny-llama").eval()
    calls = count_generate_calls(monkeypatch, second)
    again = evaluate(second, tokenizer, agent, PROMPTS[:2], REWARDS, out_dir=tmp_path / "out", plots=False,
                     **SETTINGS)
    assert calls == [] and (again["generated_now"], again["reused"]) == (0, 2)
    assert again["settings_id"] == results["settings_id"]
    # Hub ids stay as they are; a model built from a config is named by its class
    assert mara_hf.models.model_name(model) == "LlamaForCausalLM"
    model.config._name_or_path = "org/some-model"
    try:
        assert mara_hf.models.model_name(model) == "org/some-model"
    finally:
        model.config._name_or_path = ""


PUBLISHED = ROOT / "benchmarks" / "eval" / "smollm2-vader"


def readme_eval_commands() -> list[list[str]]:
    """The README's `mara-hf eval` commands that wrote the published folders (arguments after `mara-hf`)."""
    readme = (ROOT / "README.md").read_text()
    commands = [shlex.split(line)[1:] for line in readme.splitlines()
                if line.startswith("mara-hf eval ") and "--out benchmarks/eval/" in line]
    assert len(commands) == 7, ("the README shows the commands of the published evaluations (three agents, two sets; "
                                "the default agent on a third)")
    return commands


def close(value, rel=1e-12):
    """`value` with every float replaced by `pytest.approx` of it (nested dicts and lists kept), for `==`."""
    if isinstance(value, dict):
        return {key: close(item, rel) for key, item in value.items()}
    if isinstance(value, list):
        return [close(item, rel) for item in value]
    return pytest.approx(value, rel=rel) if isinstance(value, float) else value


@pytest.mark.parametrize("command", readme_eval_commands(), ids=lambda argv: argv[argv.index("--out") + 1])
def test_readme_eval_command_resumes_the_published_answers(command, smollm2, tmp_path, monkeypatch, capsys):
    """Run as written (from the repository root, on a copy of the published folder), the README's eval command
    reuses every published answer: nothing is generated and the summary is the published one."""
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("profanity_check")
    from mara_hf.cli import main

    model, tokenizer = smollm2
    published = ROOT / command[command.index("--out") + 1]
    copy = tmp_path / published.name
    shutil.copytree(published, copy)
    argv = [str(copy) if arg == command[command.index("--out") + 1] else arg for arg in command]

    def load_base_model(name, device=None, dtype=None):
        assert name == "smollm2"
        tokenizer.padding_side = "left"
        return model, tokenizer

    def no_generate(*args, **kwargs):
        raise AssertionError("the published answers were generated again")

    monkeypatch.setattr(mara_hf.models, "load_base_model", load_base_model)
    monkeypatch.setattr(model, "generate", no_generate)
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "200 prompts (0 answered now, 200 reused)" in out
    expected = json.loads((published / RESULTS_FILE).read_text())
    got = json.loads((copy / RESULTS_FILE).read_text())
    assert got["settings"] == expected["settings"] and got["settings_id"] == expected["settings_id"]
    # Equal up to the last bits of a float: the published files added floats with Python 3.11's `sum`.
    assert got["rewards"] == close(expected["rewards"]) and got["kl_per_token"] == close(expected["kl_per_token"])
    assert {key: got["agent"][key] for key in expected["agent"]} == close(expected["agent"])  # published before cost
    assert (copy / RESPONSES_FILE).read_text() == (published / RESPONSES_FILE).read_text()


def test_published_results_name_no_machine_path():
    """No value of a published summary or agent config, nor any word of one (the recorded training command), is an
    absolute path of a folder."""
    def strings(value):
        if isinstance(value, dict):
            yield from (s for v in value.values() for s in strings(v))
        elif isinstance(value, list):
            yield from (s for v in value for s in strings(v))
        elif isinstance(value, str):
            yield value

    paths = [p for folder in ("eval", "train") for pattern in ("*results.json", "agent_config.json")
             for p in (ROOT / "benchmarks" / folder).rglob(pattern)]
    assert len(paths) >= 6
    for path in paths:
        for text in strings(json.loads(path.read_text())):
            for word in text.replace("`", " ").split():
                assert not re.match(r"/[\w.~-]+/", word), f"{path.relative_to(ROOT)} names the path {word!r}"
