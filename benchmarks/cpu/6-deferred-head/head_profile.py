"""Profile one fused call at batch 16 with lm_head deferred to the commit and with it projecting in every chunk
(twice each, alternating): torch.profiler's total, matrix products, and those of lm_head (`N x 576 @ 576 x 49152`).

    python benchmarks/cpu/6-deferred-head/head_profile.py > benchmarks/cpu/6-deferred-head/head_profile.log
"""
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import common
from mara_hf.models import load_agent
from mara_hf.generation import mara_generate
from mara_hf.states import _PLAIN_HEAD
torch.set_num_threads(1)
model, tok = common.load_model("smollm2", "cpu", torch.float32)
agent = load_agent()
base = common.base_generate_kwargs(model, 32)
b = common.make_batches(model, tok, 16, 1, 0, 0, "cpu")[0]
def run(defer):
    _PLAIN_HEAD[model] = defer
    model.generate(**b, **base, custom_generate=mara_generate, mara_agent=agent)
run(True); run(False)
for d in (True, False, True, False):
    with torch.profiler.profile(record_shapes=True) as p:
        run(d)
    ka = p.key_averages(group_by_input_shape=True)
    head = [e for e in ka if e.key == "aten::mm" and "49152" in str(e.input_shapes)]
    mm = sum(e.self_cpu_time_total for e in ka if e.key == "aten::mm")
    tot = sum(e.self_cpu_time_total for e in ka)
    print("defer" if d else "per-chunk", f"total {tot/1e6:.2f}s mm {mm/1e6:.2f}s head mm {sum(e.self_cpu_time_total for e in head)/1e6:.2f}s calls {sum(e.count for e in head)}")
    top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:8]
    print("   ", [(e.key, str(e.input_shapes)[:60], round(e.self_cpu_time_total/1e6, 2)) for e in top])
