"""Average the weights of several MARA agents of one training run into one agent (uniform, as in stochastic weight
averaging: `torch.optim.swa_utils.AveragedModel`).

Only agents of the same run make sense to average (same initialisation, nearby weights): e.g. the actors a
`mara-hf train --greedy-probe` run saved under `probed/step-*`. The agents must share their configuration (state
size, hidden sizes, candidate set, fallback, threshold); the averaged agent keeps it and records its sources in the
`training` field of its config.

    python benchmarks/average_agents.py RUN/probed/step-0000020 RUN/probed/step-0000032 --out runs/averaged
"""

from __future__ import annotations

import argparse
import logging

from torch.optim.swa_utils import AveragedModel

from mara_hf import MaraAgent

logger = logging.getLogger("average_agents")

# Fields that may differ between the agents averaged (free text).
DESCRIPTIVE = {"training", "source"}


def average_agents(agents: list[MaraAgent]) -> MaraAgent:
    """The uniform average of `agents`' weights, with the first agent's configuration."""
    if not agents:
        raise ValueError("Give at least one agent to average.")
    first = {k: v for k, v in agents[0].config.items() if k not in DESCRIPTIVE}
    for i, agent in enumerate(agents[1:], start=1):
        other = {k: v for k, v in agent.config.items() if k not in DESCRIPTIVE}
        if other != first:
            differs = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ValueError(f"Agent {i} differs from agent 0 in {', '.join(differs)}: only agents of one training "
                             "run (same configuration) can be averaged.")
    averaged = AveragedModel(agents[0])  # a copy; its first update copies, each later one folds in a running mean
    for agent in agents:
        averaged.update_parameters(agent)
    return averaged.module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("agents", nargs="+", help="agent folders (or anything MaraAgent.from_pretrained loads)")
    parser.add_argument("--out", required=True, help="folder to save the averaged agent to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    agents = [MaraAgent.from_pretrained(path) for path in args.agents]
    averaged = average_agents(agents)
    sources = ", ".join(args.agents)
    averaged.training_info = (f"uniform weight average of {len(agents)} agents ({sources}) of one run: "
                              f"{agents[0].training_info}")
    averaged.save_pretrained(args.out)
    logger.info("averaged %d agents into %s", len(agents), args.out)


if __name__ == "__main__":
    main()
