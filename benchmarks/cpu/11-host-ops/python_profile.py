"""Where the fused loop's host time goes on a host-bound model: cProfile of 3 calls (after 2 warm-ups) of the fused
loop with the accept-all agent on `deep-tiny-random` (batch 1, 64 new tokens, 1 thread), the functions of mara_hf,
transformers' generation utilities, masks and caches by cumulative time. cProfile adds its own cost to every Python
call, so read the shares, not the absolute times.

    python benchmarks/cpu/11-host-ops/python_profile.py > benchmarks/cpu/11-host-ops/python_profile.log
"""

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/

import torch  # noqa: E402

import common  # noqa: E402
from mara_hf import mara_generate  # noqa: E402

common.set_threads(None, "cpu")
model, _ = common.load_model("deep-tiny-random", "cpu", torch.float32)
agent = common.accept_all_agent(common.hidden_size(model))
batch = common.random_batch(model.config.vocab_size, 1, 32, 1, "cpu")
kwargs = common.base_generate_kwargs(model, 64)
for _ in range(2):
    model.generate(**batch, **kwargs, custom_generate=mara_generate, mara_agent=agent)
profile = cProfile.Profile()
profile.enable()
for _ in range(3):
    model.generate(**batch, **kwargs, custom_generate=mara_generate, mara_agent=agent)
profile.disable()
out = io.StringIO()
stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
stats.print_stats("mara_hf|generation/utils|stopping|logits_process|masking|cache_utils", 45)
print("3 calls x 64 steps = 192 decode steps (plus 3 prompt forwards)")
print("\n".join(line.replace(str(Path(torch.__file__).parents[1]), "<site-packages>")
                .replace(str(Path(__file__).resolve().parents[3]), "<repo>") for line in out.getvalue().splitlines()))
