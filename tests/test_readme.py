"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n# install[^\n]*\n(.+?)\n# run the tests\n(.+?)\n```", readme, re.S)
    assert block, "README must start with the install and test commands"
    install, test = block.group(1).strip(), block.group(2).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_shipped_agent_is_packaged():
    from mara_hf import MaraAgent
    from mara_hf.models import DEFAULT_AGENT, SHIPPED_AGENTS, shipped_agents

    assert DEFAULT_AGENT in shipped_agents()
    agent = MaraAgent.from_pretrained(SHIPPED_AGENTS / DEFAULT_AGENT)
    assert agent.state_dim == 576 and "discrete SAC" in agent.training_info
    assert (agent.top_k, agent.fallback) == (40, "first")
    assert {"smollm2-vader", "smollm2-fluent", "smollm2-steady", "smollm2-demo"} <= set(shipped_agents())
    for name in ("smollm2-fluent", "smollm2-steady"):
        trained = MaraAgent.from_pretrained(name)
        assert (trained.accept_threshold, trained.fallback, trained.state_dim) == (0.2, "first", 576)
    assert "agents/*/*" in (ROOT / "setup.cfg").read_text()
