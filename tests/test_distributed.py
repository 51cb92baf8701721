"""Ray workers (`mara_hf.distributed`) on a local Ray cluster on this machine's CPU, with two workers holding a tiny
model: rollouts and whole training runs equal the single-process ones (same seeds, same weights), a worker killed
mid-round and a driver killed mid-run lose nothing and count nothing twice, sharded evaluation equals the
single-process one, and the commands run. One cluster and one pool of workers serve the whole module (starting
them costs seconds)."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install -e ".[ray]" (the dev extra has it)')

from conftest import decisive_agent, tiny_model  # noqa: E402
from mara_hf import MaraAgent  # noqa: E402
from mara_hf.distributed.config import RayConfig  # noqa: E402
from mara_hf.distributed.evaluation import evaluate_on_ray  # noqa: E402
from mara_hf.distributed.pool import WorkerPool  # noqa: E402
from mara_hf.distributed.training import DistributedTrainer, shard_rows  # noqa: E402
from mara_hf.distributed.worker import load_model, pack_transitions, unpack_transitions  # noqa: E402
from mara_hf.evaluation import evaluate  # noqa: E402
from mara_hf.models import load_base_model  # noqa: E402
from mara_hf.train import Trainer  # noqa: E402
from mara_hf.train.rollout import row_generators  # noqa: E402
from mara_hf.train.trainer import rollout_transitions  # noqa: E402
from test_train import even_token_rate, small_config, word_prompts, word_tokenizer  # noqa: E402

TESTS = Path(__file__).resolve().parent
PROMPTS = word_prompts(12)


class DiesOnce:
    """`even_token_rate`, except that the first worker to call it after `trigger` was created kills its own process
    (mid-round: after its rollout, before its transitions are sent)."""

    def __init__(self, trigger: str):
        self.trigger = trigger

    def __call__(self, prompts, responses):
        try:
            os.rename(self.trigger, self.trigger + ".fired")  # one worker wins
        except FileNotFoundError:
            return even_token_rate(prompts, responses)
        os._exit(1)


def worker_rewards(trigger: str) -> dict:
    return {"even": even_token_rate, "even-or-die": DiesOnce(trigger)}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs whose workers can import the test modules (the rewards live there)."""
    path = os.pathsep.join([str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trigger(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trigger") / "kill-a-worker")


@pytest.fixture(scope="module")
def pool(cluster, model_dir, trigger):
    config = RayConfig(workers=2, num_cpus=0.5, num_gpus=0)
    with WorkerPool(config, functools.partial(load_model, str(model_dir)),
                    functools.partial(worker_rewards, trigger)) as workers:
        yield workers


@pytest.fixture(scope="module")
def local(model_dir):
    return load_base_model(str(model_dir), device="cpu")


def config(**overrides):
    values = dict(iterations=4, rollout_batch_size=5, max_new_tokens=5, learning_starts=8)
    return small_config(**{**values, **overrides})


def single_process(local, out, cfg):
    model, tokenizer = local
    return Trainer(model, tokenizer, PROMPTS, even_token_rate, out, cfg, progress=False)


def metric_lines(path):
    """metrics.jsonl without timings and the per-worker and transfer records (which only a Ray run has)."""
    drop = ("rollout_seconds", "seconds", "workers", "worker_restarts", "transfer_mib")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(path, reference):
    """The metric lines of two runs hold the same keys and numbers (sums over shards may round differently)."""
    lines, expected = metric_lines(path), metric_lines(reference)
    assert len(lines) == len(expected)
    for line, other in zip(lines, expected):
        assert line.keys() == other.keys()
        probe, other_probe = line.pop("greedy", {}), other.pop("greedy", {})  # approx compares flat dicts only
        assert line == pytest.approx(other, rel=1e-5, abs=1e-8)
        assert probe == pytest.approx(other_probe, rel=1e-5, abs=1e-8)


def assert_same_agent(a: MaraAgent, b: MaraAgent):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("baseline", ["none", "greedy"])
def test_workers_transitions_equal_a_single_process_rollout(pool, local, baseline):
    """Two workers rolling out the two shards of a batch give the transitions of the whole batch rolled out here,
    in number and content, with the same per-row seeds and the same actor weights (with the reward baseline too:
    each worker decodes its shard's greedy answers)."""
    model, tokenizer = local
    cfg = config(reward_baseline=baseline)
    torch.manual_seed(3)
    actor = MaraAgent(32, hidden_sizes=cfg.hidden_sizes)
    with torch.no_grad():
        actor.output_linear.weight.mul_(3.0)  # p(accept) spread over (0, 1): real sampling
    prompts = PROMPTS[:5]
    here, totals = rollout_transitions(model, tokenizer, even_token_rate, actor.eval(), prompts, cfg,
                                       row_generators(cfg.seed, 7, range(5)))
    weights = pool.put(actor.state_dict())
    tasks = [pool.submit(slot, "rollout", 7, list(rows), [prompts[r] for r in rows], cfg, "even", 0, weights)
             for slot, rows in enumerate(shard_rows(5, 2))]
    results = [pool.result(task) for task in tasks]
    there = unpack_transitions([r["transitions"] for r in results])
    assert 0 < (there.actions == 0).sum() < len(there.actions)  # both actions occur
    expected = unpack_transitions([pack_transitions(here)])  # fp16 states: what the replay buffer holds
    assert there.actions.tolist() == expected.actions.tolist() and there.dones.tolist() == expected.dones.tolist()
    assert there.advances.tolist() == expected.advances.tolist()
    torch.testing.assert_close(there.rewards, expected.rewards)
    torch.testing.assert_close(there.states, expected.states, atol=2e-3, rtol=0)
    torch.testing.assert_close(there.next_states, here.next_states.half(), atol=2e-3, rtol=0)
    merged = {k: sum(r["totals"][k] for r in results) for k in totals}
    assert merged == pytest.approx(totals)
    assert ("baseline_reward" in totals) == (baseline == "greedy")


def test_shards_are_contiguous_and_cover_the_batch():
    assert [list(r) for r in shard_rows(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in shard_rows(2, 3)] == [1, 1, 0]


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("staleness", [0, 1])
def test_ray_training_equals_single_process_training(pool, local, tmp_path, staleness):
    """The driver learns from the workers' shards as one process learns from its own rollouts: the same metrics
    (in total) and the same agent; with max_staleness 1 iteration i is rolled out with the actor after iteration
    i - 1 in both (the workers roll it out while the learner still updates on iteration i - 1)."""
    cfg = config(max_staleness=staleness, greedy_probe=3, probe_threshold=0.3)  # the probe runs on worker 0
    alone = single_process(local, tmp_path / "alone", cfg).train()
    trainer = DistributedTrainer(pool, PROMPTS, "even", tmp_path / "ray", cfg, progress=False)
    together = trainer.train()
    assert_same_agent(alone, together)
    assert_same_metrics(tmp_path / "ray", tmp_path / "alone")
    last = json.loads((tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()[-1])
    assert [w["worker"] for w in last["workers"]] == [0, 1] and [w["rows"] for w in last["workers"]] == [3, 2]
    assert last["worker_restarts"] == 0 and last["transfer_mib"] > 0 and last["greedy"]["prompts"] == 3
    assert all(w["tokens_per_second"] > 0 for w in last["workers"])
    if staleness:
        assert [json.loads(l)["weights_version"] for l in
                (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()] == [0, 0, 1, 2]


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_counted_twice(pool, local, tmp_path, trigger):
    cfg = config(iterations=3)
    alone = single_process(local, tmp_path / "alone", cfg).train()
    Path(trigger).write_text("")  # the first worker to score a shard dies
    trainer = DistributedTrainer(pool, PROMPTS, "even-or-die", tmp_path / "ray", cfg, progress=False)
    together = trainer.train()
    assert Path(trigger + ".fired").exists()
    lines = [json.loads(l) for l in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert [line["worker_restarts"] for line in lines] == [1, 0, 0]
    assert_same_metrics(tmp_path / "ray", tmp_path / "alone")  # transitions too
    assert len(trainer.buffer) == lines[-1]["buffer_size"] == sum(line["transitions"] for line in lines)
    assert_same_agent(alone, together)


def test_a_killed_driver_resumes_from_its_checkpoint(pool, local, tmp_path, monkeypatch):
    """The driver dies in iteration 3 with rollouts of iterations 3 and 4 in flight (max_staleness 1); a new driver
    resumes from the checkpoint of iteration 2 (which holds the older actor iteration 3 rolls out with) and ends
    with the agent of an uninterrupted run."""
    cfg = config(iterations=5, max_staleness=1)
    alone = single_process(local, tmp_path / "alone", cfg).train()

    calls = {"n": 0}
    result = WorkerPool.result

    def dies_in_iteration_3(self, task):
        calls["n"] += 1
        if calls["n"] == 5:  # two shards per iteration: the first of iteration 3
            raise KeyboardInterrupt
        return result(self, task)

    monkeypatch.setattr(WorkerPool, "result", dies_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        DistributedTrainer(pool, PROMPTS, "even", tmp_path / "ray", cfg, progress=False).train()
    monkeypatch.setattr(WorkerPool, "result", result)
    assert (tmp_path / "ray" / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    resumed = DistributedTrainer(pool, PROMPTS, "even", tmp_path / "ray", cfg, progress=False)
    assert resumed.resume() and sorted(resumed.versions) == [1]
    assert_same_agent(alone, resumed.train())
    assert_same_metrics(tmp_path / "ray", tmp_path / "alone")


# ---------------------------------------------------------------------------------------------- evaluation
def test_sharded_evaluation_equals_single_process_evaluation(pool, local, tmp_path):
    """Identical files and summary. The schedule is fixed here: the default "auto" schedule adapts to the batches
    a process has decoded, so with it the cost counters (forwards) of a batch depend on which worker answered it,
    while answers and decisions do not (next test)."""
    model, tokenizer = local
    agent = decisive_agent(32, seed=7)
    settings = dict(max_new_tokens=6, batch_size=2, plots=False, progress=False, mara_kwargs={"mara_schedule": (1, 8)})
    alone = evaluate(model, tokenizer, agent, PROMPTS[:7], {"even": even_token_rate}, out_dir=tmp_path / "alone",
                     **settings)
    sharded = evaluate_on_ray(pool, agent, PROMPTS[:7], ["even"], out_dir=tmp_path / "ray", **settings)

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / run / "responses.jsonl").read_text().splitlines()]

    assert lines("ray") == lines("alone")  # in prompt order, answers, scores, agent counts, batches
    assert any(line["changed"] for line in lines("ray"))  # the agent changed something
    timing = ("speed", "out_dir")
    assert {k: v for k, v in sharded.items() if k not in timing} == {k: v for k, v in alone.items() if k not in timing}

    # resume per batch: a run killed after two batches (the file is appended batch by batch) answers the rest
    kept = (tmp_path / "ray" / "responses.jsonl").read_text().splitlines()[:4]
    (tmp_path / "ray" / "responses.jsonl").write_text("\n".join(kept) + "\n")
    again = evaluate_on_ray(pool, agent, PROMPTS[:7], ["even"], out_dir=tmp_path / "ray", **settings)
    assert (again["generated_now"], again["reused"]) == (3, 4)
    assert lines("ray") == lines("alone")


def test_sharded_evaluation_with_the_auto_schedule_gives_the_same_answers(pool, local, tmp_path):
    model, tokenizer = local
    agent = decisive_agent(32, seed=7)
    settings = dict(max_new_tokens=6, batch_size=2, plots=False, progress=False)
    evaluate(model, tokenizer, agent, PROMPTS[:7], {"even": even_token_rate}, out_dir=tmp_path / "alone", **settings)
    evaluate_on_ray(pool, agent, PROMPTS[:7], ["even"], out_dir=tmp_path / "ray", **settings)

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "batch")}
                for line in (tmp_path / run / "responses.jsonl").read_text().splitlines()]

    assert lines("ray") == lines("alone")


# ---------------------------------------------------------------------------------------------- commands
def test_cli_train_and_eval_with_ray_workers(cluster, model_dir, tmp_path, capsys):
    """The commands of the README, on this machine's local cluster (the module's cluster is reused)."""
    from mara_hf.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in PROMPTS[:6]]))
    ray_options = ["--ray-workers", "1", "--ray-num-cpus", "0.5"]  # one worker each: they start faster
    train = ["train", "--prompts", str(prompts), "--reward", "py:test_train:even_token_rate", "--model",
             str(model_dir), "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-new-tokens", "3",
             "--learning-starts", "1", "--updates-per-rollout", "1", "--sac-batch-size", "4", "--hidden-sizes", "8",
             "8", "--iterations", "2", "--no-progress", "--device", "cpu", *ray_options]
    assert main(train) == 0, capsys.readouterr().err
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["workers"]) for line in lines] == [1, 1]
    assert "--ray-workers 1" in MaraAgent.from_pretrained(tmp_path / "run" / "agent").training_info

    MaraAgent(32).save_pretrained(tmp_path / "agent")
    evaluation = ["eval", "--prompts", str(prompts), "--reward", "py:test_train:even_token_rate", "--model",
                  str(model_dir), "--agent", str(tmp_path / "agent"), "--max-new-tokens", "3", "--batch-size", "2",
                  "--out", str(tmp_path / "eval"), *ray_options]
    assert main(evaluation) == 0, capsys.readouterr().err
    assert len((tmp_path / "eval" / "responses.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["n_prompts"] == 6


def test_cli_refuses_more_workers_than_the_cluster_holds(cluster, tmp_path, capsys):
    from mara_hf.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "hi"}]))
    assert main(["eval", "--prompts", str(prompts), "--reward", "vader", "--ray-workers", "3",
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"mara-hf eval: error: --ray-workers 3 with --ray-num-cpus 1 need 3 CPUs, but the Ray cluster "
                        r"has [\d.]+ free \(of 2\): use fewer workers or a smaller --ray-num-cpus \(a fraction lets "
                        r"workers share one\)\.", err), err


def test_a_worker_error_reaches_the_driver_as_it_was_raised(pool):
    """An error of the code a worker runs is not a death: no worker is replaced, the driver gets the error."""
    restarts = list(pool.restarts)
    with pytest.raises(ValueError, match=r"^This worker has no reward nonsense \(it loaded even, even-or-die\)\.$"):
        pool.result(pool.submit(0, "prepare_eval", MaraAgent(32), None, ["nonsense"]))
    assert pool.restarts == restarts
