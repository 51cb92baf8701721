"""Where a fused step's time goes on the CPU: every sibling forward of one `generate` call timed by its shape.

SmolLM2-135M float32, one thread, the default agent, greedy, 32 new tokens; batch 1 (4 prompts one by one) and one
batch of 16, as `bench_generate.py` runs them. `mara_hf.states.run_siblings` is wrapped (here only) to time each
forward; a warm-up call first, then one timed call per batch size, then plain greedy and a one-token plain call
(the prompt's forward). Per step: the first chunks (every row's top-1: the decode step), the later chunks (the rows
that rejected, by `(rows, siblings)`), and the rest of the call without the prompt's forward (candidates, agent,
commit, lm_head). One call each: a breakdown, not a benchmark (`bench_generate.py` times).

    python benchmarks/cpu/8-decode-only/chunk_times.py
"""

import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/

import torch  # noqa: E402

import common  # noqa: E402
import mara_hf.states as states  # noqa: E402
from mara_hf import mara_generate  # noqa: E402
from mara_hf.models import load_agent  # noqa: E402

TOKENS = 32


def main() -> None:
    common.set_threads(None, "cpu")
    model, tokenizer = common.load_model("smollm2", "cpu", torch.float32)
    agent, base = load_agent(), common.base_generate_kwargs(model, TOKENS)
    forwards, run_siblings = [], states.run_siblings

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = run_siblings(*args, **kwargs)
        forwards.append((tuple(args[2].shape), time.perf_counter() - start))
        return out

    states.run_siblings = timed
    try:
        for batch_size, batches in ((1, 4), (16, 1)):
            inputs = common.make_batches(model, tokenizer, batch_size, batches, 0, 0, "cpu")

            def call(**kwargs):
                start = time.perf_counter()
                for batch in inputs:
                    model.generate(**batch, **{**base, **kwargs})
                return time.perf_counter() - start

            call(custom_generate=mara_generate, mara_agent=agent)  # warm-up
            forwards.clear()
            fused = call(custom_generate=mara_generate, mara_agent=agent)
            plain, prompt = call(), call(max_new_tokens=1, min_new_tokens=1)
            steps = TOKENS * batches
            first = [s for shape, s in forwards if shape == (batch_size, 1)]
            later = [(shape, s) for shape, s in forwards if shape != (batch_size, 1)]
            rest = fused - prompt - sum(s for _, s in forwards)
            print(f"batch {batch_size}: fused {1e3 * fused / steps:.1f} ms/step, plain {1e3 * plain / steps:.1f}, "
                  f"prompt call {prompt:.2f} s; per step: first chunks {1e3 * sum(first) / steps:.1f} ms "
                  f"({len(first)}, {1e3 * sum(first) / len(first):.1f} ms each), later chunks "
                  f"{1e3 * sum(s for _, s in later) / steps:.1f} ms ({len(later)}), rest without the prompt call "
                  f"{1e3 * rest / steps:.1f} ms", flush=True)
            by_shape = collections.defaultdict(list)
            for shape, s in later:
                by_shape[shape].append(s)
            for shape in sorted(by_shape):
                print(f"  later chunk {shape[0]:2d} rows x {shape[1]:2d} siblings: {len(by_shape[shape]):2d} x "
                      f"{1e3 * sum(by_shape[shape]) / len(by_shape[shape]):6.1f} ms", flush=True)
    finally:
        states.run_siblings = run_siblings


if __name__ == "__main__":
    main()
