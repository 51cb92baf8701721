"""`evaluate_on_ray`: `mara-hf eval --ray-workers N`. The prompt batches of `mara_hf.evaluation.evaluate` (the same
batches, hence the same seeds and the same answers) are answered and scored by the workers, each holding the base
model and the rewards; the driver only keeps the folder: it appends each finished batch to `responses.jsonl` (a
killed run resumes batch by batch, as in one process), puts the file back in prompt order at the end and writes
the same `results.json` (timings aside) as a single-process run.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..evaluation.runner import EvalSettings, _check_prompts, run_evaluation
from ..evaluation.store import fingerprint
from .pool import WorkerPool

QUEUE_DEPTH = 2
"""Batches sent to a worker ahead of the one it is answering (so it never waits for the driver)."""


class RayAnswerer:
    """The answerer of `run_evaluation` on the workers of `pool` (see `BatchRunner` for the one-process one)."""

    def __init__(self, pool: WorkerPool, agent, reward_names: list[str], settings: EvalSettings):
        self.pool = pool
        described = pool.setup("prepare_eval", agent, settings, reward_names)
        if any(d != described[0] for d in described[1:]):
            raise ValueError("The Ray workers loaded different models (their answer settings differ): give every "
                             "worker the same --model.")
        self.described = described[0]
        self.settings_id = fingerprint(self.described)

    def score(self, records: list[dict]) -> bool:
        if not records:
            return False
        added, scored = self.pool.result(self.pool.submit(0, "score", records))
        for record, new in zip(records, scored):
            record["rewards"] = new["rewards"]
        return added

    def answer(self, batches: list[list[int]], prompts: list[str]):
        """Each batch's records as soon as a worker has them: every worker keeps `QUEUE_DEPTH` batches queued."""
        todo = list(reversed(batches))
        running = []

        def send(slot):
            if todo:
                rows = todo.pop()
                running.append(self.pool.submit(slot, "answer", rows, [prompts[i] for i in rows]))

        for _ in range(QUEUE_DEPTH):  # one batch per worker first, then a second one each
            for slot in range(len(self.pool.actors)):
                send(slot)
        while running:
            task = self.pool.wait(running)
            records = self.pool.result(task)
            running.remove(task)
            send(task.slot)
            yield records


def evaluate_on_ray(
    pool: WorkerPool,
    agent,
    prompts: Sequence[str],
    rewards: Sequence[str],
    *,
    out_dir: str | os.PathLike = "eval-results",
    resume: bool = True,
    rescore: bool = False,
    plots: bool = True,
    progress: bool = True,
    **settings,
) -> dict:
    """[`mara_hf.evaluation.evaluate`] with the answering done by the workers of `pool`; `rewards` names rewards the
    workers loaded (e.g. the `--reward` specs of `WorkerPool.from_specs`). Same arguments (`settings`: the fields of
    `EvalSettings`, e.g. `max_new_tokens`, `batch_size`, `do_sample`, `seed`), files and summary."""
    prompts = _check_prompts(prompts)
    rewards = list(dict.fromkeys(rewards))
    if not rewards:
        raise ValueError("`rewards` is empty: name at least one reward the workers loaded.")
    settings = EvalSettings(**settings)
    answerer = RayAnswerer(pool, agent, rewards, settings)
    return run_evaluation(answerer, prompts, rewards, settings, agent=agent, out_dir=out_dir, resume=resume,
                          rescore=rescore, plots=plots, progress=progress)
