"""The `mara-hf` command line: `generate` (the main job), `eval`, `train`, `convert`, `export-custom-generate`."""

from __future__ import annotations

import argparse
import os
import re
import sys

from .models import add_agent_arguments, add_model_argument, agent_overrides

DESCRIPTION = """MARA (Micro token-level Accept-Reject Alignment) for Hugging Face transformers.

Main job, offline on a fresh machine:  mara-hf generate "How do I pick a lock?"
Evaluate:  mara-hf eval --prompts FILE --limit 50 --reward vader --reward offensive
Train:     mara-hf train --prompts FILE --reward vader --out runs/vader
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mara-hf", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer a prompt with MARA decoding (streams tokens)")
    gen.add_argument("prompt", help="the user message")
    add_model_argument(gen)
    add_agent_arguments(gen)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--sample", action="store_true", help="sample among accepted tokens instead of greedy")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (with --sample)")
    gen.add_argument("--compare", action="store_true",
                     help="also answer with the base model alone; show both, with the tokens MARA changed marked")
    gen.add_argument("--device", default=None,
                     help="cpu, cuda, ... for the model and the agent (default: cuda if available)")

    conv = commands.add_parser("convert", help="convert an original MARA actor (.pth) to the native format")
    conv.add_argument("src", help="the original actor, e.g. mistral_v3_2_1_actor.pth")
    conv.add_argument("out_dir", help="output folder (config.json, model.safetensors, README.md)")
    conv.add_argument("--base-model", required=True, help="the base model the actor was trained with (Hub id)")
    conv.add_argument("--fallback", choices=["first", "last"], default="first")

    export = commands.add_parser("export-custom-generate",
                                 help="add a Hub custom_generate/ folder to a native agent folder")
    export.add_argument("agent_dir")
    export.add_argument("--repo-id", default=None,
                        help="the Hub repo the folder will be pushed to (default: the folder's local path)")

    from .commands.eval import add_eval_arguments

    add_eval_arguments(commands.add_parser(
        "eval", help="compare MARA with the base model on a prompt file: rewards, preference rate, KL, plots"))

    from .commands.train import add_train_arguments

    add_train_arguments(commands.add_parser(
        "train", help="train an agent with discrete SAC on a prompt file and a reward (resumable)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\nmara-hf: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, TypeError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"mara-hf {args.command}: error: {message}", file=sys.stderr)
        return 2


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .data import mark_changes, pad_token_id
    from .generation import mara_generate
    from .hf_internals import input_device
    from .models import DEFAULT_AGENT, load_agent, load_base_model, model_placement

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens has to be at least 1.")
    placement = model_placement(args)
    agent = load_agent(args.agent, args.agent_file)
    print(f"agent: {args.agent or DEFAULT_AGENT} ({_describe(agent)})", file=sys.stderr)
    print(f"model: {args.model} (loading...)", file=sys.stderr)
    model, tokenizer = load_base_model(args.model, **placement)
    device = input_device(model)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    pad_token_id=pad_token_id(tokenizer))
    if args.sample:
        settings["temperature"] = args.temperature
    prompt_length = inputs["input_ids"].shape[1]

    if args.compare:
        torch.manual_seed(args.seed)
        base = model.generate(**inputs, **settings)
        print("=== base model ===")
        print(tokenizer.decode(base[0, prompt_length:], skip_special_tokens=True))
        print("=== MARA ===")
    streamer = None if args.compare else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    out = model.generate(**inputs, **settings, custom_generate=mara_generate, mara_agent=agent,
                         **agent_overrides(args), streamer=streamer, return_dict_in_generate=True)
    if args.compare:
        answer, top1 = out.sequences[0, prompt_length:].tolist(), out.mara_steps["top1"][0].tolist()
        print(mark_changes(tokenizer, answer, top1).text)
        print("(⟦x→y⟧: MARA rejected x, the base model's top-1 token, and took y)")
    stats = out.mara_stats.to_dict()
    print(f"[{stats['tokens']} tokens; agent asked on {stats['agent_decided']}, took a lower-ranked candidate on "
          f"{stats['agent_decided'] - stats['accepted_index_histogram'][0] - stats['fallbacks']}, "
          f"fell back on {stats['fallbacks']}]", file=sys.stderr)
    return 0


def _describe(agent) -> str:
    """The agent in one terminal line: state size, base model and how it was trained, without the command quoted in
    its training summary (its card and `config.json` keep that)."""
    parts = [f"state size {agent.state_dim}"]
    if agent.base_model:
        parts.append(f"trained for {agent.base_model}")
    summary = re.sub(r"[;,]?\s*`[^`]*`", "", agent.training_info or "").strip()
    if summary:
        parts.append(summary)
    return "; ".join(parts)


def cmd_convert(args) -> int:
    from .agent import MaraAgent

    if not args.src.endswith(".pth") or not os.path.isfile(args.src):
        raise FileNotFoundError(f"'{args.src}' is not an existing original MARA actor (.pth) file.")
    agent = MaraAgent.from_original_pth(args.src, base_model=args.base_model, fallback=args.fallback)
    agent.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir} (state size {agent.state_dim}, base model {args.base_model})")
    return 0


def cmd_export(args) -> int:
    from .hub import export_custom_generate

    path = export_custom_generate(args.agent_dir, args.repo_id)
    print(f"wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from .commands.eval import run_eval

    return run_eval(args)


def cmd_train(args) -> int:
    from .commands.train import run_train

    return run_train(args, args.argv[1:])


COMMANDS = {"eval": cmd_eval, "train": cmd_train, "generate": cmd_generate, "convert": cmd_convert,
            "export-custom-generate": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
