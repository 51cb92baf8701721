"""Training checkpoints in the native format, written atomically.

A checkpoint is a folder `step-<iteration>/` holding the actor as a native agent (`agent/`: `model.safetensors` +
`config.json`), every other tensor of the training state (critics, targets, optimizer moments, replay buffer, random
generators) in `trainer.safetensors`, and the rest (counters, optimizer hyperparameters, settings) in
`trainer.json`. Nothing is pickled, so loading runs no code.

Writing: the folder is filled under a temporary name, renamed into place, and only then does the `latest` file
(itself replaced atomically) point at it. A run killed at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
TENSORS = "trainer.safetensors"
METADATA = "trainer.json"
AGENT = "agent"
_TENSOR = "__tensor__"


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


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, name: str, agent, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `directory/name` atomically and point `directory/latest` at it; keep the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}."))
    try:
        agent.save_pretrained(tmp / AGENT)
        skeleton, tensors = flatten(state)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / METADATA).write_text(json.dumps(skeleton))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(directory / LATEST, name + "\n")
    checkpoints = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in checkpoints[:-keep] if keep else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `directory/latest` names, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / METADATA).is_file():
        raise FileNotFoundError(f"'{pointer}' names '{path.name}', which is not a complete checkpoint.")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """`(agent, state)` of the checkpoint folder `path`."""
    from ..agent import MaraAgent

    path = Path(path)
    agent = MaraAgent.from_pretrained(path / AGENT)
    state = unflatten(json.loads((path / METADATA).read_text()), load_file(str(path / TENSORS)))
    return agent, state
