"""Ray settings, declared once (`RayConfig`: the `--ray-*` options of `mara-hf train` and `mara-hf eval`), the lazy
import of Ray, and the connection to a cluster.

```python
>>> from mara_hf.distributed.config import RayConfig
>>> RayConfig(workers=2, num_cpus=1).enabled
True
>>> RayConfig(workers=-1)
Traceback (most recent call last):
...
ValueError: `workers` has to be a non-negative integer, but is -1.

```
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

RAY_PREFIX = "ray_"
"""Namespace prefix of the `RayConfig` options (`args.ray_workers`)."""
INSTALL_HINT = 'pip install "mara-hf[ray]" (from a checkout: pip install -e ".[ray]")'


class MissingRayError(ImportError, RuntimeError):
    """Ray is needed (a `--ray-*` option was given) but not installed; the message says how to install it."""


def import_ray():
    """The `ray` module, or `MissingRayError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingRayError(f"--ray-workers needs Ray, which is not installed: {INSTALL_HINT}.") from None
    return ray


@dataclass
class RayConfig:
    """Where and how the Ray workers run. Each field's `help` is declared here once: `mara-hf train` and
    `mara-hf eval` build their `--ray-*` options from it."""

    workers: int = field(default=0, metadata={
        "help": "Ray workers, each holding the base model and the rewards (0: everything in this process, no Ray)",
        "flag": "--ray-workers"})
    address: str | None = field(default=None, metadata={
        "help": "an existing Ray cluster to run the workers on (e.g. auto, or ray://HEAD:10001); default: start a "
                "local one on this machine", "flag": "--ray-address"})
    num_gpus: float | None = field(default=None, metadata={
        "help": "GPUs each worker reserves (0.5: two workers share one); a worker with a GPU decodes on it",
        "flag": "--ray-num-gpus", "default_text": "1 where this machine has a GPU, else 0"})
    num_cpus: float = field(default=1.0, metadata={
        "help": "CPU cores each worker reserves (and its torch threads)", "flag": "--ray-num-cpus"})
    max_restarts: int = field(default=3, metadata={
        "help": "how often a worker that died is replaced by a fresh one (its unfinished batches run again there) "
                "before the run gives up", "flag": "--ray-max-restarts"})

    def __post_init__(self):
        for name in ("workers", "max_restarts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` has to be a non-negative integer, but is {value!r}.")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is None and name == "num_gpus":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` has to be a non-negative number, but is {value!r}.")
        if self.address is not None and not (isinstance(self.address, str) and self.address.strip()):
            raise ValueError(f"`address` has to be a Ray address such as 'auto', but is {self.address!r}.")

    @property
    def enabled(self) -> bool:
        return self.workers > 0

    def gpus_per_worker(self) -> float:
        """`num_gpus`, or by default 1 where this machine has a CUDA GPU and 0 elsewhere."""
        if self.num_gpus is not None:
            return float(self.num_gpus)
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0


def connect(config: RayConfig):
    """Ray, connected: to the running session if this process already has one (`ray.init` called before, e.g. by a
    test or a notebook), else to `config.address`, else to a new local cluster on this machine."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
    return ray


def check_resources(ray, config: RayConfig, num_gpus: float) -> None:
    """Refuse worker requests the cluster cannot hold (they would wait forever), in one line that says what is there.
    Checked against what is free now; a cluster given by `--ray-address` may have an autoscaler that adds nodes,
    so only a local cluster is checked."""
    if config.address is not None:
        return
    free, total = ray.available_resources(), ray.cluster_resources()
    for name, per_worker, flag in (("CPU", config.num_cpus, "--ray-num-cpus"), ("GPU", num_gpus, "--ray-num-gpus")):
        needed = config.workers * per_worker
        if needed > free.get(name, 0.0) + 1e-9:
            raise ValueError(
                f"--ray-workers {config.workers} with {flag} {per_worker:g} need {needed:g} {name}s, but the Ray "
                f"cluster has {free.get(name, 0.0):g} free (of {total.get(name, 0.0):g}): use fewer workers or a "
                f"smaller {flag} (a fraction lets workers share one)."
            )
