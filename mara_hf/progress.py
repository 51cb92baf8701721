"""The progress bar of long runs (`mara-hf eval`, `mara-hf train`): tqdm on stderr, so stdout keeps only results."""

from __future__ import annotations

import sys


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar of `total` steps (`initial` already done); a silent one (same methods) when not `enabled`."""
    from tqdm.auto import tqdm  # a dependency of huggingface_hub and transformers

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)
