"""What one Ray worker holds and does: the base model, its tokenizer and the rewards, loaded once (`load`); a shard of
a training batch rolled out with the actor weights it is sent (`rollout`); batches of evaluation prompts answered and
scored (`prepare_eval`, `answer`, `score`). The methods call the single-process code (`mara_hf.train.trainer.
rollout_transitions`, `mara_hf.evaluation.runner.BatchRunner`), so a worker computes what one process would.

`ModelWorker` is a plain class: `WorkerPool` makes it a Ray actor. Transitions travel in a compact form
([`pack_transitions`]): fp16 states once (the replay buffer stores fp16 anyway), no next states (each is the next
row's state, or zero after the episode's last decision), so a decision of a 4096-d model costs 8 KiB + 6 bytes.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Sequence

import torch

from .. import hf_internals as hf


def load_model(name: str, dtype: str | None = None):
    """`(model, tokenizer)` of `--model` (in `--dtype`) on this worker: on its GPU when Ray gave it one
    (CUDA_VISIBLE_DEVICES), else on the CPU."""
    from ..models import default_device, load_base_model

    return load_base_model(name, device=default_device(), dtype=dtype)


def load_rewards(specs: Sequence[str]) -> dict:
    """`{spec: reward}` of the `--reward` specs, on this worker's device (a model named twice loads once)."""
    from ..models import default_device
    from ..rewards import parse_reward

    cache: dict = {}
    return {spec: parse_reward(spec, device=default_device(), cache=cache) for spec in specs}


def pack_transitions(batch) -> dict[str, torch.Tensor]:
    """The transfer form of a shard's transitions (a `mara_hf.train.Batch` whose rows end with a `done`, as
    `build_transitions` gives them): fp16 states, int8 actions, float32 rewards, bool dones and advances, on the
    CPU."""
    if batch.dones.numel() and not bool(batch.dones[-1]):
        raise ValueError("Transitions travel in whole episodes: the last one has to be done.")
    return {"states": batch.states.detach().to("cpu", torch.float16), "actions": batch.actions.to("cpu", torch.int8),
            "rewards": batch.rewards.detach().to("cpu", torch.float32), "dones": batch.dones.to("cpu", torch.bool),
            "advances": batch.advances.to("cpu", torch.bool)}


def unpack_transitions(parts: Sequence[dict[str, torch.Tensor]]):
    """One `Batch` of the packed shards `parts`, in their order: next states rebuilt (the following state; zero
    after a done), states fp16 as the replay buffer stores them."""
    from ..train.buffer import Batch

    states = torch.cat([p["states"] for p in parts])
    dones = torch.cat([p["dones"] for p in parts])
    next_states = torch.roll(states, shifts=-1, dims=0)
    next_states[dones] = 0
    return Batch(states=states, actions=torch.cat([p["actions"] for p in parts]).long(),
                 rewards=torch.cat([p["rewards"] for p in parts]), next_states=next_states, dones=dones,
                 advances=torch.cat([p["advances"] for p in parts]))


def packed_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


class ModelWorker:
    """One worker's model, tokenizer and rewards, and the jobs it does with them.

    Args:
        slot (`int`): the worker's place in its pool (shard `slot` of every training batch goes to it).
        load_model: `() -> (model, tokenizer)`, run once in the worker (e.g. `functools.partial(load_model, name)`).
        load_rewards: `() -> {name: reward}`, run once in the worker.
    """

    def __init__(self, slot: int, load_model: Callable, load_rewards: Callable):
        self.slot = slot
        self._load_model, self._load_rewards = load_model, load_rewards
        self.model = None
        self._actor = None
        self.runner = None

    def load(self) -> dict:
        """Load the model and the rewards; returns what the driver needs to know about them."""
        self.model, self.tokenizer = self._load_model()
        self.rewards = dict(self._load_rewards())
        from ..data import eos_token_ids
        from ..models import model_name

        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        head = self.model.get_output_embeddings()
        self.device = hf.execution_device(head)
        return {"slot": self.slot, "pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device),
                "state_dim": head.weight.shape[1], "model": model_name(self.model), "threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ training
    def rollout(self, iteration: int, rows: Sequence[int], prompts: list[str], config, reward: str, version: int,
                weights: dict[str, torch.Tensor]) -> dict:
        """Rows `rows` of iteration `iteration`'s batch (`prompts`), rolled out with the actor of `weights`
        (version `version`), scored with the reward `reward`: packed transitions, totals and the seconds taken."""
        from ..train.rollout import row_generators
        from ..train.trainer import rollout_transitions

        started = time.perf_counter()
        actor = self._rollout_actor(config, weights)
        transitions, totals = rollout_transitions(self.model, self.tokenizer, self.rewards[reward], actor, prompts,
                                                  config, row_generators(config.seed, iteration, rows), self.eos_ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"transitions": pack_transitions(transitions), "totals": totals, "version": version,
                "seconds": time.perf_counter() - started}

    def probe(self, prompts: list[str], config, weights: dict[str, torch.Tensor], threshold: float,
              reward: str) -> dict:
        """The greedy probe (`mara_hf.train.probe`) of the actor of `weights` on `prompts`, scored with the reward
        `reward`."""
        from ..train.probe import greedy_probe

        return greedy_probe(self.model, self.tokenizer, self._rollout_actor(config, weights), prompts, config,
                            self.eos_ids, threshold, reward=self.rewards[reward])

    def _rollout_actor(self, config, weights: dict[str, torch.Tensor]):
        """The worker's actor (built once per shape, on the device where lm_head computes) with `weights` loaded
        (every call: a few MB, and no version number can be trusted across runs sharing a pool)."""
        from ..agent import MaraAgent

        if self._actor is None or self._actor.hidden_sizes != list(config.hidden_sizes):
            self._actor = MaraAgent(self.model.get_output_embeddings().weight.shape[1],
                                    hidden_sizes=config.hidden_sizes).to(self.device).eval()
        self._actor.load_state_dict(weights)
        return self._actor

    # ------------------------------------------------------------------ evaluation
    def prepare_eval(self, agent, settings, reward_names: Sequence[str]) -> dict:
        """Set up answering with `agent` under `settings` (an `EvalSettings`), scored by the rewards named; returns
        the settings that decide the answers (their fingerprint keys the results folder)."""
        from ..evaluation.runner import BatchRunner

        missing = [name for name in reward_names if name not in self.rewards]
        if missing:
            raise ValueError(f"This worker has no reward {', '.join(missing)} (it loaded {', '.join(self.rewards)}).")
        self.runner = BatchRunner(self.model, self.tokenizer, agent, {n: self.rewards[n] for n in reward_names},
                                  settings)
        return self.runner.described

    def answer(self, indices: list[int], prompts: list[str]) -> list[dict]:
        """The scored records of one batch of prompts (positions `indices` of the prompt list)."""
        return self.runner.run(indices, prompts)

    def score(self, records: list[dict]) -> tuple[bool, list[dict]]:
        """Add the rewards `records` lack; returns whether any was added, and the records."""
        return self.runner.score(records), records
