"""What an evaluation shows: the text report of its summary and the PNG plots (reward distributions of both sides,
the index of the candidate the agent accepted)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..files import save_figure_atomic
from ..fluency import DEGENERATE_THRESHOLD
from .metrics import mean

RESULTS_FILE = "results.json"
REWARDS_PLOT = "rewards.png"
INDEX_PLOT = "accepted_index.png"


def write_plots(records: list[dict], reward_names: list[str], agent_summary: dict, out_dir: Path) -> list[str]:
    """`rewards.png` (reward distributions, base vs MARA, one panel per reward) and `accepted_index.png` (how often
    the agent took the k-th candidate); returns the file names written. Without matplotlib, prints one warning
    line and writes nothing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("mara-hf eval: warning: matplotlib is not installed, skipping plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    written = []

    figure = Figure(figsize=(4.2 * len(reward_names), 3.4), layout="constrained")
    for axis, name in zip(figure.subplots(1, len(reward_names), squeeze=False)[0], reward_names):
        base = [r["rewards"]["base"][name] for r in records]
        mara = [r["rewards"]["mara"][name] for r in records]
        low, high = min(base + mara), max(base + mara)
        bins = 20 if high > low else 1
        edges = [low + (high - low) * i / bins for i in range(bins + 1)] if high > low else [low - 0.5, low + 0.5]
        axis.hist(base, bins=edges, alpha=0.55, label=f"base (mean {mean(base):.3g})", color="tab:gray")
        axis.hist(mara, bins=edges, alpha=0.55, label=f"MARA (mean {mean(mara):.3g})", color="tab:blue")
        axis.set_title(name)
        axis.set_xlabel("reward")
        axis.set_ylabel("prompts")
        axis.legend(fontsize="small")
    save_figure_atomic(figure, out_dir / REWARDS_PLOT)
    written.append(REWARDS_PLOT)

    histogram = agent_summary["accepted_index_histogram"]
    last = max([i for i, c in enumerate(histogram) if c] + [1])
    figure = Figure(figsize=(6, 3.4), layout="constrained")
    axis = figure.subplots()
    axis.bar(range(last + 1), histogram[:last + 1], color="tab:blue")
    axis.set_xlabel("index of the accepted candidate (0 = base model's top-1)")
    axis.set_ylabel("tokens")
    axis.set_title(f"agent decided {agent_summary['agent_decided']} of {agent_summary['tokens']} tokens; "
                   f"{agent_summary['fallbacks']} fallbacks", fontsize="medium")
    save_figure_atomic(figure, out_dir / INDEX_PLOT)
    written.append(INDEX_PLOT)
    return written


def format_summary(results: dict) -> str:
    """A short text report of [`mara_hf.evaluation.evaluate`]'s results."""
    def num(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [(f"{results['n_prompts']} prompts ({results['generated_now']} answered now, {results['reused']} "
              f"reused) -> {results['out_dir']}"),
             f"{'reward':<28} {'base':>9} {'MARA':>9}  {'win/tie/loss':>13} {'pref %':>7} {'gain':>7}"]
    for name, r in results["rewards"].items():
        record = f"{r['wins']}/{r['ties']}/{r['losses']}"
        lines.append(f"{name:<28} {num(r['mean_base']):>9} {num(r['mean_mara']):>9}  {record:>13} "
                     f"{num(r['preference_rate'], '.1f'):>7} {num(r['gain'], '+.1f'):>7}")
    kl = results["kl_per_token"]
    lines.append(f"KL per token (-log p_base of MARA's tokens): {num(kl['mara'])} nats; base model's own tokens: "
                 f"{num(kl['base_reference'])}")
    a = results["agent"]
    shown = a["accepted_index_histogram"][:max([i + 1 for i, c in enumerate(a["accepted_index_histogram"]) if c] + [2])]
    lines.append(f"agent: asked on {a['agent_decided']} of {a['tokens']} tokens "
                 f"({num(a['agent_decided_rate'], '.1%')}), "
                 f"changed {a['changed_tokens']} tokens in {a['answers_changed']} answers, fell back on "
                 f"{a['fallbacks']} ({num(a['fallback_rate'], '.1%')} of its decisions); accepted index histogram "
                 f"{shown}")
    lines.append(f"cost: {num(a.get('forwards_per_step'), '.2f')} forwards per decode step (plain greedy: 1), "
                 f"{num(a.get('forwards_per_token'), '.3f')} per generated token")
    f = results["fluency"]
    lines.append(f"degenerate answers (fluency <= {DEGENERATE_THRESHOLD}): base {f['degenerate']['base']} "
                 f"({num(f['degenerate_rate']['base'], '.1%')}), MARA {f['degenerate']['mara']} "
                 f"({num(f['degenerate_rate']['mara'], '.1%')}); mean fluency base {num(f['mean_fluency']['base'])}, "
                 f"MARA {num(f['mean_fluency']['mara'])}")
    s = results["speed"]
    lines.append(f"speed: base {num(s['base_tokens_per_s'], '.1f')} tokens/s, "
                 f"MARA {num(s['mara_tokens_per_s'], '.1f')} tokens/s")
    files = [RESULTS_FILE, results["files"]["responses"]] + results["files"]["plots"]
    lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)
