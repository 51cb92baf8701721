"""A preallocated ring replay buffer of (state, action, reward, next_state, done, advances) transitions.

States are LLM hidden states (thousands of floats each), so they are stored in float16 by default: one transition
of a 4096-d model costs about 16 KiB, and `nbytes` reports what the buffer actually holds in memory. Everything is
allocated once in `__init__`; nothing grows afterwards.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Batch(NamedTuple):
    """A batch of transitions; unpacks as `states, actions, rewards, next_states, dones, advances`.

    `advances`: a token was taken between the state and the next one (an accept, a forced or fallback token, or
    the episode's end), as opposed to a reject that moves to the next candidate of the same position. It tells
    `SACConfig.discount="token"` which transitions gamma discounts; None: every transition does."""

    states: torch.Tensor  # [B, state_dim] float32
    actions: torch.Tensor  # [B] int64, 0 = reject, 1 = accept
    rewards: torch.Tensor  # [B] float32
    next_states: torch.Tensor  # [B, state_dim] float32
    dones: torch.Tensor  # [B] bool
    advances: torch.Tensor | None = None  # [B] bool


class ReplayBuffer:
    """Fixed-capacity ring buffer; the oldest transitions are overwritten once it is full.

    Args:
        capacity (`int`): most transitions held.
        state_dim (`int`): size of each state.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the storage lives (and samples are returned).
        state_dtype (`torch.dtype`, defaults to `torch.float16`): storage dtype of states and next states.
    """

    def __init__(
        self,
        capacity: int,
        state_dim: int,
        device: str | torch.device = "cpu",
        state_dtype: torch.dtype = torch.float16,
    ):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"`capacity` has to be a positive integer, but is {capacity!r}.")
        if not isinstance(state_dim, int) or isinstance(state_dim, bool) or state_dim <= 0:
            raise ValueError(f"`state_dim` has to be a positive integer, but is {state_dim!r}.")
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise ValueError(f"`state_dtype` has to be a floating point torch dtype, but is {state_dtype!r}.")
        self.capacity = capacity
        self.state_dim = state_dim
        self.device = torch.device(device)
        self.state_dtype = state_dtype
        self.states = torch.zeros(capacity, state_dim, dtype=state_dtype, device=self.device)
        self.next_states = torch.zeros(capacity, state_dim, dtype=state_dtype, device=self.device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.dones = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.advances = torch.ones(capacity, dtype=torch.bool, device=self.device)
        self.pos = 0  # where the next transition is written
        self.size = 0  # how many slots hold a transition

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the storage tensors (fixed at construction)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "states": self.states,
            "actions": self.actions,
            "rewards": self.rewards,
            "next_states": self.next_states,
            "dones": self.dones,
            "advances": self.advances,
        }

    def add(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_states: torch.Tensor,
        dones: torch.Tensor,
        advances: torch.Tensor | None = None,
    ) -> None:
        """Add `n` transitions at once: states and next states `[n, state_dim]`, the rest `[n]`.

        Actions are 0 (reject) or 1 (accept); `advances` None means every transition took a token. If `n` exceeds
        the capacity only the last `capacity` are kept.
        """
        if states.ndim != 2 or states.shape[1] != self.state_dim:
            raise ValueError(f"`states` has to have shape [n, {self.state_dim}], but has {list(states.shape)}.")
        n = states.shape[0]
        if next_states.shape != states.shape:
            raise ValueError(
                f"`next_states` has to have the shape of `states` {list(states.shape)}, "
                f"but has {list(next_states.shape)}."
            )
        if advances is None:
            advances = torch.ones(n, dtype=torch.bool, device=dones.device)
        for name, value in (("actions", actions), ("rewards", rewards), ("dones", dones), ("advances", advances)):
            if value.shape != (n,):
                raise ValueError(f"`{name}` has to have shape [{n}], but has {list(value.shape)}.")
        if actions.is_floating_point() or actions.is_complex():
            raise ValueError(f"`actions` has to be an integer or bool tensor, but has dtype {actions.dtype}.")
        if n and not bool(((actions == 0) | (actions == 1)).all()):
            raise ValueError("`actions` has to hold only 0 (reject) and 1 (accept).")
        if n == 0:
            return
        if n > self.capacity:  # only the newest `capacity` transitions would survive anyway
            skip = n - self.capacity
            self.pos = (self.pos + skip) % self.capacity
            states, actions, rewards = states[skip:], actions[skip:], rewards[skip:]
            next_states, dones, advances = next_states[skip:], dones[skip:], advances[skip:]
            n = self.capacity
        idx = (self.pos + torch.arange(n, device=self.device)) % self.capacity
        self.states[idx] = states.to(device=self.device, dtype=self.state_dtype)
        self.next_states[idx] = next_states.to(device=self.device, dtype=self.state_dtype)
        self.actions[idx] = actions.to(device=self.device, dtype=torch.int64)
        self.rewards[idx] = rewards.to(device=self.device, dtype=torch.float32)
        self.dones[idx] = dones.to(device=self.device, dtype=torch.bool)
        self.advances[idx] = advances.to(device=self.device, dtype=torch.bool)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """Draw `batch_size` transitions uniformly with replacement; states come back as float32.

        `generator` (a CPU `torch.Generator`) makes the draw reproducible.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"`batch_size` has to be a positive integer, but is {batch_size!r}.")
        if self.size == 0:
            raise ValueError("Cannot sample from an empty replay buffer: add transitions first.")
        idx = torch.randint(self.size, (batch_size,), generator=generator).to(self.device)
        return Batch(
            states=self.states[idx].float(),
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_states=self.next_states[idx].float(),
            dones=self.dones[idx],
            advances=self.advances[idx],
        )

    def state_dict(self) -> dict[str, Any]:
        """The filled part of the buffer plus its position, for checkpointing (tensors are copies)."""
        state = {name: t[: self.size].clone() for name, t in self._tensors().items()}
        state.update(capacity=self.capacity, state_dim=self.state_dim, pos=self.pos, size=self.size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; capacity and state size have to match this buffer's."""
        if state.get("capacity") != self.capacity or state.get("state_dim") != self.state_dim:
            raise ValueError(
                f"The checkpoint is for a buffer of capacity {state.get('capacity')!r} and state size "
                f"{state.get('state_dim')!r}, but this buffer has capacity {self.capacity} and state size "
                f"{self.state_dim}."
            )
        size, pos = state["size"], state["pos"]
        for name, t in self._tensors().items():
            if name == "advances" and name not in state:  # checkpoints written before the field existed
                t.fill_(True)
                continue
            t.zero_()
            t[:size] = state[name].to(device=self.device, dtype=t.dtype)
        self.size, self.pos = size, pos
