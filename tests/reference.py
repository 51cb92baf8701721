"""Naive MARA, written for clarity not speed: the ground truth the library is tested against.

One full forward without cache per candidate (candidates of a step are stacked as separate rows of one batch,
which changes nothing but speed), candidates built with explicit sorting and cumulative sums, and a Python walk
over candidates in probability order.
"""

from __future__ import annotations

import torch


def naive_candidates(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> list[int]:
    """MARA's candidate ids for one row of logits, most probable first (top-k, then top-p on the top-k, then the
    ones at least `min_p` times as probable as the top-1)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.sort(logprobs, descending=True, stable=True)  # equal values in token order, as argmax
    values, ids = values[:top_k], ids[:top_k]
    probs = torch.softmax(values, dim=-1)
    # transformers' TopPLogitsWarper: ascending order, drop tokens whose cumulative mass is <= 1 - top_p,
    # always keep the most probable one.
    cumulative = probs.flip(0).cumsum(0)
    removed = (cumulative <= 1 - top_p).flip(0)
    removed[0] = False
    removed |= probs < min_p * probs[0]
    return ids[~removed].tolist()


def no_inputs(length: int) -> dict:
    return {}


def lm_head_inputs(model, input_ids: torch.Tensor, model_inputs=no_inputs) -> torch.Tensor:
    """The vectors `lm_head` receives for `input_ids` `(B, T)` in a plain forward without cache: `(B, T, d)`.
    `model_inputs(T)`: more inputs of the forward (e.g. an image's pixels)."""
    captured = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **model_inputs(input_ids.shape[1]))
    finally:
        handle.remove()
    return captured["x"]


def naive_states(model, context: list[int], candidates: list[int], model_inputs=no_inputs) -> torch.Tensor:
    """State of each candidate appended to `context` (no padding, no cache): `(len(candidates), d)`."""
    rows = torch.tensor([context + [c] for c in candidates], device=model.device)
    return lm_head_inputs(model, rows, model_inputs)[:, -1]


def naive_next_logits(model, context: list[int], model_inputs=no_inputs) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([context], device=model.device)
        return model(input_ids=ids, use_cache=False, **model_inputs(len(context))).logits[0, -1].float()


def naive_mara_greedy(model, agent, prompt: list[int], max_new_tokens: int, *, top_k=40, top_p=0.95,
                      fallback="first", eos_token_id=None, threshold=0.5, min_p=0.0, model_inputs=no_inputs,
                      suppress=()) -> tuple[list[int], list[dict]]:
    """MARA greedy decoding ("top1" rule: the first candidate with p(accept) > `threshold`) of one unpadded prompt;
    returns new tokens and per-step records. `model_inputs(length)`: more inputs of every forward of a sequence of
    `length` tokens; `suppress`: token ids never generated (`generate`'s `suppress_tokens`)."""
    ids = list(prompt)
    records = []
    for _ in range(max_new_tokens):
        logits = naive_next_logits(model, ids, model_inputs)
        logits[list(suppress)] = -float("inf")
        candidates = naive_candidates(logits, top_k, top_p, min_p)
        record = {"candidates": candidates, "asked": len(candidates) > 1, "fallback": False}
        if len(candidates) == 1:
            choice = 0
        else:
            # Serial walk, one forward per candidate, stopping at the first accepted one.
            choice, record["p_accept"] = None, []
            for i, candidate in enumerate(candidates):
                with torch.no_grad():
                    p_accept = agent(naive_states(model, ids, [candidate], model_inputs).float())[0, 1].item()
                record["p_accept"].append(p_accept)
                if p_accept > threshold:
                    choice = i
                    break
            if choice is None:
                record["fallback"] = True
                choice = 0 if fallback == "first" else len(candidates) - 1
        record["index"] = choice
        records.append(record)
        ids.append(candidates[choice])
        if eos_token_id is not None and candidates[choice] == eos_token_id:
            break
    return ids[len(prompt):], records


def naive_repeated(tokens: list[int], length: int, n: int) -> list[bool]:
    """Position t repeats when tokens[t-n+1 : t+1] occurs as an n-gram starting before t-n+1."""
    answer = tokens[:length]
    marks = []
    for t in range(len(tokens)):
        start = t - n + 1
        gram = tuple(answer[start:t + 1]) if 0 <= start and t < length else None
        marks.append(gram is not None and any(tuple(answer[s:s + n]) == gram for s in range(start)))
    return marks
