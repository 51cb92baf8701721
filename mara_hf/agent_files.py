"""Finding and reading a MARA agent's files: shipped names, local folders and Hub repos; `config.json`,
`model.safetensors` and original `.pth` actors, each checked, with errors that name the file and what to do.

Nothing here builds an agent: `mara_hf.agent.MaraAgent` calls these readers from its loading hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

ORIGINAL_KEYS = (
    "ln.weight",
    "ln.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "output_linear.weight",
    "output_linear.bias",
)
"""The keys of an agent's state dict: the released actors' own names, kept by the native format."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHIPPED_AGENTS = Path(__file__).parent / "agents"
"""The agents shipped inside the package (`MaraAgent.from_pretrained("smollm2-vader")`)."""
CONFIG_ALIASES = {"training": "training_info"}
"""config.json keys whose `__init__` argument is named differently (`training` would shadow `nn.Module.training`)."""


def shipped_agent_names() -> list[str]:
    """Names of the agents shipped inside mara-hf (folders of `mara_hf/agents/`)."""
    if not SHIPPED_AGENTS.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_AGENTS.iterdir() if (p / CONFIG_NAME).is_file())


def init_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """Config keys (or overrides) as `MaraAgent.__init__` arguments: `training` -> `training_info`."""
    arguments = {}
    for key, value in values.items():
        name = CONFIG_ALIASES.get(key, key)
        if name in arguments and key != name:
            continue  # both spellings given: the argument's own name wins
        arguments[name] = value
    return arguments


def read_config(path: str, names: set[str]) -> dict[str, Any]:
    """A native agent's config.json as `__init__` arguments, keeping those in `names` (unknown keys, e.g. from
    newer versions, are ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"'{path}' is not valid JSON ({err}): restore it, or save the agent again with `save_pretrained`."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"'{path}' has to hold a JSON object of agent settings (state_dim, hidden_sizes, ...), but holds a "
            f"JSON {type(config).__name__}: restore it, or save the agent again with `save_pretrained`."
        )
    if "state_dim" not in config:
        raise ValueError(f"'{path}' is not a MARA agent config: it has no 'state_dim'.")
    return {k: v for k, v in init_arguments(config).items() if k in names}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a native agent's `model.safetensors`, on the CPU."""
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:  # SafetensorError is neither an OSError nor a ValueError
        raise ValueError(
            f"'{path}' is not a readable safetensors file ({err}): it is damaged or incomplete; save or download "
            "the agent again."
        ) from None


def checked_weights(state_dict: dict, agent, path: str, expected: str) -> dict[str, torch.Tensor]:
    """`state_dict` after checking it against `agent`: exactly its keys and shapes, and only finite values (an agent
    with NaN/inf weights would silently fall back on every decision)."""
    missing, unexpected = set(ORIGINAL_KEYS) - set(state_dict), set(state_dict) - set(ORIGINAL_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"'{path}' does not hold MARA agent weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}."
        )
    own = agent.state_dict()
    for key in ORIGINAL_KEYS:
        if tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise ValueError(
                f"'{path}' does not fit {expected} (state size {agent.state_dim}, hidden sizes "
                f"{agent.hidden_sizes}): '{key}' has shape {list(state_dict[key].shape)}, "
                f"expected {list(own[key].shape)}."
            )
    integral = [f"{key} ({state_dict[key].dtype})" for key in ORIGINAL_KEYS if not state_dict[key].is_floating_point()]
    if integral:
        raise ValueError(f"'{path}' holds weights that are not floating point ({', '.join(integral)}): not an agent's "
                         "trained weights; use the file its training wrote.")
    broken = [key for key in ORIGINAL_KEYS if not torch.isfinite(state_dict[key]).all()]
    if broken:
        raise ValueError(
            f"'{path}' holds NaN or infinite weights (in {', '.join(broken)}): such an agent cannot decide "
            "(every step would fall back); use another checkpoint of it or train it again."
        )
    return {key: value.float() for key, value in state_dict.items()}


def resolve_file(source: str, filename: str, **hub) -> str:
    """A local path for `filename` in a local directory or a Hub repo (`hub`: `hf_hub_download`'s subfolder,
    revision, cache and token arguments), with errors that say what to do."""
    subfolder, revision = hub.get("subfolder"), hub.get("revision")
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"'{source}' has no '{os.path.join(subfolder or '', filename)}': a native MARA agent directory holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by `MaraAgent.save_pretrained`); for an original actor "
                "pass the `.pth` file itself."
            )
        return path
    if os.path.isfile(source):
        raise FileNotFoundError(
            f"'{source}' is a file, not an agent folder or Hub repo id: pass the folder that holds a native agent "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}), or an original actor's .pth file alone (without `filename=` / "
            "--agent-file)."
        )
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        shipped = ", ".join(shipped_agent_names()) or "none"
        raise FileNotFoundError(
            f"'{source}' is neither an existing local path nor a Hub repo id ('org/name') nor a shipped agent "
            f"({shipped})."
        )
    parent = source.split("/")[0]
    if os.path.isdir(parent):
        raise FileNotFoundError(
            f"No agent folder '{source}': the folder '{parent}' exists here but has no '{source.split('/')[1]}' "
            "(read as a local path, not as a Hub repo id); check the path."
        )
    try:
        return hf_hub_download(repo_id=source, filename=filename, **hub)
    except LocalEntryNotFoundError:
        raise OSError(
            f"Cannot reach the Hugging Face Hub to get '{filename}' from '{source}', and it is not in the local cache "
            f"('{source}' is not a local folder either). Connect to the internet, or download it once and retry "
            "(HF_HUB_OFFLINE=1 uses the cache only), or pass a local directory or .pth file."
        ) from None
    except RepositoryNotFoundError:
        raise OSError(
            f"'{source}' is not a local path and not a Hub repository you can access: check the id, or log in "
            "with `hf auth login` for a private repo."
        ) from None
    except RevisionNotFoundError:
        raise OSError(f"Revision '{revision}' does not exist in the Hub repository '{source}'.") from None
    except EntryNotFoundError:
        where = f"{subfolder}/{filename}" if subfolder else filename
        hint = (
            " For an original MARA actor pass its file name, e.g. filename=\"mistral_v3_2_1_actor.pth\"."
            if filename == CONFIG_NAME
            else ""
        )
        raise OSError(f"The Hub repository '{source}' has no file '{where}'.{hint}") from None


def read_original_pth(path: str) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """An original MARA actor file (a plain state dict) read safely (`torch.load(weights_only=True)`), with its
    state size and hidden sizes read from the tensors: `(state_dict, state_dim, hidden_sizes)`."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(
            f"Refusing to load '{path}': it is not a plain tensor state dict that loads with "
            f"`weights_only=True` ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "MARA actors are state dicts with keys "
            f"{', '.join(ORIGINAL_KEYS)}; never unpickle untrusted code."
        ) from None
    if not isinstance(state_dict, dict) or set(state_dict) != set(ORIGINAL_KEYS):
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"'{path}' is not an original MARA actor: expected exactly the keys {list(ORIGINAL_KEYS)}, got {keys}."
        )
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state_dict.items()}
    if None in shapes.values() or len(shapes["ln.weight"]) != 1 or any(
        len(shapes[k]) != 2 for k in ("linear1.weight", "linear2.weight")
    ):
        raise ValueError(f"'{path}' is not an original MARA actor: unexpected tensor shapes {shapes}.")
    return state_dict, shapes["ln.weight"][0], [shapes["linear1.weight"][0], shapes["linear2.weight"][0]]
