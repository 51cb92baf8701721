"""Training MARA agents: the discrete soft actor-critic core and its replay buffer."""

from .buffer import Batch, ReplayBuffer
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

__all__ = [
    "Batch",
    "Critic",
    "DiscreteSAC",
    "ReplayBuffer",
    "SACConfig",
    "actor_loss",
    "alpha_loss",
    "critic_loss",
    "critic_target",
    "soft_update",
]
