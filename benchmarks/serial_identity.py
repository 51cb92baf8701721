"""Greedy MARA through the public API against serial decoding, the way the original MARA code decodes, on
held-out prompts (issue 10: "the fused loop stays token-identical to the original MARA implementation's serial
decoding on held-out prompts").

The serial reference decodes one prompt at a time with a KV cache and walks the candidates in probability order,
one forward per candidate: feed the candidate, read its state (what `lm_head` receives), ask the agent, and on
accept keep that forward's cache and logits as the next step's; on reject take the candidate back out of the cache.
Candidates are built here with an explicit sort and cumulative sum (log-softmax, top-k, top-p, min-p). The methods
compared with it run through `generate` on left-padded batches: the fused loop (`custom_generate=mara_generate`)
on a dynamic and on a static cache (`cache_implementation="static"`) and the drop-in processor, plus the fused
loop one prompt at a time. Plain greedy `generate()` at batch 1 against the same batch size as the others
measures how often batching alone changes greedy tokens (different matrix shapes round differently), the floor
any batched method shares.

For each answer that differs from the serial one, the first differing token is described from the serial walk at
that step: the agent's p(accept) of the candidates it asked and its threshold, and the gap between the two most
probable log-probabilities.

    python benchmarks/serial_identity.py --prompts beavertails_test --start 200 --count 96 \\
      --out benchmarks/cpu/14-serial-identity
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from common import (REPO_ROOT, close_log, command_record, environment, load_prompts, logger, open_log, prompt_name,
                    set_threads, write_json)
from mara_hf import MaraLogitsProcessor, mara_generate
from mara_hf.data import encode_chat_prompts, eos_token_ids, pad_token_id
from mara_hf.hf_internals import cache_keyword
from mara_hf.models import DEFAULT_AGENT, load_agent, load_base_model

METHODS = ("fused", "fused-static", "processor", "fused-batch-1", "plain", "plain-batch-1")


def serial_candidates(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> list[int]:
    """MARA's candidates of one row of logits, most probable first: log-softmax, top-k, then top-p as transformers'
    `TopPLogitsWarper` cuts (drop the tokens whose cumulative mass from the least probable up is <= 1 - top_p, keep
    the top-1), then those at least `min_p` times as probable as the top-1. Equal values stay in token order."""
    values, ids = torch.sort(torch.log_softmax(logits.float(), dim=-1), descending=True, stable=True)
    values, ids = values[:top_k], ids[:top_k]
    probs = torch.softmax(values, dim=-1)
    removed = (probs.flip(0).cumsum(0) <= 1 - top_p).flip(0)
    removed[0] = False
    removed |= probs < min_p * probs[0]
    return ids[~removed].tolist()


class SerialMara:
    """The serial reference: one prompt, a KV cache, one forward per candidate walked (see the module docstring).
    A context manager: inside it a hook on `lm_head` reads each forward's state; leaving removes it, also on error."""

    def __init__(self, model, agent):
        self.model, self.agent = model, agent
        self.keyword = cache_keyword(model)  # `cache=` since transformers 5.2x, `past_key_values=` before
        self.captured = {}

    def __enter__(self) -> "SerialMara":
        self.hook = self.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: self.captured.update(x=args[0]))
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()

    def _feed(self, ids: list[int], cache):
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self.keyword: cache})
        return out.logits[0, -1].float(), self.captured["x"][0, -1]

    @torch.no_grad()
    def decode(self, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> tuple[list[int], list[dict]]:
        agent = self.agent
        cache = DynamicCache(config=self.model.config)
        logits, _ = self._feed(prompt, cache)
        tokens, records = [], []
        for _ in range(max_new_tokens):
            candidates = serial_candidates(logits, agent.top_k, agent.top_p, agent.min_p)
            top2 = torch.topk(torch.log_softmax(logits, -1), 2).values
            record = {"p_accept": [], "top2_gap": float(top2[0] - top2[1])}
            length = cache.get_seq_length()
            choice = None
            if len(candidates) == 1:
                choice, (logits_next, _) = 0, self._feed([candidates[0]], cache)
            else:
                for i, candidate in enumerate(candidates):
                    logits_next, state = self._feed([candidate], cache)
                    p_accept = agent(state[None].float())[0, 1].item()
                    record["p_accept"].append(p_accept)
                    if p_accept > agent.accept_threshold:
                        choice = i
                        break
                    cache.crop(length - cache.get_seq_length())  # a negative count: the candidate leaves
                if choice is None:
                    choice = 0 if agent.fallback == "first" else len(candidates) - 1
                    logits_next, _ = self._feed([candidates[choice]], cache)
            record["index"] = choice
            records.append(record)
            tokens.append(candidates[choice])
            logits = logits_next
            if tokens[-1] in eos_ids:
                break
        return tokens, records


def answers(out: torch.Tensor, width: int, eos_ids: list[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS."""
    result = []
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        result.append(row[: ends[0] + 1] if ends else row)
    return result


def run_method(method: str, model, agent, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
               eos_ids: list[int]) -> list[list[int]]:
    """Each prompt's answer by `method` (see `METHODS`): in left-padded batches of `batch_size`, or one prompt at a
    time for the `*-batch-1` methods; the plain methods ignore `agent`."""
    size = 1 if method.endswith("batch-1") else batch_size
    result = []
    for start in range(0, len(prompts), size):
        inputs = encode_chat_prompts(tokenizer, prompts[start:start + size], "cpu")
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                      pad_token_id=pad_token_id(tokenizer))
        if method.startswith("fused"):
            kwargs.update(custom_generate=mara_generate, mara_agent=agent)
        if method == "fused-static":
            kwargs["cache_implementation"] = "static"
        if method == "processor":
            kwargs["logits_processor"] = [MaraLogitsProcessor(agent, model)]
        with torch.no_grad():
            out = model.generate(**kwargs)
        result += answers(out, inputs["input_ids"].shape[1], eos_ids)
    return result


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--agent", default=DEFAULT_AGENT, help="a shipped agent's name or an agent folder")
    parser.add_argument("--prompts", type=prompt_name, default="beavertails_test", metavar="NAME",
                        help="a prompt file of data/prompts/ (NAME.json)")
    parser.add_argument("--start", type=int, default=200,
                        help="first prompt (the evaluations of benchmarks/eval/ used the first 200)")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "serial-identity")
    args = parser.parse_args(argv)

    open_log(args.out, "serial_identity")
    set_threads(args.threads, "cpu")
    model, tokenizer = load_base_model("smollm2", device="cpu", dtype=torch.float32)
    agent = load_agent(args.agent)
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = load_prompts(args.start + args.count, args.prompts)[args.start:]
    record = {**command_record("serial_identity.py", argv), "settings": vars(args) | {"out": str(args.out)},
              "environment": environment("cpu"), "agent": {"name": args.agent, "threshold": agent.accept_threshold,
                                                          "top_k": agent.top_k, "top_p": agent.top_p,
                                                          "min_p": agent.min_p, "fallback": agent.fallback}}

    serial, serial_records, seconds = [], [], {}
    start = time.perf_counter()
    with SerialMara(model, agent) as decoder:
        for prompt in prompts:
            ids = encode_chat_prompts(tokenizer, [prompt], "cpu")["input_ids"][0].tolist()
            tokens, records = decoder.decode(ids, args.max_new_tokens, eos_ids)
            serial.append(tokens)
            serial_records.append(records)
    seconds["serial"] = time.perf_counter() - start
    asked = sum(len(r["p_accept"]) > 0 for records in serial_records for r in records)
    taken_lower = sum(r["index"] > 0 for records in serial_records for r in records)
    logger.info("serial: %d answers, %d tokens, agent asked on %d, took a lower-ranked candidate on %d (%.0f s)",
                len(serial), sum(map(len, serial)), asked, taken_lower, seconds["serial"])

    outputs = {}
    for method in METHODS:
        start = time.perf_counter()
        outputs[method] = run_method(method, model, agent, tokenizer, prompts, args.batch_size,
                                     args.max_new_tokens, eos_ids)
        seconds[method] = time.perf_counter() - start

    comparisons = {f"{method} vs serial": (outputs[method], serial, serial_records)
                   for method in METHODS if not method.startswith("plain")}
    comparisons[f"plain batch {args.batch_size} vs plain batch 1"] = (outputs["plain"], outputs["plain-batch-1"],
                                                                        None)
    summary = {}
    for name, (got, expected, records) in comparisons.items():
        differences = []
        for i, (a, b) in enumerate(zip(got, expected)):
            at = first_difference(a, b)
            if at is None:
                continue
            difference = {"prompt": args.start + i, "token": at}
            if records is not None and at < len(records[i]):
                step = records[i][at]
                difference.update(p_accept=step["p_accept"], threshold=agent.accept_threshold,
                                  closest_to_threshold=min((abs(p - agent.accept_threshold) for p in step["p_accept"]),
                                                           default=None),
                                  top2_gap=step["top2_gap"])
            differences.append(difference)
        summary[name] = {"identical": len(got) - len(differences), "of": len(got), "differences": differences}
        logger.info("%s: %d of %d answers identical", name, len(got) - len(differences), len(got))
        for difference in differences:
            logger.info("  %s", difference)
    write_json(args.out / "serial_identity.json",
               {**record, "seconds": seconds, "summary": summary,
                "serial_decisions": {"asked": asked, "took_lower_ranked": taken_lower}})
    close_log()


if __name__ == "__main__":
    main()
