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

SECTION_TITLE = "## Use it as a `custom_generate` repository"
CARD_SECTION = "\n" + SECTION_TITLE + """

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
    card_path = directory / "README.md"
    try:  # read before anything is written: a card that does not parse stops the export with nothing changed
        card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    except Exception as err:  # yaml's errors, ValueError for a header that is not a mapping
        raise ValueError(f"'{card_path}' is not a model card whose header parses ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): fix or remove its YAML header, then "
                         "export again.") from None
    tags = list(card.data.tags or [])
    if "custom_generate" not in tags:
        card.data.tags = tags + ["custom_generate"]
    card.text = _without_section(card.text, SECTION_TITLE).rstrip("\n") + "\n" + CARD_SECTION.format(source=source)

    target = directory / "custom_generate"
    target.mkdir(exist_ok=True)
    generate_py = target / "generate.py"
    generate_py.write_text(GENERATE_TEMPLATE.format(source=source), encoding="utf-8")
    (target / "requirements.txt").write_text("mara-hf\n", encoding="utf-8")
    card.save(card_path)
    return generate_py


def _without_section(text: str, title: str) -> str:
    """`text` (markdown) without its section `title` (the heading line to the next heading of the same level), so
    that an export run again (e.g. with the repo id after a local one) leaves one section, with its latest source."""
    lines = text.split("\n")
    if title not in lines:
        return text
    start = lines.index(title)
    level = title.split(" ")[0] + " "
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(level)), len(lines))
    return "\n".join(lines[:start] + lines[end:])
