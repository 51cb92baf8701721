"""`DistributedTrainer`: `mara-hf train --ray-workers N`. The driver is the learner; the workers roll out.

Each iteration's batch (the same prompts as in one process, `Trainer.batch_prompts`) is cut into N contiguous
shards of rows; shard w goes to worker w with the actor weights the iteration uses (`Trainer.weights_version`:
the actor after iteration `i - max_staleness`, broadcast once per version through Ray's object store). A worker
rolls its shard out with one generator per row seeded by (seed, iteration, row), scores it and sends back packed
transitions and totals. The driver concatenates the shards in order, which gives exactly the transitions of the
whole batch in one process, adds them to the replay buffer and runs the SAC updates (`Trainer.learn`: the same
code, metrics and checkpoints as a single-process run).

`max_staleness = s` keeps the rollouts of iterations i+1 .. i+s in flight while the learner updates on iteration
i; which weights an iteration uses does not depend on timing, so the run is reproducible, and a checkpoint holds
the s older actors the in-flight iterations use: a killed driver resumes from it and rolls them out again. A
dead worker is replaced by the pool and its shards rolled out again (the same rows, seeds and weights give the
same transitions); the driver takes each shard's result once.

Metrics: the single-process ones (totals over all shards), plus `weights_version`, `worker_restarts`,
`transfer_mib` (transitions received plus weights sent this iteration) and per worker (`workers`: rows, reward,
the rollout metrics, its seconds and generated tokens per second).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from ..agent import MaraAgent
from ..train.rollout import rollout_metrics
from ..train.trainer import Trainer, TrainConfig
from .pool import WorkerPool
from .worker import packed_bytes, unpack_transitions


def shard_rows(batch_size: int, shards: int) -> list[range]:
    """`batch_size` rows cut into `shards` contiguous ranges whose sizes differ by at most one (empty ranges when
    there are more shards than rows).

    ```python
    >>> [list(r) for r in shard_rows(5, 2)]
    [[0, 1, 2], [3, 4]]

    ```
    """
    size, extra = divmod(batch_size, shards)
    bounds = [0]
    for shard in range(shards):
        bounds.append(bounds[-1] + size + (shard < extra))
    return [range(start, end) for start, end in zip(bounds, bounds[1:])]


class DistributedTrainer(Trainer):
    """A [`Trainer`] whose rollouts run on the workers of `pool`; the learner (SAC, replay buffer, checkpoints)
    runs here, on `device`.

    Args:
        pool ([`WorkerPool`]): the workers (each holds the base model and `reward`).
        prompts, out_dir, config, agent, base_model_name, description, tensorboard, progress: as for [`Trainer`].
        reward (`str`): the name of the training reward among the workers' rewards.
        device: where the learner runs (actor, critics, replay buffer).

    The pool is not closed by the trainer (it may serve several runs).
    """

    def __init__(
        self,
        pool: WorkerPool,
        prompts: Sequence,
        reward: str,
        out_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        agent: MaraAgent | None = None,
        base_model_name: str | None = None,
        description: str | None = None,
        tensorboard: bool = False,
        progress: bool = True,
    ):
        self.pool, self.reward_name = pool, reward
        state_dims = {info["state_dim"] for info in pool.info}
        if len(state_dims) != 1:
            raise ValueError(f"The Ray workers loaded models of different hidden sizes ({sorted(state_dims)}).")
        self._setup_learner(prompts, out_dir, config, state_dim=state_dims.pop(), device=device, agent=agent,
                            base_model_name=base_model_name, description=description, tensorboard=tensorboard,
                            progress=progress)
        self.in_flight: dict[int, list] = {}  # iteration -> its shards' tasks
        self.published: dict[int, tuple] = {}  # weights version -> (object reference, bytes)
        self.next_submit = 0
        self._sent_bytes = 0  # weights put since the last metrics (a probe's count towards the next iteration's)

    # ------------------------------------------------------------------ rollouts on the workers
    def publish(self, version: int):
        """The object reference of the actor weights of `version` (put into the object store once)."""
        if version not in self.published:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in self.actor_weights(version).items()}
            self.published[version] = (self.pool.put(weights), sum(t.numel() * t.element_size()
                                                                     for t in weights.values()))
            self._sent_bytes += self.published[version][1] * len(self.pool.actors)
        return self.published[version][0]

    def submit(self, iteration: int) -> None:
        """Send the shards of `iteration` to the workers."""
        version = self.weights_version(iteration)
        weights = self.publish(version)
        prompts = self.batch_prompts(iteration)
        self.in_flight[iteration] = [
            self.pool.submit(slot, "rollout", iteration, list(rows), [prompts[r] for r in rows], self.config,
                             self.reward_name, version, weights)
            for slot, rows in enumerate(shard_rows(len(prompts), len(self.pool.actors))) if len(rows)
        ]

    def step(self) -> dict:
        """One iteration: keep the next `max_staleness` iterations in flight, wait for this one's shards, learn."""
        started = time.perf_counter()
        restarts_before = sum(self.pool.restarts)
        last = min(self.iteration + self.config.max_staleness, self.config.iterations - 1)
        for iteration in range(max(self.next_submit, self.iteration), last + 1):
            self.submit(iteration)
        self.next_submit = max(self.next_submit, last + 1)
        tasks = self.in_flight.pop(self.iteration)
        results = [self.pool.result(task) for task in tasks]
        waited = time.perf_counter() - started

        totals = {key: sum(r["totals"][key] for r in results) for key in results[0]["totals"]}
        transitions = unpack_transitions([r["transitions"] for r in results])
        workers = []
        for task, result in zip(tasks, results):
            shard = result["totals"]
            workers.append({
                "worker": task.slot,
                "rows": int(shard["rows"]),
                "reward": shard["reward"] / max(shard["rows"], 1.0),
                **rollout_metrics(shard),
                "seconds": result["seconds"],
                "tokens_per_second": shard["tokens"] / max(result["seconds"], 1e-9),
            })
        received = sum(packed_bytes(r["transitions"]) for r in results)
        sent, self._sent_bytes = self._sent_bytes, 0
        metrics = self.learn(
            transitions, totals, started=started, rollout_seconds=waited,
            worker_restarts=sum(self.pool.restarts) - restarts_before,
            transfer_mib=(received + sent) / 2**20,
            workers=workers,
        )
        oldest = self.weights_version(self.iteration)
        self.published = {v: ref for v, ref in self.published.items() if v >= oldest}
        return metrics

    def probe(self) -> dict[str, float]:
        """The greedy probe of the current actor, run on the first worker (it holds the base model), with the
        weights the next rollouts get (`publish`: put into the object store once)."""
        return self.pool.result(self.pool.submit(0, "probe", self.probe_prompts(), self.config,
                                                 self.publish(self.iteration), self.config.probe_threshold,
                                                 self.reward_name))

    def stop(self) -> None:
        """Forget the rollouts still in flight (iterations past a time limit or an error; a resumed run submits them
        again). They are not cancelled: cancelling queued actor calls can stall a Ray actor's call order, and at
        most `max_staleness` iterations are in flight."""
        self.in_flight.clear()
        self.published.clear()
        self.next_submit = self.iteration
