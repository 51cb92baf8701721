"""The MARA agent: a small MLP that accepts or rejects one candidate token from its LLM state.

The architecture is exactly the released actors' (IAAR-Shanghai/MARA_AGENTS):
``LayerNorm(d) -> Linear(d, 1024) -> ReLU -> Linear(1024, 256) -> ReLU -> Linear(256, 2) -> softmax``,
index 1 meaning "accept". Layer names match the original state dicts (``ln``, ``linear1``, ``linear2``,
``output_linear``), so an original ``.pth`` actor loads without renaming.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .agent_card import MODEL_CARD_TEMPLATE
from .agent_files import (
    CONFIG_NAME,
    ORIGINAL_KEYS,
    SHIPPED_AGENTS,
    WEIGHTS_NAME,
    checked_weights,
    init_arguments,
    read_config,
    read_original_pth,
    read_safetensors,
    resolve_file,
    shipped_agent_names,
)
from .files import save_tensors_atomic

FALLBACKS = ("first", "last")
"""What a step takes when the agent rejects every candidate: the top-1 (released evaluation) or the last one
(the paper's training MDP, where the last candidate is forced)."""

__all__ = ["FALLBACKS", "ORIGINAL_KEYS", "SHIPPED_AGENTS", "MaraAgent", "shipped_agent_names",
           "validate_candidate_settings"]



class MaraAgent(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mara-hf",
    tags=["mara", "decoding-time-alignment", "accept-reject"],
    paper_url="https://arxiv.org/abs/2505.19743",
    repo_url="https://github.com/IAAR-Shanghai/MARA",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """A MARA accept/reject agent.

    Args:
        state_dim (`int`): size of the LLM states it reads (the LLM's hidden size).
        hidden_sizes (`list[int]`, *optional*, defaults to `[1024, 256]`): the two hidden layer sizes.
        base_model (`str`, *optional*): the LLM the agent was trained with (metadata, shown in the model card).
        top_k (`int`, *optional*, defaults to 40): candidate set size the agent was trained with.
        top_p (`float`, *optional*, defaults to 0.95): nucleus mass of the candidate set.
        fallback (`str`, *optional*, defaults to `"first"`): token taken when every candidate is rejected,
            `"first"` (the top-1, as in the released evaluation) or `"last"` (the paper's training MDP).
        accept_threshold (`float`, *optional*, defaults to 0.5): a candidate is accepted when p(accept) exceeds
            it. 0.5 takes the agent's own greedy decision (the paper's); an actor trained as a stochastic policy
            can be calibrated to a lower one (its sampled walk accepts far more often than p > 0.5 does).
        source (`str`, *optional*): where the weights came from (e.g. the original `.pth` file name).
        training_info (`str`, *optional*): free-text description of how the agent was trained (the key
            `training` in config.json; the attribute cannot be `training`, which is `nn.Module`'s train/eval flag).
        min_p (`float`, *optional*, defaults to 0.0): also drop candidates less probable than `min_p` times the
            top-1 (transformers' `MinPLogitsWarper` after top-k and top-p). 0 keeps the paper's candidate set; e.g.
            0.25 lets the agent take no token more than `log 4` nats below the top-1, so the answers stay
            closer to the base model's (less KL); fewer positions ask the agent, and more fall back.

    Example:

    ```python
    >>> import torch
    >>> from mara_hf import MaraAgent
    >>> agent = MaraAgent(state_dim=8)
    >>> agent.accept_probability(torch.zeros(3, 8)).shape
    torch.Size([3])

    ```
    """

    def __init__(
        self,
        state_dim: int,
        hidden_sizes: list[int] | tuple[int, int] = (1024, 256),
        base_model: str | None = None,
        top_k: int = 40,
        top_p: float = 0.95,
        fallback: str = "first",
        accept_threshold: float = 0.5,
        source: str | None = None,
        training_info: str | None = None,
        min_p: float = 0.0,
    ):
        super().__init__()
        if not isinstance(state_dim, int) or state_dim <= 0:
            raise ValueError(f"`state_dim` has to be a positive integer, but is {state_dim!r}.")
        hidden_sizes = list(hidden_sizes)
        if len(hidden_sizes) != 2 or not all(isinstance(h, int) and h > 0 for h in hidden_sizes):
            raise ValueError(f"`hidden_sizes` has to be two positive integers, but is {hidden_sizes!r}.")
        validate_candidate_settings(top_k, top_p, fallback, accept_threshold, min_p)
        self.state_dim = state_dim
        self.hidden_sizes = hidden_sizes
        self.base_model = base_model
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.fallback = fallback
        self.accept_threshold = accept_threshold
        self.source = source
        self.training_info = training_info

        self.ln = nn.LayerNorm(state_dim)
        self.linear1 = nn.Linear(state_dim, hidden_sizes[0])
        self.linear2 = nn.Linear(hidden_sizes[0], hidden_sizes[1])
        self.output_linear = nn.Linear(hidden_sizes[1], 2)

    @property
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable configuration written to `config.json` (`training_info` under its key `training`)."""
        return {
            "state_dim": self.state_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "base_model": self.base_model,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "fallback": self.fallback,
            "accept_threshold": self.accept_threshold,
            "source": self.source,
            "training": self.training_info,
        }

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Reject/accept logits `[..., 2]`, computed in the agent's own dtype (float32 as loaded) whatever the
        states' dtype: half-precision states are cast up (an agent cast to half precision computes in it)."""
        params = self.ln.weight
        x = self.ln(states.to(device=params.device, dtype=params.dtype))
        x = torch.relu(self.linear1(x))
        x = torch.relu(self.linear2(x))
        return self.output_linear(x)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Action probabilities `[..., 2]` (index 1 = accept), as the original actor returns them."""
        return torch.softmax(self.logits(states), dim=-1)

    def accept_probability(self, states: torch.Tensor) -> torch.Tensor:
        """p(accept) for states of any leading shape `[..., state_dim]` -> `[...]`, in the agent's dtype (see
        `logits`)."""
        if states.shape[-1] != self.state_dim:
            raise ValueError(
                f"The agent reads states of size {self.state_dim}, but got states of size {states.shape[-1]}: "
                "use an agent trained for this model's hidden size."
            )
        return self.forward(states)[..., 1]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        filename: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        **config_overrides: Any,
    ) -> "MaraAgent":
        """Load an agent by shipped name, from a native directory or Hub repo, or from an original MARA `.pth` actor.

        `pretrained_model_name_or_path` is one of:
        - a local directory with `config.json` + `model.safetensors` (what `save_pretrained` writes);
        - the name of an agent shipped inside mara-hf, e.g. `"smollm2-vader"` (a local folder of that name wins);
        - a local original actor file (`*.pth`, a plain state dict), its state size read from `ln.weight`;
        - a Hub repo id in native format, e.g. `"org/mara-agent"` (`subfolder=` for one inside the repo);
        - a Hub repo id plus `filename=` of an original actor, e.g.
          `MaraAgent.from_pretrained("IAAR-Shanghai/MARA_AGENTS", filename="mistral_v3_2_1_actor.pth")`.

        `.pth` files are read with `torch.load(weights_only=True, map_location="cpu")` and a strict key check: a
        file that pickles code is refused. Weights that are damaged, do not match the config, or hold NaN/inf are
        refused with a `ValueError` that names the file. Extra keyword arguments override config values (e.g.
        `base_model=`).
        """
        # Overridden although the mixin's hooks do the loading: the mixin's own `from_pretrained` downloads and
        # parses `config.json` before it calls `_from_pretrained` -- from the repo root (no `subfolder`), with
        # errors that name no file (a `config.json` holding `[1, 2]` raises AttributeError), and also for a local
        # `.pth` path or a Hub repo of original actors, which have no config.json. So this method only dispatches:
        # original actors to `from_original_pth`, everything else to the hook `_from_pretrained`, called with the
        # arguments the mixin passes it (huggingface_hub 0.34 to 2.x).
        source = os.path.expanduser(os.fspath(pretrained_model_name_or_path))  # `~/agent` (no Hub id starts so)
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        if filename is not None:
            if not filename.endswith(".pth"):
                raise ValueError(
                    f"`filename` names an original MARA actor (a `.pth` file), but got {filename!r}; a native agent "
                    "is loaded from its directory or repo id alone."
                )
            path = resolve_file(source, filename, subfolder=subfolder, **hub)
            return cls.from_original_pth(path, **config_overrides).to(map_location)
        if source.endswith(".pth"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"No MARA actor file at '{source}'.")
            return cls.from_original_pth(source, **config_overrides).to(map_location)
        return cls._from_pretrained(model_id=source, **hub, map_location=map_location, subfolder=subfolder,
                                    **config_overrides)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        subfolder: str | None = None,
        **model_kwargs: Any,
    ) -> "MaraAgent":
        """The mixin's loading hook: a native agent (`config.json` + `model.safetensors`) from a local folder, a
        shipped name or a Hub repo. `model_kwargs` override the config's values."""
        if not os.path.exists(model_id) and model_id in shipped_agent_names():
            model_id = str(SHIPPED_AGENTS / model_id)
        hub = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        config_path = resolve_file(model_id, CONFIG_NAME, **hub)
        weights_path = resolve_file(model_id, WEIGHTS_NAME, **hub)
        overrides = _checked_overrides(model_kwargs)
        config = {**read_config(config_path, _init_names()), **overrides}
        try:
            agent = cls(**config)
        except (ValueError, TypeError) as err:
            where = f"'{config_path}'" + (f" with the overrides {sorted(overrides)}" if overrides else "")
            raise ValueError(f"{where} is not a valid MARA agent config: {err}") from None
        state_dict = read_safetensors(weights_path)
        agent.load_state_dict(checked_weights(state_dict, agent, weights_path, "its config.json"))
        return agent.to(map_location).eval()

    @classmethod
    def from_original_pth(cls, path: str | os.PathLike, **config: Any) -> "MaraAgent":
        """Import an original MARA actor file (`*_actor.pth` of IAAR-Shanghai/MARA_AGENTS: a plain state dict),
        safely (`torch.load(weights_only=True)`); the sizes are read from the tensors, `config` sets the rest
        (e.g. `base_model=`). `save_pretrained` then writes the native format (what `mara-hf convert` does)."""
        path = os.path.expanduser(os.fspath(path))
        config = _checked_overrides(config, read_from=("state_dim", "hidden_sizes"))
        state_dict, state_dim, hidden_sizes = read_original_pth(path)
        config.setdefault("source", os.path.basename(path))
        agent = cls(state_dim=state_dim, hidden_sizes=hidden_sizes, **config)
        agent.load_state_dict(checked_weights(state_dict, agent, path, "the sizes read from its tensors"))
        return agent.eval()

    # ------------------------------------------------------------------ saving
    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's saving hook: `model.safetensors` and `config.json`, the latter from the agent's current
        settings (the mixin's own copy is taken at construction, before e.g. training changes `fallback`). The
        weights are what the mixin's hook writes (`safetensors.torch.save_model`: the state dict, metadata format
        "pt"), written with the umask's permissions (safetensors' own writer makes owner-only files)."""
        save_tensors_atomic(self.state_dict(), Path(save_directory) / WEIGHTS_NAME, metadata={"format": "pt"})
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(self.config, sort_keys=True, indent=2))

    # The two public savers are overridden only to tell the model card where the agent lives, so that its example
    # `MaraAgent.from_pretrained(...)` runs as written: the mixin passes `generate_model_card` neither the folder
    # nor the Hub repo id. Everything else is the mixin's.
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any):  # noqa: D401
        """Save `model.safetensors`, `config.json` and a model card (README.md) with a working usage example."""
        card_kwargs = dict(kwargs.pop("model_card_kwargs", None) or {})
        card_kwargs.setdefault("repo_id", kwargs.get("repo_id") or Path(save_directory).name)
        return super().save_pretrained(save_directory, model_card_kwargs=card_kwargs, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        card_kwargs = dict(kwargs.pop("model_card_kwargs", None) or {})
        card_kwargs.setdefault("repo_id", repo_id)
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def generate_model_card(self, *args, **kwargs):
        values = dict(self.config)
        values["base_model_or_placeholder"] = self.base_model or "<base model id>"
        values.setdefault("repo_id", "<this repo id>")
        values.update(kwargs)
        card = super().generate_model_card(*args, **values)
        if self.base_model:
            card.data.base_model = self.base_model
        return card

    def extra_repr(self) -> str:
        return (f"base_model={self.base_model!r}, top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p}, "
                f"fallback={self.fallback!r}, accept_threshold={self.accept_threshold}")


def is_accept_threshold(value) -> bool:
    """Whether `value` can be a decision threshold: a number strictly between 0 and 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0


def is_min_p(value) -> bool:
    """Whether `value` can be a min-p cut: a number in [0, 1) (0: no cut; at 1 only ties with the top-1 would
    remain)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def validate_candidate_settings(top_k: int, top_p: float, fallback: str, accept_threshold: float = 0.5,
                                min_p: float = 0.0, *, prefix: str = "") -> None:
    """Eager checks shared by the agent config, the processor and the fused loop (whose arguments carry the prefix
    `"mara_"`, which the messages name)."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"`{prefix}top_k` has to be a strictly positive integer, but is {top_k!r}.")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"`{prefix}top_p` has to be a float in (0, 1], but is {top_p!r}.")
    if not is_min_p(min_p):
        raise ValueError(f"`{prefix}min_p` has to be a float in [0, 1) (0: the paper's candidates, no min-p cut), "
                         f"but is {min_p!r}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"`{prefix}fallback` has to be one of {FALLBACKS}, but is {fallback!r}.")
    if not is_accept_threshold(accept_threshold):
        raise ValueError(f"`{prefix}accept_threshold` has to be a float in (0, 1) (0.5: the agent's greedy "
                         f"decision), but is {accept_threshold!r}.")


def _checked_overrides(settings: dict, read_from: tuple[str, ...] = ()) -> dict:
    """Keyword arguments of `from_pretrained` that override config values, checked: every one a setting of the agent
    (`MaraAgent.__init__`'s arguments), none of `read_from` (the sizes an original actor's tensors give)."""
    overrides = init_arguments(settings)
    unknown = set(overrides) - _init_names()
    if unknown:
        raise TypeError(f"Unknown agent setting(s) {sorted(unknown)}: the keyword arguments of from_pretrained "
                        f"override config values, which are {sorted(_init_names())}.")
    fixed = sorted(set(overrides) & set(read_from))
    if fixed:
        raise TypeError(f"{fixed} cannot be overridden for an original MARA actor: they are read from its tensors.")
    return overrides


def _init_names() -> set[str]:
    """The settings a config.json may hold: `MaraAgent.__init__`'s arguments."""
    return set(inspect.signature(MaraAgent.__init__).parameters) - {"self"}
