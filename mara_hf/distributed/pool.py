"""`WorkerPool`: the Ray actors of a run. It starts `RayConfig.workers` actors of `ModelWorker`, each reserving its
own CPUs and GPUs and loading the model and rewards once; sends them calls; and, when a worker dies (its process
killed, its node lost), replaces it with a fresh actor, replays the setup calls it had received and runs the
unfinished calls again there. Calls are deterministic in their arguments (a training shard carries its iteration,
rows and weights), so a call run again gives what the first would have, and the driver takes each result once:
nothing is lost or counted twice.

An error raised by the code a worker runs (a bad reward spec, a reward that returns NaN) is not a death: it is
raised again in the driver as the worker raised it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import RayConfig, check_resources, connect
from .worker import ModelWorker, load_model, load_rewards

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """A call sent to the worker of `slot` (its `generation`-th actor); `ref` is Ray's handle of the result."""

    slot: int
    method: str
    args: tuple
    ref: Any
    generation: int
    retries: int = field(default=0)


class WorkerPool:
    """`config.workers` Ray actors of [`ModelWorker`].

    Args:
        config ([`RayConfig`]): how many workers, their resources, the cluster, how often a worker is replaced.
        load_model: `() -> (model, tokenizer)`, picklable, run once in each worker.
        load_rewards: `() -> {name: reward}`, picklable, run once in each worker.

    `info[slot]` is what each worker's `load` returned (device, state size, ...). Use as a context manager, or call
    `close()`: the actors are killed.
    """

    def __init__(self, config: RayConfig, load_model: Callable, load_rewards: Callable):
        if not config.enabled:
            raise ValueError("A worker pool needs at least one worker (--ray-workers 1 or more).")
        self.ray = connect(config)
        self.config = config
        self.num_gpus = config.gpus_per_worker()
        check_resources(self.ray, config, self.num_gpus)
        self._actor_class = self.ray.remote(ModelWorker)
        self._loaders = (load_model, load_rewards)
        self.actors: list[Any] = [None] * config.workers
        self.generations = [0] * config.workers
        self.restarts = [0] * config.workers
        self._setup: list[tuple[str, tuple]] = []
        try:
            self.info = self.ray.get([self._start(slot) for slot in range(config.workers)])
        except self._task_error as err:
            self.close()
            raise _cause(err) from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_specs(cls, config: RayConfig, model: str, rewards: Sequence[str], dtype: str | None = None
                   ) -> "WorkerPool":
        """Workers that load the base model `model` (a `--model` value, in `dtype`, a `--dtype` value) and the
        rewards of the `--reward` specs."""
        return cls(config, functools.partial(load_model, model, dtype=dtype),
                   functools.partial(load_rewards, list(rewards)))

    @property
    def _task_error(self):
        return self.ray.exceptions.RayTaskError

    @property
    def _death(self):
        return (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError)

    def _start(self, slot: int):
        """Start the actor of `slot` (reserving its resources), ask it to load; returns the load's reference."""
        actor = self._actor_class.options(num_cpus=self.config.num_cpus, num_gpus=self.num_gpus,
                                          max_restarts=0).remote(slot, *self._loaders)
        self.actors[slot] = actor
        self.generations[slot] += 1
        loaded = actor.load.remote()
        for method, args in self._setup:
            getattr(actor, method).remote(*args)
        return loaded

    def _replace(self, slot: int, error: BaseException) -> None:
        """A fresh actor in the place of `slot`'s dead one, loaded and set up like the others."""
        self.restarts[slot] += 1
        if self.restarts[slot] > self.config.max_restarts:
            raise RuntimeError(f"Ray worker {slot} died {self.restarts[slot]} times (last: "
                               f"{_first_line(error)}); giving up (--ray-max-restarts {self.config.max_restarts}). "
                               "Re-run the same command to resume from the last checkpoint.")
        logger.warning("Ray worker %d died (%s); starting a fresh one (%d of %d).", slot, _first_line(error),
                       self.restarts[slot], self.config.max_restarts)
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        try:
            self.info[slot] = self.ray.get(self._start(slot))
        except self._task_error as err:
            raise _cause(err) from None

    # ------------------------------------------------------------------ calls
    def setup(self, method: str, *args) -> list:
        """Call `method(*args)` on every worker (and on every worker that replaces one later, before its other
        calls); returns each worker's result."""
        self._setup.append((method, args))
        return [self.result(self.submit(slot, method, *args)) for slot in range(len(self.actors))]

    def submit(self, slot: int, method: str, *args) -> Task:
        """Send `method(*args)` to the worker of `slot` (calls to one worker run one at a time, in order)."""
        return Task(slot, method, args, getattr(self.actors[slot], method).remote(*args), self.generations[slot])

    def result(self, task: Task):
        """The result of `task`; if its worker died, it runs again on the worker's replacement. An error of the
        worker's code is raised as it was raised there."""
        while True:
            try:
                return self.ray.get(task.ref)
            except self._task_error as err:
                raise _cause(err) from None
            except self._death as err:
                if task.generation == self.generations[task.slot]:  # the first news of this actor's death
                    self._replace(task.slot, err)
                task.ref = getattr(self.actors[task.slot], task.method).remote(*task.args)
                task.generation = self.generations[task.slot]
                task.retries += 1

    def wait(self, tasks: Sequence[Task]) -> Task:
        """The first of `tasks` whose result is ready (or whose worker died: `result` then runs it again)."""
        ready, _ = self.ray.wait([task.ref for task in tasks], num_returns=1)
        return next(task for task in tasks if task.ref == ready[0])

    def put(self, value):
        """`value` in the object store, for calls to many workers (each fetches it once)."""
        return self.ray.put(value)

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                try:
                    self.ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        self.actors = [None] * len(self.actors)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cause(error) -> BaseException:
    """The exception a worker's code raised, from Ray's wrapper of it."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(_first_line(error))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
