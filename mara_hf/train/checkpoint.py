"""Training checkpoints in the native format, written atomically.

A checkpoint is a folder `step-<iteration>/` holding the actor as a native agent (`agent/`: `model.safetensors` +
`config.json`), every other tensor of the training state (critics, targets, optimizer moments, replay buffer, random
generators) in `trainer.safetensors`, and the rest (counters, optimizer hyperparameters, settings) in
`trainer.json`. Nothing is pickled, so loading runs no code.

Writing: the folder is filled under a temporary name, renamed into place, and only then does the `latest` file
(itself replaced atomically) point at it. A run killed at any moment leaves `latest` naming a complete checkpoint.
Folders and files get the usual permissions (the umask's), so other users of a shared run folder can read them.

Reading: a checkpoint that cannot be read (a damaged file) raises `CheckpointError` naming the file and the
previous checkpoint; deleting the damaged folder makes `latest_checkpoint` fall back to that one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..files import save_tensors_atomic, temporary_name, write_atomic

LATEST = "latest"
TENSORS = "trainer.safetensors"
METADATA = "trainer.json"
AGENT = "agent"
FILES = (METADATA, TENSORS, f"{AGENT}/config.json", f"{AGENT}/model.safetensors")
_TENSOR = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the previous checkpoint."""


def flatten(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure of dicts/lists/tensors/plain values into JSON (tensors replaced by references) and
    a flat `name -> tensor` dict for safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"Checkpoint dict keys have to be str or int, at '{path}'.")
            return {"__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"Cannot checkpoint a {type(node).__name__} at '{path}'.")

    return walk(tree, prefix), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(directory: str | os.PathLike, name: str, agent, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `directory/name` atomically and point `directory/latest` at it; keep the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = temporary_name(final)
    try:
        tmp.mkdir()
        agent.save_pretrained(tmp / AGENT)
        skeleton, tensors = flatten(state)
        save_tensors_atomic(tensors, tmp / TENSORS)
        (tmp / METADATA).write_text(json.dumps(skeleton))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(directory / LATEST, name + "\n")
    checkpoints = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in checkpoints[:-keep] if keep else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `directory/latest` names, or None when there is none.

    If the folder it names was deleted (e.g. because it was damaged), the newest complete checkpoint left."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = directory / name
    if name and path.is_dir() and path.parent == directory:
        if not _complete(path):
            raise damaged(path, f"it lacks {', '.join(f for f in FILES if not (path / f).is_file())}")
        return path
    remaining = sorted(p for p in directory.iterdir() if p.name.startswith("step-") and _complete(p))
    return remaining[-1] if remaining else None


def damaged(path: Path, problem: str) -> CheckpointError:
    """The error for the unreadable checkpoint `path`, naming the previous one to resume from instead."""
    path = Path(path)
    older = sorted(p for p in path.parent.iterdir()
                   if p.name.startswith("step-") and p.name < path.name and _complete(p))
    fix = (f"delete the folder '{path}' and run again to resume from the previous checkpoint, '{older[-1].name}'"
           if older else f"delete the folder '{path.parent}' to start the run over, or use another output folder")
    return CheckpointError(f"Checkpoint '{path.name}' cannot be read: {problem}. To go on, {fix}.")


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """`(agent, state)` of the checkpoint folder `path`; `CheckpointError` if a file of it is damaged."""
    from ..agent import MaraAgent

    path = Path(path)
    try:
        agent = MaraAgent.from_pretrained(path / AGENT)
    except (ValueError, OSError) as err:
        raise damaged(path, str(err).rstrip(".")) from None
    try:
        skeleton = json.loads((path / METADATA).read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise damaged(path, f"'{path / METADATA}' is not valid JSON ({err})") from None
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(path, f"'{path / TENSORS}' is not a readable safetensors file ({err})") from None
    try:
        state = unflatten(skeleton, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        problem = f"'{path / METADATA}' does not match '{path / TENSORS}' ({type(err).__name__}: {err})"
        raise damaged(path, problem) from None
    if not isinstance(state, dict):
        raise damaged(path, f"'{path / METADATA}' does not hold a training state")
    return agent, state
