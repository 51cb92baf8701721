"""Shared pieces of the mara-hf benchmarks: models, prompts, agents, the run record and its output folder.

`bench_generate.py` (decoding speed and greedy identity), `profile_step.py` (where a step's time goes) and the
in-process A/Bs under `cpu/` build on it. Everything a result depends on is recorded: the command line, versions, device, thread count, TF32 flags and
the git commit (`environment`).

Prompts come from the repository's `data/prompts/` (see its README for sources and licences); a missing file stops
the run with the path and what to do, never a silent substitute.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import mara_hf
from mara_hf import MaraAgent
from mara_hf.agent import is_min_p
from mara_hf.data import encode_chat_prompts
from mara_hf.data import load_prompts as read_prompt_file
from mara_hf.models import DEFAULT_AGENT, load_agent, load_base_model, shipped_agents

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO_ROOT / "data" / "prompts"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

LLAMA3_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
    pad_token_id=128001,
)
RANDOM_MODEL_SHAPES = {
    # Llama-3-8B: only the shape; weights are random (the timing does not depend on them).
    "llama3-8b-random": LLAMA3_8B_SHAPE,
    # Llama-3-8B's widths with 4 of its 32 layers: the same kernels per layer, compiled in a fraction of the time
    # (for the float32 identity check of the device run, where compiling the full depth would eat the budget).
    "llama3-8b-4layers-random": {**LLAMA3_8B_SHAPE, "num_hidden_layers": 4},
    # A tiny model with the same code path, to smoke-test the benchmarks on a CPU in seconds.
    "tiny-random": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ),
}
# Llama-3-8B's depth (32 layers) at the tiny widths: a step's host work (Python, op dispatch) per layer dominates, as in
# the eager 8B step on an H100 (about 8 GPU-ms of work under 38 ms of host time, `gpu/h100-2026-11-27/`), so a CPU run
# shows what MARA adds to a host-bound step.
RANDOM_MODEL_SHAPES["deep-tiny-random"] = {**RANDOM_MODEL_SHAPES["tiny-random"], "num_hidden_layers": 32}
MODELS = ("smollm2", *RANDOM_MODEL_SHAPES)
AGENTS = ("accept-all", "calibrated", "reject-all", "shipped", *shipped_agents())
"""Benchmark agents: three made for the model, and mara-hf's trained SmolLM2 agents (`shipped`: the default one, or
any shipped agent by its name). Any of them as `NAME:min_p=P` decodes with its candidates cut by min-p P
(`agent.min_p`; see [`agent_spec`])."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

logger = logging.getLogger("benchmarks")


# ---------------------------------------------------------------------------------------------------- models
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(model_name: str, device: str) -> torch.dtype:
    """bf16 for the random models on CUDA, float32 otherwise (SmolLM2 is de-quantized to float32)."""
    return torch.bfloat16 if device.startswith("cuda") and model_name != "smollm2" else torch.float32


def build_random_llama(name: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A `LlamaForCausalLM` of shape `RANDOM_MODEL_SHAPES[name]` with random weights, created on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**RANDOM_MODEL_SHAPES[name])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def load_model(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer or None) for a `MODELS` name. The 8B-shaped model is refused off CUDA."""
    if name == "smollm2":
        return load_base_model("smollm2", device=device, dtype=dtype)
    if name.startswith("llama3-8b") and not device.startswith("cuda"):
        raise SystemExit(f"The Llama-3-8B-shaped random model {name} is for CUDA only; on CPU use --model smollm2 or "
                         "--model tiny-random.")
    return build_random_llama(name, device, dtype=dtype, seed=seed), None


def hidden_size(model) -> int:
    return model.get_output_embeddings().weight.shape[-1]


# ---------------------------------------------------------------------------------------------------- prompts
def prompt_path(name: str) -> Path:
    """`data/prompts/<name>.json` of this repository."""
    return PROMPTS_DIR / f"{name}.json"


def prompt_name(name: str) -> str:
    """argparse type of a `--prompts NAME` option: the name of a file `data/prompts/NAME.json`, refused (listing the
    files there) before anything loads."""
    if not prompt_path(name).is_file():
        names = ", ".join(sorted(path.stem for path in PROMPTS_DIR.glob("*.json")))
        raise argparse.ArgumentTypeError(f"data/prompts/ has no {name}.json (it has {names})")
    return name


def load_prompts(count: int, name: str = "saferlhf_test", path: Path | None = None) -> list[str]:
    """The first `count` instructions of a prompt file of `data/prompts/` (cycled if it has fewer), read by
    `mara_hf.data.load_prompts`.

    Raises `SystemExit` naming the file and the fix when it is missing, unreadable or holds no prompts."""
    path = Path(path) if path is not None else prompt_path(name)
    fix = (f"the benchmarks read their prompts from the repository's data/prompts/ (see data/prompts/README.md); "
           f"restore the file with `git checkout -- data/prompts/{path.name}`")
    if not path.is_file():
        raise SystemExit(f"Prompt file {path} is missing: {fix}.")
    try:
        prompts = read_prompt_file(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{err} {fix[0].upper()}{fix[1:]}.") from None
    return [prompts[i % len(prompts)] for i in range(count)]


def random_batch(vocab_size: int, batch_size: int, length: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """`batch_size` random prompts of `length` tokens (no padding), for the random-weight models."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def make_batches(model, tokenizer, batch_size: int, num_batches: int, prompt_tokens: int, seed: int, device: str,
                 prompts: str = "saferlhf_test"):
    """`num_batches` batches of `batch_size` prompts: consecutive prompts of `data/prompts/<prompts>.json` with the
    chat template (real models), or seeded random token prompts of `prompt_tokens` tokens (random models)."""
    if tokenizer is None:
        vocab = model.config.vocab_size
        return [random_batch(vocab, batch_size, prompt_tokens, seed + 1000 * batch_size + i, device)
                for i in range(num_batches)]
    texts = load_prompts(num_batches * batch_size, prompts)
    return [encode_chat_prompts(tokenizer, texts[i * batch_size : (i + 1) * batch_size], device)
            for i in range(num_batches)]


def batches_for(num_prompts: int | None, batch_size: int) -> int:
    """Batches per batch size: `ceil(num_prompts / batch_size)`, at least one (one when `num_prompts` is None)."""
    return 1 if num_prompts is None else max(1, math.ceil(num_prompts / batch_size))


def base_generate_kwargs(model, max_new_tokens: int) -> dict:
    """Greedy, forced equal lengths (`min_new_tokens = max_new_tokens`), EOS and padding passed as usual."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = model.generation_config.pad_token_id
    return dict(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos[0],
    )


# ---------------------------------------------------------------------------------------------------- agents
def accept_all_agent(state_dim: int) -> MaraAgent:
    """Accepts every candidate (p_accept = sigmoid(20) ~ 1): MARA's pure overhead, output = plain greedy."""
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.zero_()
        agent.output_linear.bias.copy_(torch.tensor([-10.0, 10.0]))
    return agent.eval()


def reject_all_agent(state_dim: int) -> MaraAgent:
    """Rejects every candidate (p_accept ~ 0): every candidate is evaluated at every step, then the fallback (the
    top-1 for the default `fallback="first"`) is taken, so the output is plain greedy's. MARA's worst case."""
    agent = MaraAgent(state_dim=state_dim)
    with torch.no_grad():
        agent.output_linear.weight.zero_()
        agent.output_linear.bias.copy_(torch.tensor([10.0, -10.0]))
    return agent.eval()


@torch.no_grad()
def top1_states(model, inputs: dict, steps: int) -> torch.Tensor:
    """`(rows * steps, d)` states of the tokens plain greedy decoding takes (the top-1 candidates) over `steps`
    steps: `lm_head`'s input at the position of each token when it is fed, read by a forward pre-hook on
    `model.get_output_embeddings()` (MARA's state of a candidate)."""
    captured = []

    def keep_last_position(module, args):
        captured.append(args[0][:, -1].float())

    handle = model.get_output_embeddings().register_forward_pre_hook(keep_last_position)
    try:
        model.generate(**inputs, **base_generate_kwargs(model, steps + 1))
    finally:
        handle.remove()
    # Call 0 is the prompt's forward: its last position holds a prompt token, not a candidate.
    return torch.cat(captured[1:])


@torch.no_grad()
def calibrated_agent(model, inputs: dict, reject_share: float = 0.3, seed: int = 0, steps: int = 16):
    """A random agent whose accept bias is set so that it rejects `reject_share` of the top-1 candidates plain
    greedy decoding meets on `inputs`, and a record of the calibration.

    Random-weight models give random agents no reason to accept or reject, so a seeded random `MaraAgent` is
    shifted: its accept-minus-reject logit on the top-1 states of `steps` greedy steps (see `top1_states`) is
    computed, and the accept bias lowered so that the `reject_share` lowest of them fall below zero (p_accept <=
    0.5: rejected) and the others above. The share it rejects while MARA decodes differs (other tokens, other
    contexts): read `top1_accept_rate` in the results."""
    if not 0.0 <= reject_share <= 1.0:
        raise SystemExit(f"--reject-share has to be within [0, 1], but is {reject_share}.")
    torch.manual_seed(seed)
    device = model.get_output_embeddings().weight.device
    agent = MaraAgent(state_dim=hidden_size(model)).to(device).eval()
    states = top1_states(model, inputs, steps)
    logits = agent.logits(states)
    margin, _ = (logits[:, 1] - logits[:, 0]).sort()
    # Reject the `k` lowest margins: put the threshold halfway between the k-th and the (k+1)-th.
    k = round(reject_share * len(margin))
    low = margin[k - 1] if k > 0 else margin[0] - 1.0
    high = margin[k] if k < len(margin) else margin[-1] + 1.0
    threshold = (low + high) / 2
    agent.output_linear.bias[1] -= threshold
    rejected = agent.accept_probability(states) <= 0.5  # the decision rule: accept when p > 0.5
    record = {
        "reject_share_target": reject_share,
        "seed": seed,
        "calibration_steps": steps,
        "calibration_states": int(states.shape[0]),
        "bias_shift": -float(threshold),
        "reject_share_on_calibration_states": float(rejected.float().mean()),
    }
    return agent, record


def _min_p_of(cut: str) -> float | None:
    """P of the `min_p=P` after an agent's name (None when it is not that, or P is outside [0, 1))."""
    key, _, value = cut.partition("=")
    try:
        min_p = float(value)
    except ValueError:
        return None
    return min_p if key == "min_p" and is_min_p(min_p) else None


def agent_spec(text: str) -> str:
    """argparse type of the agent options: an `AGENTS` name, or `NAME:min_p=P` with P in [0, 1)."""
    name, _, cut = text.partition(":")
    if name not in AGENTS:
        raise argparse.ArgumentTypeError(f"unknown agent {name!r}: choose from {', '.join(AGENTS)}, optionally "
                                         f"followed by :min_p=P")
    if cut and _min_p_of(cut) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: after the agent's name only :min_p=P, with P in [0, 1)")
    return text


def make_agent(name: str, model, calibration_inputs: dict | None = None, *, reject_share: float = 0.3,
               seed: int = 0, steps: int = 16):
    """(`MaraAgent` on the model's device, record) for an [`agent_spec`]; `shipped` (mara-hf's default trained
    SmolLM2 agent) and the shipped agents by name need SmolLM2's hidden size. `NAME:min_p=P` is the agent `NAME`
    with `min_p` P."""
    name, _, cut = name.partition(":")
    min_p = _min_p_of(cut) if cut else 0.0
    if min_p is None:
        raise SystemExit(f"Bad agent cut {cut!r}: after the agent's name only :min_p=P, with P in [0, 1).")
    agent, record = _make_agent(name, model, calibration_inputs, reject_share=reject_share, seed=seed, steps=steps)
    if cut:
        agent.min_p = min_p
        record = {**record, "min_p": min_p}
    return agent, record


def _make_agent(name: str, model, calibration_inputs: dict | None, *, reject_share: float, seed: int, steps: int):
    dim = hidden_size(model)
    device = model.get_output_embeddings().weight.device
    if name == "calibrated":
        return calibrated_agent(model, calibration_inputs, reject_share=reject_share, seed=seed, steps=steps)
    if name == "shipped" or name in shipped_agents():
        shipped = DEFAULT_AGENT if name == "shipped" else name
        agent = load_agent(shipped)
        if agent.state_dim != dim:
            raise SystemExit(f"The shipped agent {shipped} reads states of size {agent.state_dim}, this model's are "
                             f"{dim}: use --model smollm2 with --agents {name}.")
        return agent.to(device).eval(), {"source": f"mara_hf.models.load_agent({shipped!r})"}
    if name == "accept-all":
        return accept_all_agent(dim).to(device), {"output_bias": [-10.0, 10.0], "output_weight": 0.0}
    if name == "reject-all":
        return reject_all_agent(dim).to(device), {"output_bias": [10.0, -10.0], "output_weight": 0.0}
    raise SystemExit(f"Unknown agent {name!r}; choose from {', '.join(AGENTS)}.")


# ---------------------------------------------------------------------------------------------------- the record
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def git_commit() -> dict:
    """The repository's commit and whether the working tree differs from it (None outside a git checkout)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "modified_files": None if status is None else len(status.splitlines())}


def environment(device: str) -> dict:
    """Versions, device, threads, precision flags and the git commit of this run."""
    info = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mara_hf": mara_hf.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git": git_commit(),
    }
    if device.startswith("cuda"):
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return info


def command_record(script: str, argv: list[str] | None) -> dict:
    """The command line as run: `python benchmarks/<script> <arguments>` (`argv` None: this process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"argv": args, "command_line": shlex.join(["python", f"benchmarks/{script}", *args])}


def open_log(out_dir: Path, name: str) -> Path:
    """Log `logger`'s messages to the console and to `<out_dir>/<name>.log` (replaced); returns that path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.log"
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="w", encoding="utf-8")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return path


def close_log() -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` to `path` through a temporary file (a crash leaves the previous version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table (first two columns left-aligned)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def set_threads(threads: int | None, device: str) -> None:
    """torch CPU threads: 1 by default on CPU (on the 2-vCPU dev VM two OpenMP threads were erratic and up to 10x
    slower), torch's default on CUDA; 0 keeps torch's default."""
    if threads is None:
        threads = 0 if device.startswith("cuda") else 1
    if threads > 0:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------- in-process A/Bs of the fused loop
def default_agent_ab(script: str, description: str, max_new_tokens: int):
    """The setup of the CPU A/B scripts under `benchmarks/cpu/` (one variant of the fused loop against another and
    plain greedy, in one process): their `--rounds` option, SmolLM2-135M in float32 on one thread, the default agent,
    generate's keyword arguments and the record's head. Returns `(rounds, model, tokenizer, agent, base, record)`."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size (default 3)")
    args = parser.parse_args()
    set_threads(None, "cpu")
    model, tokenizer = load_model("smollm2", "cpu", torch.float32)
    record = {"command": " ".join([f"python {script}", *sys.argv[1:]]), "agent": DEFAULT_AGENT,
              "max_new_tokens": max_new_tokens, "rounds": args.rounds, "environment": environment("cpu"),
              "results": []}
    return args.rounds, model, tokenizer, load_agent(), base_generate_kwargs(model, max_new_tokens), record


def interleaved(run, variants: tuple[str, ...], rounds: int):
    """One untimed warm-up of each variant, then `rounds` rounds with the variants in rotated order (round r starts
    with variant r mod n). Returns the warm-up's `run(variant)` results and each variant's list of timed ones."""
    warm = {v: run(v) for v in variants}
    timed = {v: [] for v in variants}
    for r in range(rounds):
        first = r % len(variants)
        for v in variants[first:] + variants[:first]:
            timed[v].append(run(v))
    return warm, timed


def ops_per_step(generate, short: int = 5, long: int = 9) -> float:
    """Aten ops dispatched per decode step by `generate(max_new_tokens)` (a call that decodes exactly that many
    tokens): the ops of a `long`-token call less those of a `short`-token one, over the difference (the prompt's
    forward and the call's setup cancel). What a host-bound step pays for, whatever the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for tokens in (short, long):
        with torch.no_grad(), CountOps() as counter:
            generate(tokens)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / (long - short)
