"""Training a MARA agent with discrete SAC, top to bottom (in the spirit of CleanRL's single-file SAC).

One iteration:

1. take the next `rollout_batch_size` prompts (a seeded shuffle, epoch after epoch);
2. play the accept/reject MDP on them with the actor, batched, through the fused MARA step (`rollout`);
3. score the responses with the sentence-level reward (less the score of the base model's greedy answer with
   `reward_baseline="greedy"`) and build transitions (terminal reward once on each
   episode's last decision, token-level KL penalty on the decision that chose each token, `reject_cost` off
   every reject decision and `repeat_cost` off the decision that chose a token repeating a 4-gram);
4. add them to the fp16 replay buffer and, once it holds `learning_starts` transitions, run
   `updates_per_rollout` SAC updates on batches sampled from it;
5. log one JSON line of metrics (and TensorBoard scalars if asked); every `checkpoint_every` iterations write
   an atomic checkpoint (and, with `greedy_probe`, first decode a few prompts greedily to log what the actor
   does and costs at inference, `mara_hf.train.probe`; the probed actor is kept in `probed/step-N/`, and the one
   with the best greedy return so far in `best_agent/`).

The rollout decisions of row r of iteration i are sampled with a generator seeded by `(seed, i, r)` alone
([`row_generators`]), so an iteration's episodes do not depend on how its batch is split: Ray workers rolling out
shards of it (`mara_hf.distributed`) give the transitions this process would, and a shard rolled out again gives
the same ones. With `max_staleness = s` the rollouts of iteration i use the actor as it was after iteration
max(0, i - s) (0: the current actor), here as with Ray workers, where it lets the next s rollouts run while the
learner updates.

Resuming from the latest checkpoint restores the actor (and the older actors that `max_staleness` still needs),
critics, targets, alpha, optimizers, replay buffer and the buffer-sampling generator, so for a fixed seed a
killed and resumed run ends with the same agent as an uninterrupted one (on the same machine, torch version and
thread count: floating point reductions may differ across those).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from .. import hf_internals as hf
from ..agent import MaraAgent, is_accept_threshold, validate_candidate_settings
from ..data import decode_answers, encode_chat_prompts, eos_token_ids, pad_token_id
from ..files import write_atomic
from ..progress import progress_bar
from ..schedule import validate_schedule
from .buffer import Batch, ReplayBuffer
from .checkpoint import damaged, latest_checkpoint, load_checkpoint, save_checkpoint
from .probe import greedy_probe
from .rollout import build_transitions, rollout, rollout_metrics, row_generators
from .sac import DiscreteSAC, SACConfig
from .scoring import BASELINES, answer_scores, baseline_scores

logger = logging.getLogger(__name__)

ROLLOUT_SCHEDULE = (1, 2, 4, 8, 16)
"""Lazy chunk boundaries of rollouts: a sampled actor mostly accepts within the first few candidates, so small
chunks waste fewer sibling forwards than inference's (1, 8)."""
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_AGENT = "agent"
BEST_AGENT = "best_agent"
PROBED_AGENTS = "probed"
PROBE_FILE = "probe.json"


@dataclass
class TrainConfig:
    """Settings of a training run, defaulting to the paper code's values; the learner's are in `sac`
    ([`SACConfig`]). Each field's `help` (its metadata) is declared here once: `mara-hf train` builds its options
    from it (`rollout_batch_size` is `--batch-size`), `benchmarks/train_sweep.py` turns configs back into them, and
    `trainer.json` of every checkpoint stores `to_dict()`."""

    iterations: int = field(default=100, metadata={"help": "rollouts (a resumed run may raise it to go on)"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts per rollout", "flag": "--batch-size"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per answer (an episode also ends at EOS)"})
    kl_coef: float = field(default=0.1, metadata={
        "help": "token-level KL penalty: kl_coef * (log p_base(top-1) - log p_base(taken)) on the decision that "
                "chose each token"})
    reject_cost: float = field(default=0.0, metadata={
        "help": "cost of every reject decision, subtracted from its transition's reward (0: the paper's MDP; a "
                "small cost such as 0.01 teaches the agent to accept early and not to reject candidates it ends up "
                "taking anyway, the most expensive outcome at inference)"})
    repeat_cost: float = field(default=0.0, metadata={
        "help": "cost on the decision that chose a token completing a token 4-gram its answer already holds (0: "
                "the paper's MDP; a loop then pays at every repeated token, where a sentence-level fluency reward "
                "pays once at the end)"})
    reward_baseline: Literal["none", "greedy"] = field(default="none", metadata={
        "help": "'greedy': subtract from each answer's reward the reward of the base model's own greedy answer to "
                "its prompt (ReMax's baseline): the prompt's share of the score leaves the reward, what is left is "
                "how much the answer beats the base model's; costs one plain greedy generation per rollout "
                "('none': the paper's MDP)"})
    deployed_share: float = field(default=0.0, metadata={
        "help": "share of the rollouts' episodes that decide as the agent will at inference, accepting where "
                "p(accept) > --probe-threshold, instead of sampling the actor: SAC learns off-policy, and these "
                "episodes show the critic the loops and fallbacks the thresholded agent meets (0: every episode "
                "sampled, the paper's MDP)"})
    top_k: int = field(default=40, metadata={"help": "candidates per position: the base model's top-k ..."})
    top_p: float = field(default=0.95, metadata={"help": "... then top-p, most probable first"})
    min_p: float = field(default=0.0, metadata={
        "help": "... then min-p: drop the candidates less probable than min_p x the top-1 (0: off, the paper's "
                "set; e.g. 0.25 keeps every taken token within log 4 nats of the top-1); recorded in the agent"})
    fallback: Literal["first", "last"] = field(default="last", metadata={
        "help": "when every candidate is rejected: force the last (the paper's MDP) or take the top-1; recorded "
                "in the agent so inference does the same"})
    schedule: tuple[int, ...] = field(default=ROLLOUT_SCHEDULE, metadata={
        "help": "lazy chunk boundaries of the rollouts (a sampled actor rarely walks far)"})
    updates_per_rollout: int = field(default=8, metadata={"help": "SAC updates after each rollout"})
    learning_starts: int = field(default=2048, metadata={
        "help": "transitions in the buffer before updates start"})
    checkpoint_every: int = field(default=10, metadata={"help": "iterations between checkpoints"})
    greedy_probe: int = field(default=0, metadata={
        "help": "at every checkpoint, decode this many training prompts (the first ones) greedily with the actor, "
                "as inference does, log its fallback rate, cost, reward and greedy return under `greedy` in "
                "metrics.jsonl, keep the actor in probed/step-N/ and the one with the best greedy return in "
                "best_agent/ (0: off); the rollouts' sampled forced rate says little about the greedy fallback rate"})
    probe_threshold: float = field(default=0.5, metadata={
        "help": "the accept threshold the greedy probe decodes with, and that probed/ and best_agent/ are saved "
                "with: probe at the threshold the agent will be used with (an actor trained as a stochastic "
                "policy often needs one below 0.5; the shipped SmolLM2 agents use 0.2)"})
    seed: int = field(default=0, metadata={"help": "seed of the actor's initialisation, prompt order and sampling"})
    hidden_sizes: tuple[int, int] = field(default=(1024, 256), metadata={"help": "the agent's two hidden layers"})
    initial_accept: float | None = field(default=0.9, metadata={
        "help": "a fresh actor starts accepting every candidate with about this probability (0: the plain random "
                "initialisation)", "none": "0"})
    max_staleness: int = field(default=0, metadata={
        "help": "rollouts of iteration i use the actor as it was after iteration i - S (0: the current actor, "
                "synchronous); with Ray workers the next S rollouts then run while the learner updates"})
    sac: SACConfig = field(default_factory=SACConfig)

    def __post_init__(self):
        for name in ("iterations", "rollout_batch_size", "max_new_tokens", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` has to be a positive integer, but is {value!r}.")
        for name in ("updates_per_rollout", "learning_starts", "seed", "max_staleness", "greedy_probe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` has to be a non-negative integer, but is {value!r}.")
        for name in ("kl_coef", "reject_cost", "repeat_cost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` has to be a non-negative number, but is {value!r}.")
        if isinstance(self.deployed_share, bool) or not isinstance(self.deployed_share, (int, float)) or not (
            0 <= self.deployed_share <= 1
        ):
            raise ValueError(f"`deployed_share` has to be a number in [0, 1], but is {self.deployed_share!r}.")
        if not is_accept_threshold(self.probe_threshold):
            raise ValueError(f"`probe_threshold` has to be a float in (0, 1), but is {self.probe_threshold!r}.")
        if self.initial_accept is not None and not (
            isinstance(self.initial_accept, float) and 0.0 < self.initial_accept < 1.0
        ):
            raise ValueError(f"`initial_accept` has to be a float in (0, 1) or None, but is {self.initial_accept!r}.")
        if self.reward_baseline not in BASELINES:
            raise ValueError(f"`reward_baseline` has to be one of {', '.join(BASELINES)}, but is "
                             f"{self.reward_baseline!r}.")
        validate_candidate_settings(self.top_k, self.top_p, self.fallback, min_p=self.min_p)
        self.schedule = validate_schedule(self.schedule)
        self.hidden_sizes = tuple(self.hidden_sizes)
        if isinstance(self.sac, dict):
            self.sac = SACConfig(**self.sac)
        if self.learning_starts > self.sac.buffer_size:
            raise ValueError(f"`learning_starts` ({self.learning_starts}) is more than the replay buffer holds "
                             f"(`buffer_size` {self.sac.buffer_size}): no update would ever run. Lower it, or give "
                             "the buffer more room.")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["schedule"], values["hidden_sizes"] = list(self.schedule), list(self.hidden_sizes)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def prompt_indices(count: int, iteration: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of an iteration: positions `iteration * batch_size ...` of a sequence of seeded shuffles of
    `range(count)` (one shuffle per epoch), so any iteration's prompts are known without replaying the run."""
    orders = {}
    indices = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


class Trainer:
    """Trains a MARA actor for `model` on `prompts` with `reward`, writing to `out_dir`.

    Args:
        model, tokenizer: the base causal LM (only read) and its tokenizer (prompts are wrapped in its chat
            template, as `mara-hf eval` does).
        prompts (`list[str]`): training prompts.
        reward: sentence-level reward, `(prompts, responses) -> (N,)` scores (a `mara_hf.rewards.Reward`, a
            weighted sum, or any callable).
        out_dir: run folder: `metrics.jsonl`, `checkpoints/`, and the final agent in `agent/`.
        config ([`TrainConfig`]).
        agent ([`MaraAgent`], *optional*): start from this actor instead of a fresh one (seeded by `config.seed`).
        base_model_name (`str`, *optional*): recorded in the agent's config.
        description (`str`, *optional*): recorded as the agent's `training` note (e.g. the command line).
        tensorboard (`bool`): also write TensorBoard scalars to `out_dir/tensorboard` (needs `tensorboard`).
        progress (`bool`): show a progress bar.

    Example: `mara-hf train` (see `mara_hf/commands/train.py`) builds a Trainer from the command line; in Python,
    `Trainer(model, tokenizer, prompts, VaderReward(), "runs/vader", TrainConfig(iterations=200)).train()`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence,
        reward: Callable,
        out_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        agent: MaraAgent | None = None,
        base_model_name: str | None = None,
        description: str | None = None,
        tensorboard: bool = False,
        progress: bool = True,
    ):
        self.model, self.tokenizer, self.reward = model, tokenizer, reward
        head = model.get_output_embeddings()
        self._setup_learner(prompts, out_dir, config, state_dim=head.weight.shape[1],
                            device=hf.execution_device(head), agent=agent, base_model_name=base_model_name,
                            description=description, tensorboard=tensorboard, progress=progress)
        self.eos_ids = eos_token_ids(model, tokenizer)

    def _setup_learner(self, prompts, out_dir, config, *, state_dim: int, device, agent, base_model_name,
                       description, tensorboard: bool, progress: bool) -> None:
        """Everything but the base model: prompts, run folder, actor, learner, buffer, generators, counters."""
        self.config = config = config if config is not None else TrainConfig()
        if not prompts:
            raise ValueError("`prompts` is empty: give at least one training prompt.")
        self.prompts = list(prompts)
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        if agent is None:
            agent = MaraAgent(state_dim, hidden_sizes=config.hidden_sizes, base_model=base_model_name,
                              top_k=config.top_k, top_p=config.top_p, fallback=config.fallback, min_p=config.min_p)
            if config.initial_accept is not None:
                # Start near the base model: every candidate accepted with about this probability (cheap rollouts
                # that explore around the base model's own answers).
                with torch.no_grad():
                    agent.output_linear.weight.mul_(0.1)
                    agent.output_linear.bias.copy_(torch.tensor([0.0, math.log(config.initial_accept /
                                                                                (1 - config.initial_accept))]))
        elif agent.state_dim != state_dim:
            raise ValueError(f"The agent reads states of size {agent.state_dim}, but the model's hidden size is "
                             f"{state_dim}: start from a fresh agent or one trained for this model.")
        elif tuple(agent.hidden_sizes) != tuple(config.hidden_sizes):
            raise ValueError(f"The agent to start from has hidden layers {tuple(agent.hidden_sizes)}, but the training "
                             f"config asks for {tuple(config.hidden_sizes)} (`hidden_sizes`, `--hidden-sizes`): set "
                             f"them to the agent's, or start from a fresh agent.")
        else:  # from now on it is trained for this base model
            agent.base_model = base_model_name or agent.base_model
        # Inference must use the candidate set and fallback the agent was trained with.
        agent.top_k, agent.top_p, agent.min_p = config.top_k, config.top_p, config.min_p
        agent.fallback = config.fallback
        agent.training_info = description or agent.training_info
        self.agent = agent.to(self.device)
        self.sac = DiscreteSAC(self.agent, config.sac)
        self.buffer = ReplayBuffer(config.sac.buffer_size, state_dim, device=self.device)
        self.sample_generator = torch.Generator().manual_seed(config.seed + 1)
        self.iteration = 0
        self.versions: dict[int, dict[str, torch.Tensor]] = {}  # older actors that max_staleness still needs
        self.tensorboard = tensorboard
        self.progress = progress

    # ------------------------------------------------------------------ one iteration
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input ids and attention mask, chat-formatted like `mara-hf eval`."""
        encoded = encode_chat_prompts(self.tokenizer, prompts, hf.input_device(self.model))
        return encoded["input_ids"], encoded["attention_mask"]

    def batch_prompts(self, iteration: int) -> list[str]:
        """The prompts of `iteration`, in the order of the rows of its rollout batch."""
        indices = prompt_indices(len(self.prompts), iteration, self.config.rollout_batch_size, self.config.seed)
        return [self.prompts[i] for i in indices]

    def weights_version(self, iteration: int) -> int:
        """The actor the rollouts of `iteration` use: the one after iteration `max(0, iteration - max_staleness)`."""
        return max(0, iteration - self.config.max_staleness)

    def actor_weights(self, version: int) -> dict[str, torch.Tensor]:
        """The actor's weights after iteration `version` (the current ones, or a kept older version)."""
        if version == self.iteration:
            return self.agent.state_dict()
        if version not in self.versions:
            raise RuntimeError(f"The actor after iteration {version} was not kept (now at {self.iteration}).")
        return self.versions[version]

    def rollout_actor(self, iteration: int) -> MaraAgent:
        """The actor that plays the rollouts of `iteration` (see `weights_version`)."""
        version = self.weights_version(iteration)
        if version == self.iteration:
            return self.agent
        actor = copy.deepcopy(self.agent)
        actor.load_state_dict(self.actor_weights(version))
        return actor.eval()

    def collect(self) -> tuple[Batch, dict]:
        """Roll out this iteration's batch here: its transitions and totals (see [`rollout_transitions`])."""
        prompts = self.batch_prompts(self.iteration)
        return rollout_transitions(self.model, self.tokenizer, self.reward, self.rollout_actor(self.iteration),
                                   prompts, self.config, row_generators(self.config.seed, self.iteration,
                                                                        range(len(prompts))), self.eos_ids)

    def step(self) -> dict:
        """Run one iteration (rollout, transitions, updates) and return its metrics."""
        started = time.perf_counter()
        transitions, totals = self.collect()
        return self.learn(transitions, totals, started=started, rollout_seconds=time.perf_counter() - started)

    def learn(self, transitions: Batch, totals: dict, *, started: float, rollout_seconds: float, **extra) -> dict:
        """The learner's half of an iteration: add its transitions to the buffer, run the SAC updates, count the
        iteration; returns its metrics (`extra` is added to them)."""
        config = self.config
        self.buffer.add(*transitions)
        if config.max_staleness:
            self.versions[self.iteration] = {k: v.detach().to("cpu", copy=True)
                                             for k, v in self.agent.state_dict().items()}
        losses: dict[str, float] = {}
        updates = config.updates_per_rollout if len(self.buffer) >= max(config.learning_starts, 1) else 0
        self.agent.train()
        for _ in range(updates):
            for key, value in self.sac.update(self.buffer.sample(config.sac.batch_size, self.sample_generator)).items():
                losses[key] = losses.get(key, 0.0) + value / updates
        self.agent.eval()
        version = self.weights_version(self.iteration)
        self.iteration += 1
        self.versions = {v: w for v, w in self.versions.items() if v >= self.weights_version(self.iteration)}
        return {
            "iteration": self.iteration,
            "episodes": self.iteration * config.rollout_batch_size,
            "reward": totals["reward"] / max(totals["rows"], 1.0),
            **({"baseline_reward": totals["baseline_reward"] / max(totals["rows"], 1.0)}
               if "baseline_reward" in totals else {}),
            **rollout_metrics(totals),
            "transitions": int(transitions.actions.shape[0]),
            "buffer_size": len(self.buffer),
            "updates": self.sac.num_updates,
            "alpha": self.sac.alpha,
            **losses,
            **({"weights_version": version} if config.max_staleness else {}),
            **extra,
            "rollout_seconds": rollout_seconds,
            "seconds": time.perf_counter() - started,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "sac": self.sac.state_dict(),
            "buffer": self.buffer.state_dict(),
            "sample_generator": self.sample_generator.get_state(),
            "actor_versions": [[version, weights] for version, weights in sorted(self.versions.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        saved, current = TrainConfig.from_dict(state["config"]).to_dict(), self.config.to_dict()
        # Neither the length of a run nor its probe changes what it learns: a resumed run may change both (the
        # probe's threshold only where no episode decides by it, `deployed_share`).
        free = {"iterations", "greedy_probe"} | ({"probe_threshold"} if not saved["deployed_share"] else set())
        differs = sorted(k for k in saved if k not in free and saved[k] != current[k])
        if differs:
            raise ValueError(f"The checkpoint was written with other settings ({', '.join(differs)}); resume with "
                             "the same settings or use another output folder.")
        self.sac.load_state_dict(state["sac"])
        self.buffer.load_state_dict(state["buffer"])
        self.sample_generator.set_state(state["sample_generator"])
        self.iteration = state["iteration"]
        # Older actors that max_staleness still needs (runs of earlier releases have none, and no staleness).
        self.versions = {int(version): weights for version, weights in state.get("actor_versions", [])}

    def save(self) -> Path:
        return save_checkpoint(self.out_dir / CHECKPOINTS, f"step-{self.iteration:07d}", self.agent, self.state_dict())

    def resume(self) -> bool:
        """Load the latest checkpoint of `out_dir` if there is one; drop metric lines written after it (without a
        checkpoint, all of them: those iterations are run again)."""
        path = latest_checkpoint(self.out_dir / CHECKPOINTS)
        if path is not None:
            _, state = load_checkpoint(path)
            try:
                self.load_state_dict(state)
            except (KeyError, TypeError, IndexError, RuntimeError) as err:
                raise damaged(path, f"its training state does not load ({type(err).__name__}: {err})") from None
        self._cut_metrics()
        return path is not None

    def _cut_metrics(self) -> None:
        """Keep one metric line per iteration up to `self.iteration`, the last written: lines of later iterations
        (they are run again) and of a run restarted without a checkpoint go, and so does an unreadable last line
        (a run killed while writing it)."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        kept = {}
        for number, line in lines:
            try:
                record = json.loads(line)
                iteration = record["iteration"]
                if not isinstance(iteration, int):
                    raise TypeError(f"iteration {iteration!r}")
            except (ValueError, KeyError, TypeError) as err:
                if number == lines[-1][0]:
                    break  # half-written by a killed run
                raise ValueError(f"Line {number} of '{path}' is not a metrics record ({type(err).__name__}: {err}): "
                                 "delete that line and run again.") from None
            if iteration <= self.iteration:
                kept.pop(iteration, None)
                kept[iteration] = line
        new = "".join(line + "\n" for line in kept.values())
        if new != text:
            write_atomic(path, new)

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = True, time_limit: float | None = None) -> MaraAgent:
        """Run (or, with `resume`, continue) until `config.iterations`; save and return the agent.

        With `time_limit` (seconds), stop after the first iteration that ends past it: a checkpoint and the agent
        are written then too, and a later call with `resume` goes on from there."""
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"`time_limit` has to be positive (seconds), but is {time_limit}.")
        deadline = None if time_limit is None else time.perf_counter() + time_limit
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
            if self.iteration >= self.config.iterations:
                logger.warning("'%s' already holds %d rollouts (iterations: %d): nothing to train; the agent is "
                               "written again. Give more iterations (--iterations) to go on.", self.out_dir,
                               self.iteration, self.config.iterations)
        elif (self.out_dir / CHECKPOINTS).exists():
            raise ValueError(f"'{self.out_dir}' already holds checkpoints: resume, or use another output folder.")
        else:
            self._cut_metrics()
        writer = _tensorboard_writer(self.out_dir) if self.tensorboard else None
        bar = progress_bar(self.config.iterations, initial=self.iteration, desc="mara-hf train", unit="rollout",
                           enabled=self.progress)
        try:
            with open(self.out_dir / METRICS_FILE, "a") as metrics_file:
                while self.iteration < self.config.iterations:
                    metrics = self.step()
                    out_of_time = deadline is not None and time.perf_counter() >= deadline
                    checkpoint = (self.iteration % self.config.checkpoint_every == 0 or out_of_time
                                  or self.iteration == self.config.iterations)
                    if checkpoint and self.config.greedy_probe:
                        metrics["greedy"] = self.probe()
                        self.keep_probed(metrics["greedy"])
                        self.keep_best(metrics["greedy"])
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for key, value in scalars(metrics, "train"):
                            writer.add_scalar(key, value, self.iteration)
                    if checkpoint:
                        self.save()
                    bar.set_postfix(reward=f"{metrics['reward']:.3f}", accept=f"{metrics['accept_rate']:.2f}",
                                    kl=f"{metrics['kl_per_token']:.3f}", refresh=False)
                    bar.update(1)
                    if out_of_time:
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            self.stop()
        self.agent.save_pretrained(self.out_dir / FINAL_AGENT)
        return self.agent

    def probe_prompts(self) -> list[str]:
        """The prompts of the greedy probe: the first `greedy_probe` training prompts."""
        return self.prompts[:self.config.greedy_probe]

    def probe(self) -> dict[str, float]:
        """Decode the probe prompts greedily with the current actor ([`greedy_probe`], at `probe_threshold`): its
        inference statistics, reward and greedy return."""
        return greedy_probe(self.model, self.tokenizer, self.agent, self.probe_prompts(), self.config, self.eos_ids,
                            self.config.probe_threshold, reward=self.reward)

    def best_probe(self) -> dict | None:
        """The probe of the actor in `best_agent/` (with its `iteration`), or None."""
        path = self.out_dir / BEST_AGENT / PROBE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def keep_probed(self, probe: dict) -> Path:
        """Save the probed actor with its probe to `probed/step-N/` (a few MB): a run's last actor is not always its
        best, and the trainer keeps only its two newest checkpoints."""
        return self._save_actor(self.out_dir / PROBED_AGENTS / f"step-{self.iteration:07d}", probe)

    def keep_best(self, probe: dict) -> bool:
        """Save the current actor to `best_agent/` (with `probe.json`) if its greedy return beats the best so far.
        (A run resumed from an earlier checkpoint probes the same actors again, as far as it replays them bit for
        bit, and finds the same best.)"""
        best = self.best_probe()
        if best is not None and not probe["return"] > best["return"]:
            return False
        self._save_actor(self.out_dir / BEST_AGENT, probe)
        return True

    def _save_actor(self, folder: Path, probe: dict) -> Path:
        """The current actor as a native agent in `folder`, with the threshold it was probed at, and its probe (and
        iteration) in `probe.json`."""
        probed = copy.deepcopy(self.agent)  # a few MB; the training actor keeps its own threshold
        probed.accept_threshold = self.config.probe_threshold
        probed.save_pretrained(folder)
        write_atomic(folder / PROBE_FILE, json.dumps({**probe, "iteration": self.iteration}, indent=2) + "\n")
        return folder

    def stop(self) -> None:
        """Called when `train` returns or fails; rollouts run here, so there is nothing to stop."""


def rollout_transitions(model, tokenizer, reward: Callable, actor: MaraAgent, prompts: list[str], config: TrainConfig,
                        generators: Sequence[torch.Generator], eos_ids: list[int] | None = None) -> tuple[Batch, dict]:
    """Roll out `prompts` (rows of an iteration's batch) with `actor`, score the answers with `reward` and build
    the replay transitions. Returns them and the totals the iteration's metrics are made of ([`Rollout.totals`] plus
    `reward`, the sum of the scores), which add up over the shards of a batch. Ray workers call this too.

    `generators`: one per row ([`row_generators`] of the rows' places in the batch)."""
    device = hf.input_device(model)
    encoded = encode_chat_prompts(tokenizer, prompts, device)
    if eos_ids is None:
        eos_ids = eos_token_ids(model, tokenizer)
    actor.eval()
    episodes = rollout(
        model, actor, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=config.max_new_tokens,
        eos_token_ids=eos_ids, pad_token_id=pad_token_id(tokenizer), generator=list(generators),
        top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, fallback=config.fallback, schedule=config.schedule,
        deployed_share=config.deployed_share, deployed_threshold=config.probe_threshold,
    )
    responses = decode_answers(tokenizer, episodes.tokens, episodes.lengths)
    scores = answer_scores(reward, prompts, responses).float()
    totals = {**episodes.totals(), "reward": float(scores.double().sum())}
    terminal = scores
    if config.reward_baseline == "greedy":
        baseline = baseline_scores(model, tokenizer, reward, prompts, encoded, config.max_new_tokens, eos_ids)
        terminal = scores - baseline
        totals["baseline_reward"] = float(baseline.double().sum())
    transitions = build_transitions(episodes, terminal, config.kl_coef, reject_cost=config.reject_cost,
                                    repeat_cost=config.repeat_cost)
    return transitions, totals


def scalars(metrics: dict, prefix: str):
    """`(name, value)` of every number in a metrics record, nested ones (the per-worker metrics of a Ray run) named
    by their path: `train/reward`, `train/workers/0/reward`."""
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from scalars(value, name)
        elif isinstance(value, list):
            yield from scalars({str(i): item for i, item in enumerate(value)}, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("TensorBoard logging needs the `tensorboard` package: `pip install tensorboard`.") from err
    return SummaryWriter(str(out_dir / "tensorboard"))
