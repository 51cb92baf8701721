"""Discrete soft actor-critic for MARA agents, in the style of CleanRL's discrete SAC (`sac_atari.py`).

The actor is a `MaraAgent` (two actions: 0 = reject, 1 = accept the candidate token); two critics with the same
trunk give Q-values for both actions. With `pi = softmax(actor.logits(s))` and `alpha = exp(log_alpha)`:

    target      = r + gamma * (1 - done) * sum_a pi(a|s') * (min(Q1', Q2')(s', a) - alpha * log pi(a|s'))
    critic loss = MSE(Q1(s, a), target) + MSE(Q2(s, a), target)
    actor loss  = mean_s sum_a pi(a|s) * (alpha * log pi(a|s) - min(Q1, Q2)(s, a))
    alpha loss  = mean_s -log_alpha * (sum_a pi(a|s) * log pi(a|s) + target_entropy)

Q1', Q2' are Polyak-averaged target critics. The alpha loss is the "log_alpha times entropy gap" form: its gradient
in `log_alpha` is `entropy - target_entropy`, so alpha shrinks while the policy is more random than the target and
grows when it is less. One `DiscreteSAC.update` does one critic step, one actor step, one alpha step, then the
soft target update, in that order (as CleanRL with `policy_frequency=1`).

The math lives in pure functions (`critic_target`, `critic_loss`, `actor_loss`, `alpha_loss`, `soft_update`) so
it can be checked by hand on tiny tensors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..agent import MaraAgent


# ---------------------------------------------------------------------------------------------- critic network
class Critic(nn.Module):
    """Q-values `[..., 2]` for (reject, accept): the agent's own trunk (LayerNorm -> Linear -> ReLU -> Linear ->
    ReLU -> Linear(., 2)) with unnormalised outputs. The output layer starts at zero: Q = 0 for both actions
    until the critic has seen data, so a fresh critic does not push the actor towards arbitrary actions."""

    def __init__(self, state_dim: int, hidden_sizes: Sequence[int] = (1024, 256)):
        super().__init__()
        self.net = MaraAgent(state_dim=state_dim, hidden_sizes=hidden_sizes)
        nn.init.zeros_(self.net.output_linear.weight)
        nn.init.zeros_(self.net.output_linear.bias)
        self.state_dim = state_dim
        self.hidden_sizes = list(hidden_sizes)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net.logits(states)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class SACConfig:
    """Hyperparameters of the learner, defaulting to the MARA paper code's values. Each field's `help` (its
    metadata) is declared here once; `mara-hf train` builds its options from it (`--lr` sets the critic's rate and,
    unless `--actor-lr` / `--alpha-lr` are given, the actor's and alpha's)."""

    critic_lr: float = field(default=3e-4, metadata={
        "help": "critic learning rate; also the actor's and alpha's unless --actor-lr / --alpha-lr are given",
        "flag": "--lr"})
    actor_lr: float = field(default=3e-4, metadata={"help": "actor learning rate", "same_as": "critic_lr"})
    alpha_lr: float = field(default=3e-4, metadata={"help": "temperature (alpha) learning rate",
                                                    "same_as": "critic_lr"})
    batch_size: int = field(default=1024, metadata={"help": "transitions per SAC update", "flag": "--sac-batch-size"})
    gamma: float = field(default=0.99, metadata={"help": "discount per decision (see --discount)"})
    discount: Literal["decision", "token"] = field(default="decision", metadata={
        "help": "what gamma discounts: every decision (the paper's MDP) or every token taken (a reject that moves "
                "to the next candidate is not discounted, so it does not postpone the answer's reward: under "
                "'decision' rejecting every candidate of a position delays a negative reward, which rewards "
                "all-reject cascades)"})
    tau: float = field(default=0.005, metadata={"help": "Polyak averaging rate of the target critics, in (0, 1]"})
    buffer_size: int = field(default=1_000_000, metadata={
        "help": "replay buffer capacity in transitions (fp16 states, allocated once: 1e6 x 576-d = 2.2 GiB)"})
    initial_alpha: float = field(default=0.01, metadata={"help": "initial entropy temperature"})
    target_entropy: float = field(default=0.6 * math.log(2), metadata={
        "help": "policy entropy alpha steers towards, in nats, in [0, log 2]", "default_text": "0.6 * log 2"})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "gradient-norm clipping of actor and critics (None, in Python only: no clipping)"})
    autotune: bool = field(default=True, metadata={
        "help": "learn alpha, the entropy temperature (--no-autotune keeps it at --initial-alpha)"})
    actor_delay: int = field(default=0, metadata={
        "help": "first updates that train the critics only (the actor and alpha wait)"})

    def __post_init__(self):
        for name in ("actor_lr", "critic_lr", "alpha_lr", "initial_alpha"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"`{name}` has to be a positive float, but is {value!r}.")
        if not isinstance(self.actor_delay, int) or isinstance(self.actor_delay, bool) or self.actor_delay < 0:
            raise ValueError(f"`actor_delay` has to be a non-negative integer, but is {self.actor_delay!r}.")
        for name in ("batch_size", "buffer_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` has to be a positive integer, but is {value!r}.")
        if not _is_real(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` has to be a float in [0, 1], but is {self.gamma!r}.")
        if self.discount not in ("decision", "token"):
            raise ValueError(f"`discount` has to be 'decision' or 'token', but is {self.discount!r}.")
        if not _is_real(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"`tau` has to be a float in (0, 1], but is {self.tau!r}.")
        if not _is_real(self.target_entropy) or not 0.0 <= self.target_entropy <= math.log(2):
            raise ValueError(
                f"`target_entropy` has to be a float in [0, log(2)] (two actions), but is {self.target_entropy!r}."
            )
        if self.max_grad_norm is not None and (not _is_real(self.max_grad_norm) or not self.max_grad_norm > 0):
            raise ValueError(f"`max_grad_norm` has to be a positive float or None, but is {self.max_grad_norm!r}.")
        if not isinstance(self.autotune, bool):
            raise ValueError(f"`autotune` has to be a bool, but is {self.autotune!r}.")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- pure math
def critic_target(
    next_logits: torch.Tensor,
    next_q1_target: torch.Tensor,
    next_q2_target: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    alpha: float | torch.Tensor,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """Soft Bellman target `[B]` from the actor's next-state logits and the target critics' next Q-values `[B, 2]`;
    `gamma` is a float or one discount per transition `[B]`."""
    next_probs = torch.softmax(next_logits, dim=-1)
    next_logp = torch.log_softmax(next_logits, dim=-1)
    min_q = torch.min(next_q1_target, next_q2_target)
    v_next = (next_probs * (min_q - alpha * next_logp)).sum(-1)
    return rewards + gamma * (1.0 - dones.float()) * v_next


def transition_discounts(advances: torch.Tensor | None, gamma: float, discount: str = "decision"):
    """The discount of each transition: `gamma` for all (`"decision"`), or, with `"token"`, `gamma` where a token
    was taken (`advances`, see `Batch`) and 1 for a reject that moves to the next candidate of the same position
    (the return then discounts per token, however many candidates were rejected on the way). `advances=None`:
    every transition took a token.

    ```python
    >>> import torch
    >>> from mara_hf.train.sac import transition_discounts
    >>> transition_discounts(torch.tensor([True, False, False, True]), 0.5, "token").tolist()
    [0.5, 1.0, 1.0, 0.5]

    ```
    """
    if discount == "decision" or advances is None:
        return gamma
    return torch.where(advances.bool(), gamma, 1.0)


def critic_loss(
    q1: torch.Tensor, q2: torch.Tensor, actions: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of both critics' Q-values `[B, 2]` at the taken actions `[B]` against `target` `[B]`: (q1_loss, q2_loss)."""
    index = actions.long().unsqueeze(-1)
    q1_a = q1.gather(-1, index).squeeze(-1)
    q2_a = q2.gather(-1, index).squeeze(-1)
    return F.mse_loss(q1_a, target), F.mse_loss(q2_a, target)


def actor_loss(logits: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """`mean(sum_a pi * (alpha * log pi - min(Q1, Q2)))`; the Q-values are detached (they only weigh the actions)."""
    probs = torch.softmax(logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    min_q = torch.min(q1, q2).detach()
    return (probs * (alpha * logp - min_q)).sum(-1).mean()


def alpha_loss(logits: torch.Tensor, log_alpha: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """`mean(-log_alpha * (sum_a pi * log pi + target_entropy))` with the entropy gap detached.

    d/d log_alpha = mean(entropy) - target_entropy: gradient descent lowers alpha while entropy is above target.
    """
    probs = torch.softmax(logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    gap = ((probs * logp).sum(-1) + target_entropy).detach()
    return (-log_alpha * gap).mean()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging in place: `target <- tau * source + (1 - tau) * target` (parameters and float buffers)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, tau)
        else:
            t.copy_(s)


# ---------------------------------------------------------------------------------------------- the learner
class DiscreteSAC:
    """Discrete SAC learner around a `MaraAgent` actor.

    Args:
        actor (`MaraAgent`): the policy being trained (updated in place); critics are built with its state size
            and hidden sizes on its device.
        config (`SACConfig`, *optional*): hyperparameters (paper defaults).
    """

    def __init__(self, actor: MaraAgent, config: SACConfig | None = None):
        if not isinstance(actor, MaraAgent):
            raise TypeError(f"`actor` has to be a MaraAgent, but is {type(actor).__name__}.")
        config = SACConfig() if config is None else config
        if not isinstance(config, SACConfig):
            raise TypeError(f"`config` has to be a SACConfig, but is {type(config).__name__}.")
        self.config = config
        self.actor = actor
        self.device = actor.ln.weight.device

        self.q1 = Critic(actor.state_dim, actor.hidden_sizes).to(self.device)
        self.q2 = Critic(actor.state_dim, actor.hidden_sizes).to(self.device)
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False)

        self.log_alpha = torch.tensor(math.log(config.initial_alpha), device=self.device, requires_grad=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=config.critic_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr)
        self.num_updates = 0

    @property
    def alpha(self) -> float:
        return self.log_alpha.exp().item()

    def _clip(self, params) -> float:
        """Clip the gradient norm (if configured) and return the norm before clipping."""
        params = [p for p in params if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        return float(nn.utils.clip_grad_norm_(params, max_norm))

    def update(self, batch: Sequence[torch.Tensor]) -> dict[str, float]:
        """One SAC step on `batch = (states, actions, rewards, next_states, dones[, advances])` (e.g. a
        `ReplayBuffer.sample`; without `advances` every transition counts as taking a token)."""
        states, actions, rewards, next_states, dones = (t.to(self.device) for t in batch[:5])
        advances = batch[5] if len(batch) > 5 else None
        advances = None if advances is None else advances.to(self.device)
        states, next_states, rewards = states.float(), next_states.float(), rewards.float()
        alpha = self.log_alpha.exp().detach()

        # 1. critics: regress Q(s, a) onto the soft Bellman target
        with torch.no_grad():
            target = critic_target(
                self.actor.logits(next_states),
                self.q1_target(next_states),
                self.q2_target(next_states),
                rewards,
                dones,
                alpha,
                transition_discounts(advances, self.config.gamma, self.config.discount),
            )
        q1, q2 = self.q1(states), self.q2(states)
        q1_loss, q2_loss = critic_loss(q1, q2, actions, target)
        q_loss = q1_loss + q2_loss
        self.critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_grad_norm = self._clip([*self.q1.parameters(), *self.q2.parameters()])
        self.critic_optimizer.step()

        # 2. actor: maximise soft value under the (just updated) critics
        logits = self.actor.logits(states)
        with torch.no_grad():
            q1_pi, q2_pi = self.q1(states), self.q2(states)
        pi_loss = actor_loss(logits, q1_pi, q2_pi, alpha)
        learn_policy = self.num_updates >= self.config.actor_delay
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_grad_norm = 0.0
        if learn_policy:
            pi_loss.backward()
            actor_grad_norm = self._clip(self.actor.parameters())
            self.actor_optimizer.step()

        # 3. temperature: steer the policy entropy towards target_entropy
        logits = logits.detach()
        a_loss = alpha_loss(logits, self.log_alpha, self.config.target_entropy)
        if self.config.autotune and learn_policy:
            self.alpha_optimizer.zero_grad(set_to_none=True)
            a_loss.backward()
            self.alpha_optimizer.step()

        # 4. targets
        soft_update(self.q1_target, self.q1, self.config.tau)
        soft_update(self.q2_target, self.q2, self.config.tau)
        self.num_updates += 1

        probs, logp = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
        index = actions.long().unsqueeze(-1)
        return {
            "critic_loss": q_loss.item(),
            "q1_loss": q1_loss.item(),
            "q2_loss": q2_loss.item(),
            "actor_loss": pi_loss.item(),
            "alpha_loss": a_loss.item(),
            "alpha": self.alpha,
            "entropy": -(probs * logp).sum(-1).mean().item(),
            "q_mean": ((q1.gather(-1, index) + q2.gather(-1, index)) / 2).mean().item(),
            "target_mean": target.mean().item(),
            "accept_probability": probs[..., 1].mean().item(),
            "actor_grad_norm": actor_grad_norm,
            "critic_grad_norm": critic_grad_norm,
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume. Like `nn.Module.state_dict`, tensors may share storage with the
        live learner: save it (`torch.save`) or deep-copy it before further updates."""
        return {
            "actor": self.actor.state_dict(),
            "q1": self.q1.state_dict(),
            "q2": self.q2.state_dict(),
            "q1_target": self.q1_target.state_dict(),
            "q2_target": self.q2_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "num_updates": self.num_updates,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (the config stays this learner's own)."""
        self.actor.load_state_dict(state["actor"])
        self.q1.load_state_dict(state["q1"])
        self.q2.load_state_dict(state["q2"])
        self.q1_target.load_state_dict(state["q1_target"])
        self.q2_target.load_state_dict(state["q2_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.num_updates = state["num_updates"]
