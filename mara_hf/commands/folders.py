"""The output folder of a subcommand (`--out`), checked before anything is loaded."""

from __future__ import annotations

import os
from pathlib import Path


def check_out_folder(out: str, what: str = "run folder") -> None:
    """Refuse an unusable --out before anything is loaded: a file, or below a file or an unwritable folder. `what`
    the folder is, in the message (`"run folder"`, `"results folder"`)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out '{out}' is a file, not a {what}: give a folder (new or of an earlier run).")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the filesystem root always exists
    if not existing.is_dir():
        raise ValueError(f"--out '{out}' cannot be created: '{existing}' is a file; give another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out '{out}' is not writable ('{existing}' is not): give another folder.")
