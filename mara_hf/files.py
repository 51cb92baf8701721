"""Files written atomically: a run killed at any moment leaves the old content or the new one, never a mix.

Everything is written under a fresh hidden name beside its target (`.NAME.<random>.tmp`, created with the umask's
permissions, unlike `tempfile`'s owner-only files, so others can read a shared run folder), flushed to disk and then
renamed over the target; a failed write removes its temporary file.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside `path`, for a file or folder that is renamed to `path` once complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` by `data` (text is written as UTF-8) at once."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Replace `path` by `tensors` (name -> tensor) in the safetensors format (as `safetensors.torch.save_file`
    writes it, whose own files are owner-only)."""
    from safetensors.torch import save

    write_atomic(path, save({name: t.detach().contiguous() for name, t in tensors.items()}, metadata=metadata))


def write_json_atomic(path: str | os.PathLike, value) -> None:
    """Replace `path` by `value` as indented JSON (UTF-8, no NaN)."""
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def save_figure_atomic(figure, path: str | os.PathLike) -> None:
    """Replace `path` by a matplotlib `figure` as a PNG."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        figure.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
