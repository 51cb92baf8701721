"""Hub `custom_generate` layout: let `model.generate(..., custom_generate="org/agent", trust_remote_code=True)` run
MARA with the agent stored in that repository."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard

GENERATE_TEMPLATE = '''"""MARA decoding as a Hub `custom_generate` (written by mara-hf).

    model.generate(**inputs, custom_generate="{source}", trust_remote_code=True)

runs the fused MARA loop of `mara_hf.mara_generate` with the agent stored in this repository; pass
`mara_agent=...` to use another agent, and `mara_top_k`, `mara_top_p`, `mara_min_p`, `mara_fallback`,
`mara_schedule` to change the candidate settings.
"""

from transformers import GenerationMixin

AGENT_SOURCE = {source!r}
_LOADED = {{}}


def generate(model, *args, mara_agent=None, **kwargs):
    from mara_hf import MaraAgent, mara_generate
    from mara_hf.hf_internals import tokenizer_settings_first

    if mara_agent is None:
        if AGENT_SOURCE not in _LOADED:
            _LOADED[AGENT_SOURCE] = MaraAgent.from_pretrained(AGENT_SOURCE)
        mara_agent = _LOADED[AGENT_SOURCE]
    # generate would drop the tokenizer that `stop_strings` and `token_healing` need
    args, kwargs = tokenizer_settings_first(model, args, kwargs)
    return GenerationMixin.generate(model, *args, custom_generate=mara_generate, mara_agent=mara_agent, **kwargs)
'''

CARD_SECTION = """
## Use it as a `custom_generate` repository

```python
out = model.generate(**inputs, max_new_tokens=64, custom_generate="{source}", trust_remote_code=True)
```
"""


def export_custom_generate(directory: str | os.PathLike, agent_source: str | None = None) -> Path:
    """Write `custom_generate/generate.py` and `custom_generate/requirements.txt` into an agent folder (as written
    by `MaraAgent.save_pretrained`) and tag its model card `custom_generate`.

    Args:
        directory: the agent folder; upload it as is (`huggingface_hub.upload_folder`) to publish it.
        agent_source: where `generate.py` loads the agent from: the Hub repo id the folder will be pushed to
            (e.g. `"org/mara-agent"`); defaults to the folder's absolute path, for local use.

    Returns the path of the written `generate.py`.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"'{directory}' is not a native MARA agent folder (config.json + model.safetensors): write it with "
            "`MaraAgent.save_pretrained` (or `mara-hf convert`) first."
        )
    source = agent_source or str(directory.resolve())
    target = directory / "custom_generate"
    target.mkdir(exist_ok=True)
    generate_py = target / "generate.py"
    generate_py.write_text(GENERATE_TEMPLATE.format(source=source), encoding="utf-8")
    (target / "requirements.txt").write_text("mara-hf\n", encoding="utf-8")

    card_path = directory / "README.md"
    card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    tags = list(card.data.tags or [])
    if "custom_generate" not in tags:
        card.data.tags = tags + ["custom_generate"]
    if "## Use it as a `custom_generate` repository" not in card.text:
        card.text = card.text.rstrip("\n") + "\n" + CARD_SECTION.format(source=source)
    card.save(card_path)
    return generate_py
