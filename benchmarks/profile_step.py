"""Where a MARA step's time goes: a one-token decode forward against sibling forwards of K candidates.

On a cache holding a random prompt, per batch size it times (median, min and max of `--iters` calls after
`--warmup` untimed ones; CUDA events on CUDA, `perf_counter` on CPU):

- `decode`: the model's forward of one token per row on the dynamic cache (what plain greedy runs per step);
- `siblings-K` for each `--widths` K: `mara_hf.states.DynamicSiblings` running K candidates per row as siblings
  (the sibling mask, the forward, `lm_head` on one picked sibling per row, as the fused loop does; `--logits none`:
  no projection, as the processor does), the cache put back afterwards.

Then it records `--profile-iters` more calls of each case under `torch.profiler` and writes the top operators
(by self device time on CUDA, by self CPU time on CPU) to `profile_tables.txt`, one section per batch size and case,
next to `profile.json` and `profile.log` in `--out`.

    python benchmarks/profile_step.py --out benchmarks/gpu/h100-profile            # CUDA: random Llama-3-8B shape
    python benchmarks/profile_step.py --model tiny-random --out runs/profile        # smoke test on CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import DynamicCache

import common
from common import logger
from mara_hf.hf_internals import DynamicSnapshot, cache_keyword
from mara_hf.states import DynamicSiblings

TABLES_FILE = "profile_tables.txt"  # one torch.profiler table per batch size and case


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=common.default_device(), help="torch device (default: cuda if available)")
    parser.add_argument("--model", choices=common.MODELS, default=None,
                        help="llama3-8b-random (default on CUDA), smollm2 (default on CPU) or tiny-random")
    parser.add_argument("--dtype", choices=common.DTYPES, default=None,
                        help="model dtype (default: bfloat16 for random models on CUDA, else float32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 8, 40],
                        help="sibling counts K per row (default: 1 8 40)")
    parser.add_argument("--logits", choices=("pick", "none"), default="pick",
                        help="siblings' lm_head: one picked sibling per row (fused loop, default) or none (processor)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="context length in the cache (default: 256; 32 for tiny-random)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case (default: 20; 5 for tiny-random)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per case before timing (default 3)")
    parser.add_argument("--profile-iters", type=int, default=3, help="calls recorded by torch.profiler per case")
    parser.add_argument("--rows", type=int, default=25, help="operators per profiler table (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model and prompts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, torch's default on CUDA; 0: torch's default)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results/profile-<model>-<device>)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.model is None:
        args.model = "llama3-8b-random" if cuda else "smollm2"
    tiny = args.model == "tiny-random"
    if args.dtype is None:
        args.dtype = str(common.default_dtype(args.model, args.device)).removeprefix("torch.")
    if args.prompt_tokens is None:
        args.prompt_tokens = 32 if tiny else 256
    if args.iters is None:
        args.iters = 5 if tiny else 20
    for name in ("iters", "prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} has to be at least 1")
    if min(args.batch_sizes) < 1 or min(args.widths) < 1:
        parser.error("--batch-sizes and --widths have to be at least 1")
    if args.out is None:
        args.out = str(common.RESULTS_DIR / f"profile-{args.model}-{args.device.split(':')[0]}")
    return args


class Timer:
    """Seconds of one call: CUDA events on CUDA (device time between the two events), else `perf_counter`."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return begin.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def make_cases(model, cache, batch_size: int, context: int, widths: list[int], logits: str, device: str,
               vocab: int, seed: int) -> dict:
    """name -> a call that runs one forward on `cache` (holding `context` entries per row) and puts it back."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (batch_size, max(widths)), generator=generator).to(device)
    positions = torch.full((batch_size, 1), context, dtype=torch.long, device=device)
    first = torch.zeros(batch_size, dtype=torch.long, device=device)

    def decode():
        snapshot = DynamicSnapshot(cache)
        model(input_ids=tokens[:, :1], position_ids=positions, use_cache=True, **{cache_keyword(model): cache})
        snapshot.restore()

    def siblings(k):
        def call():
            step = DynamicSiblings(model, cache, None)
            pick = (lambda states: first) if logits == "pick" else None
            step.forward(tokens[:, :k], positions, 0, logits=logits, pick=pick)
            step.restore()
        return call

    return {"decode": decode, **{f"siblings-{k}": siblings(k) for k in widths}}


@torch.no_grad()  # as under generate
def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    log_path = common.open_log(out, "profile")
    (out / TABLES_FILE).write_text("", encoding="utf-8")  # one section per case is appended below
    try:
        return run(args, argv, out, log_path)
    finally:
        common.close_log()


def run(args, argv, out: Path, log_path: Path) -> dict:
    start = time.perf_counter()
    device, cuda = args.device, args.device.startswith("cuda")
    common.set_threads(args.threads, device)
    logger.info(f"profile_step: {common.command_record('profile_step.py', argv)['command_line']}")
    model, _ = common.load_model(args.model, device, common.DTYPES[args.dtype], seed=args.seed)
    vocab = model.config.vocab_size
    timer = Timer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    payload = {
        "benchmark": "profile_step",
        "command": common.command_record("profile_step.py", argv),
        "settings": vars(args),
        "environment": common.environment(device),
        "log": log_path.name,
        "results": [],
        "complete": False,
    }
    for batch_size in args.batch_sizes:
        prompt = common.random_batch(vocab, batch_size, args.prompt_tokens, args.seed + batch_size, device)
        cache = DynamicCache(config=model.config)
        model(**prompt, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
        cases = make_cases(model, cache, batch_size, args.prompt_tokens, args.widths, args.logits, device, vocab,
                           args.seed)
        decode_median = None
        for name, call in cases.items():
            for _ in range(args.warmup):
                call()
            seconds = [timer(call) for _ in range(args.iters)]
            median = statistics.median(seconds)
            decode_median = median if name == "decode" else decode_median
            with profile(activities=activities) as prof:
                for _ in range(args.profile_iters):
                    with record_function(name):
                        call()
                common.synchronize(device)
            with open(out / TABLES_FILE, "a", encoding="utf-8") as tables:
                tables.write(f"== {name}, batch {batch_size}, context {args.prompt_tokens}, {args.profile_iters} calls, "
                             f"sorted by {sort_by}\n"
                             + prof.key_averages().table(sort_by=sort_by, row_limit=args.rows) + "\n\n")
            record = {
                "batch_size": batch_size,
                "case": name,
                "siblings": None if name == "decode" else int(name.split("-")[1]),
                "context": args.prompt_tokens,
                "iters": args.iters,
                "ms": {"median": 1000 * median, "min": 1000 * min(seconds), "max": 1000 * max(seconds)},
                "ratio_vs_decode": median / decode_median if decode_median else None,
                "profile_table": TABLES_FILE,
            }
            payload["results"].append(record)
            logger.info(f"  batch {batch_size:>3}  {name:<12} {1000 * median:9.3f} ms  (min {1000 * min(seconds):.3f}, "
                        f"max {1000 * max(seconds):.3f})  x{record['ratio_vs_decode']:.2f} of decode")
        del cache
        common.write_json(out / "profile.json", payload)
    payload["complete"] = True
    payload["elapsed_seconds"] = time.perf_counter() - start
    common.write_json(out / "profile.json", payload)
    logger.info(f"total time {payload['elapsed_seconds']:.0f} s; wrote {out / 'profile.json'}, {log_path} and the "
                f"profiler tables")
    return payload


if __name__ == "__main__":
    main()
