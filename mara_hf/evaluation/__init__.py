"""Evaluation: answer a prompt set with the base model and with MARA under the same decoding settings, score both
answers with one or more rewards, and report preference rate, gain, KL to the base model, agent statistics and
speed.

```python
>>> from mara_hf.data import load_prompts
>>> from mara_hf.evaluation import evaluate
>>> from mara_hf.models import load_agent, load_base_model
>>> from mara_hf.rewards import parse_reward
>>> model, tokenizer = load_base_model("smollm2")
>>> results = evaluate(model, tokenizer, load_agent(), load_prompts("data/prompts/saferlhf_test.json", limit=50),
...                    {"vader": parse_reward("vader")}, max_new_tokens=64, out_dir="eval-results")
```

Files in `out_dir`: `responses.jsonl` (one line per prompt, appended per finished batch: a re-run with the same
`out_dir` resumes), `results.json` (the summary, rewritten atomically), `rewards.png` and `accepted_index.png`
(with matplotlib).

One module a job: `runner` (answering and scoring, [`evaluate`], [`EvalSettings`]), `store` (`responses.jsonl`
and the settings fingerprint that keys resuming), `metrics` ([`summarize`]) and `report` ([`format_summary`],
plots). The prompts, their chat encoding and the marking of changed tokens come from [`mara_hf.data`], shared with
training and the CLI. The `mara-hf eval` command itself (its options, and `--ray-workers` through
`mara_hf.distributed`) is `mara_hf.commands.eval`, a layer above this package.
"""

from ..data import encode_chat_prompts, eos_token_ids, load_prompts
from .metrics import COST_DEFINITION, KL_DEFINITION, summarize
from .report import INDEX_PLOT, RESULTS_FILE, REWARDS_PLOT, format_summary, write_plots
from .runner import RESERVED_GENERATE_ARGS, EvalSettings, evaluate, teacher_forced_nll
from .store import RESPONSES_FILE, ResponseStore, answer_settings, fingerprint

__all__ = [
    "COST_DEFINITION",
    "INDEX_PLOT",
    "KL_DEFINITION",
    "RESERVED_GENERATE_ARGS",
    "RESPONSES_FILE",
    "RESULTS_FILE",
    "REWARDS_PLOT",
    "EvalSettings",
    "ResponseStore",
    "answer_settings",
    "encode_chat_prompts",
    "eos_token_ids",
    "evaluate",
    "fingerprint",
    "format_summary",
    "load_prompts",
    "summarize",
    "teacher_forced_nll",
    "write_plots",
]
