"""mara-hf beyond one process: Ray workers that each hold the base model and the rewards, for training and
evaluation. Ray is an optional extra (`pip install "mara-hf[ray]"`); nothing here imports it before it is used.

One module a job:

- `config`: the Ray settings (`RayConfig`, the `--ray-*` options of `mara-hf train` and `mara-hf eval`), importing
  Ray, connecting to a cluster (a local one by default) and checking that it has room for the workers;
- `worker`: `ModelWorker`, what one Ray actor holds and does (load the model and rewards once; roll out a shard
  of a training batch; answer a batch of evaluation prompts), and the compact transfer format of transitions;
- `pool`: `WorkerPool`, the actors of a run: start them, send calls, and run a call again on a fresh actor when
  its worker died;
- `training`: `DistributedTrainer`, the learner in the driver (the single-process `Trainer`'s SAC updates, replay
  buffer and checkpoints) fed by the workers' rollouts, with `max_staleness` rounds of pipelining;
- `evaluation`: `evaluate_on_ray`, `mara-hf eval` with the prompt batches answered by the workers.

This package builds on both `mara_hf.train` and `mara_hf.evaluation`; importing it (or `config`) imports neither.
The `mara-hf train` / `mara-hf eval` commands (`mara_hf.commands`) build on it; nothing here imports them.
"""

from .config import MissingRayError, RayConfig, import_ray

__all__ = ["MissingRayError", "RayConfig", "import_ray"]
