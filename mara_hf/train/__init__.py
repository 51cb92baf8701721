"""Training MARA agents: rollouts of the accept/reject MDP, discrete soft actor-critic, replay buffer, trainer."""

from .buffer import Batch, ReplayBuffer
from .probe import greedy_probe
from .rollout import Rollout, build_transitions, rollout, row_generators
from .sac import (
    Critic,
    DiscreteSAC,
    SACConfig,
    actor_loss,
    alpha_loss,
    critic_loss,
    critic_target,
    soft_update,
)
from .trainer import Trainer, TrainConfig, rollout_transitions

__all__ = [
    "Batch",
    "Critic",
    "DiscreteSAC",
    "ReplayBuffer",
    "Rollout",
    "SACConfig",
    "TrainConfig",
    "Trainer",
    "actor_loss",
    "alpha_loss",
    "build_transitions",
    "critic_loss",
    "critic_target",
    "greedy_probe",
    "rollout",
    "rollout_transitions",
    "row_generators",
    "soft_update",
]
