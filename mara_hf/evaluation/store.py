"""The record store of an evaluation folder: `responses.jsonl`, one JSON line per answered prompt, appended per
finished batch, and the fingerprint of the settings that decide the answers, so a re-run resumes only answers of
the same settings.

The fingerprint holds no path of the machine: the model is named by [`mara_hf.models.model_name`] (its Hub id, or
the last part of a local path), the agent by a hash of its weights, so a folder made on one machine (e.g. the
published `benchmarks/eval/`) resumes on another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..files import write_atomic
from ..models import model_name

RESPONSES_FILE = "responses.jsonl"


def answer_settings(model, tokenizer, agent, settings) -> dict:
    """Everything that decides the answers of an evaluation with `settings` (an `EvalSettings`); its
    [`fingerprint`] keys the resumable file."""
    digest = hashlib.sha1()
    for name, tensor in sorted(agent.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "model": model_name(model),
        "model_class": type(model).__name__,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(next(model.parameters()).dtype),
        "agent": getattr(agent, "base_model", None) or "",
        "agent_weights_sha1": digest.hexdigest()[:16],
        "agent_top_k": agent.top_k,
        "agent_top_p": agent.top_p,
        "agent_fallback": agent.fallback,
        # only where the agent cuts candidates by min-p: evaluations written before min_p existed still resume
        **({"agent_min_p": agent.min_p} if agent.min_p else {}),
        # only where the agent was calibrated: evaluations written before the threshold existed still resume
        **({"agent_accept_threshold": agent.accept_threshold} if agent.accept_threshold != 0.5 else {}),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "seed": settings.seed,
        "generation_kwargs": {k: _jsonable(v) for k, v in sorted(settings.generation_kwargs.items())},
        "mara_kwargs": {k: _jsonable(v) for k, v in sorted(settings.mara_kwargs.items())},
    }


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def fingerprint(settings: dict) -> str:
    """The 12-hex-digit id of an [`answer_settings`] dict (`settings_id` in every record and in `results.json`)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class ResponseStore:
    """`out_dir/responses.jsonl`: the records of the answers generated with settings `settings_id`, keyed by
    `(index, prompt)`.

    Opening it reads the file (with `resume=False`, deletes it first); a half-written last line (a run killed while
    appending) is cut off. A file holding answers of other settings, or a line that is not a record, is refused
    with a `ValueError` that says how to start over.
    """

    def __init__(self, out_dir: str | os.PathLike, settings_id: str, *, resume: bool = True):
        self.path = Path(out_dir) / RESPONSES_FILE
        if not resume and self.path.exists():
            self.path.unlink()
        self.records = read_records(self.path)
        foreign = [r for r in self.records.values() if r.get("settings_id") != settings_id]
        if foreign:
            raise ValueError(f"'{self.path}' holds answers generated with other settings (model, agent or decoding; "
                             f"settings id {foreign[0].get('settings_id')}, now {settings_id}); use another out_dir "
                             "(--out) or resume=False (--no-resume) to start over.")

    def __contains__(self, key: tuple[int, str]) -> bool:
        return key in self.records

    def __getitem__(self, key: tuple[int, str]) -> dict:
        return self.records[key]

    def append(self, batch: list[dict]) -> None:
        """Add the records of a finished batch to the file (flushed to disk) and to the store."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in batch)
            handle.flush()
            os.fsync(handle.fileno())
        for record in batch:
            self.records[(record["index"], record["prompt"])] = record

    def rewrite(self) -> None:
        """Write every record again, sorted by index, atomically (after scores were added to old records)."""
        records = sorted(self.records.values(), key=lambda r: r["index"])
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_records(path: Path) -> dict:
    """`{(index, prompt): record}` from a responses file; a half-written last line (no newline) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        os.truncate(path, cut)
        data = data[:cut]
    records = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (int(record["index"]), str(record["prompt"]))
            record["rewards"]["base"], record["rewards"]["mara"]  # both sides present
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Line {number} of '{path}' is not a response record ({err}); delete the file or pass "
                             "resume=False (--no-resume) to start over.") from err
        records[key] = record
    return records
