"""Share of answer tokens that repeat a token 4-gram of their answer (`mara_hf.train.rollout.repeated_ngrams`, what
`--repeat-cost` charges), for base greedy and three agents at threshold 0.2, from committed `responses.jsonl` files
(answers re-tokenised with the SmolLM2 tokenizer; EOS not counted). Run from the repository root:

    python benchmarks/train/cpu-repeat-2026-11-28/repeat_rates.py \
        > benchmarks/train/cpu-repeat-2026-11-28/repeat_rates.jsonl
"""

import json

import torch
from transformers import AutoTokenizer

from mara_hf.models import SMOLLM2_GGUF, smollm2_directory
from mara_hf.train.rollout import repeated_ngrams

HERE = "benchmarks/train/cpu-repeat-2026-11-28"
PROBED = "benchmarks/train/cpu-probed-2026-11-27"
FILES = {  # set -> {agent: responses.jsonl}; "base" comes from the first file
    "validation": {
        "rollout 28 (this run)": f"{HERE}/step28_validation_t02_responses.jsonl",
        "smollm2-fluent": "benchmarks/train/cpu-discount-2026-11-27/k40-first-fluency-kl02-rc01-token/"
                          "validation_t02_responses.jsonl",
        "rollout 16 (cpu-probed)": f"{PROBED}/step16_validation_t02_responses.jsonl",
    },
    "saferlhf": {
        "rollout 28 (this run)": f"{HERE}/step28_test_saferlhf_t02_responses.jsonl",
        "smollm2-fluent": "benchmarks/eval/smollm2-fluent/saferlhf/responses.jsonl",
        "rollout 16 (cpu-probed)": f"{PROBED}/step16_test_saferlhf_t02_responses.jsonl",
    },
    "beavertails": {
        "rollout 28 (this run)": f"{HERE}/step28_test_beavertails_t02_responses.jsonl",
        "smollm2-fluent": "benchmarks/eval/smollm2-fluent/beavertails/responses.jsonl",
        "rollout 16 (cpu-probed)": f"{PROBED}/step16_test_beavertails_t02_responses.jsonl",
    },
}


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_directory(), gguf_file=SMOLLM2_GGUF)

    def rate(texts):
        repeats = tokens = 0
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
            repeats += int(repeated_ngrams(ids, torch.tensor([ids.shape[1]])).sum())
            tokens += ids.shape[1]
        return round(repeats / max(tokens, 1), 4)

    for name, agents in FILES.items():
        rows = {agent: [json.loads(line) for line in open(path)] for agent, path in agents.items()}
        first = next(iter(rows.values()))
        record = {"set": name, "base": rate(r["base"] for r in first)}
        record.update({agent: rate(r["mara"] for r in answers) for agent, answers in rows.items()})
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
