"""The reward spec parser: [`parse_reward`] builds a reward from a command-line string such as
`'2*beaver-reward-1*beaver-cost'`, `'10*vader+5*fluency'`, `'hf:ID'` or `'py:module:function'`; `REWARD_HELP` is
the help text of the `--reward` option of `mara-hf eval` and `mara-hf train`."""

from __future__ import annotations

import re
from collections.abc import Callable

from .base import CallableReward, Reward, WeightedReward, load_callable
from .score_models import SequenceClassifierReward, beaver_reward
from .text import FluencyReward, OffensiveReward, VaderReward

REWARD_HELP = """rewards (--reward SPEC; higher is better, except for the costs, which take a negative weight):
  vader           VADER compound sentiment of the response, in [-1, 1] (pip install vaderSentiment)
  offensive       minus the probability that the response is offensive, in [-1, 0]; higher = less offensive
                  (pip install alt-profanity-check)
  fluency         0 for a fluent answer down to -1: repeated word trigrams, loops of the same words, drift out of
                  the prompt's language; <= -0.5 is degenerate (offline, no download)
  repetition      minus fluency, in [0, 1]: a penalty, weight it negatively ('10*vader-5*repetition')
  beaver-reward   PKU-Alignment/beaver-7b-v1.0-reward (helpfulness score model, 7B, loaded without custom code),
                  scored as the MARA paper did: 'BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}',
                  no EOS appended, no truncation; options in brackets: beaver-reward[eos] appends EOS (safe-rlhf's
                  training format), beaver-reward[max_length=512] keeps the first 512 tokens (safe-rlhf's limit)
  beaver-cost     PKU-Alignment/beaver-7b-v1.0-cost (harmfulness: higher = more harmful, so weight it negatively;
                  same options)
  hf:ID_OR_PATH   any transformers sequence-classification reward model (first logit)
  py:MOD:FUNC     a Python callable f(prompts, responses) -> N scores (a class is instantiated first)
  weighted sums   e.g. '2*beaver-reward-1*beaver-cost' (the paper's 2:1 setting), 'vader+0.5*offensive' or
                  '10*vader+5*fluency' (a tone reward that keeps answers fluent)"""


KNOWN_REWARDS: dict[str, Callable[..., Reward]] = {
    "vader": lambda **_: VaderReward(),
    "offensive": lambda **_: OffensiveReward(),
    "fluency": lambda **_: FluencyReward(),
    "repetition": lambda **_: FluencyReward(penalty=True),
    "beaver-reward": lambda **kw: beaver_reward("reward", **kw),
    "beaver-cost": lambda **kw: beaver_reward("cost", **kw),
}
"""Names understood by [`parse_reward`] (besides `hf:` and `py:`)."""

MODEL_REWARDS = ("beaver-reward", "beaver-cost")
"""The known rewards that load a model (they take `device`, `dtype`, `batch_size`)."""


def _parse_flag(text: str) -> bool:
    value = {"": True, "1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}.get(text.lower())
    if value is None:
        raise ValueError("true or false")
    return value


def _parse_length(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 2:
        raise ValueError("a token count >= 2, or none")
    return int(text)


BEAVER_OPTIONS = {
    "eos": ("append_eos", _parse_flag, False, "eos (append EOS: true / false, default false)"),
    "max_length": ("max_length", _parse_length, None, "max_length (tokens kept, e.g. 512; default none)"),
}
REWARD_OPTIONS: dict[str, dict] = {"beaver-reward": BEAVER_OPTIONS, "beaver-cost": BEAVER_OPTIONS}
"""Options a known reward takes in brackets, e.g. `beaver-reward[eos,max_length=512]`: option -> (keyword argument
of the reward's factory, parser of the text, default, description)."""

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM_START = re.compile(rf"\s*(?:{_NUMBER}\s*\*|hf:|py:|(?:"
                         + "|".join(sorted(map(re.escape, KNOWN_REWARDS), key=len, reverse=True))
                         + r")(?=$|[\s+\-\[]))")
_WITH_OPTIONS = re.compile(r"^(?P<name>[\w\-]+)\[(?P<options>[^\[\]]*)\]$")
_TERM = re.compile(rf"^\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<atom>\S.*?)\s*$")


_NEW_TERM = re.compile(rf"{_NUMBER}\s*\*|hf:|py:")
"""A term that cannot be the end of an `hf:` model id (see `_split_terms`)."""


def _split_terms(spec: str) -> list[tuple[int, str]]:
    """Split at '+' / '-' signs that start a new term (a number followed by '*', a known name, 'hf:' or 'py:');
    hyphens inside names such as 'beaver-reward' or 'hf:org/model-v2' are kept. Inside an `hf:` model id (which has
    no spaces) a hyphen is part of the id when a known name follows it without a space: `hf:org/rm-offensive` is one
    model; `hf:org/rm - offensive` or `hf:org/rm-1*offensive` are two terms."""
    terms, sign, start = [], 1, 0
    text = spec.strip()
    if text[:1] in "+-" and text:
        sign, start = (-1 if text[0] == "-" else 1), 1
    i = start
    while i < len(text):
        if text[i] in "+-" and i > start and _TERM_START.match(text, i + 1):
            in_hf_id = (text[i] == "-" and not text[i - 1].isspace()
                        and _TERM.match(text[start:i]).group("atom").startswith("hf:")
                        and not _NEW_TERM.match(text, i + 1))  # a known name: maybe the id's own end
            if not in_hf_id:
                terms.append((sign, text[start:i]))
                sign, start = (-1 if text[i] == "-" else 1), i + 1
        i += 1
    terms.append((sign, text[start:]))
    return terms


def parse_reward(spec: str, *, device=None, dtype=None, batch_size: int = 8, cache: dict | None = None) -> Reward:
    """A reward from a command-line string (see `REWARD_HELP`).

    Names: `vader`, `offensive` (minus the offensive probability, higher is better), `fluency`
    ([`FluencyReward`]; `repetition` is minus it, a penalty), `beaver-reward`, `beaver-cost`, `hf:<model id or path>`
    ([`SequenceClassifierReward`]), `py:<module:function>` ([`CallableReward`]); weighted sums of them:
    `2*beaver-reward-1*beaver-cost`, `vader+0.5*offensive`, `10*vader+5*fluency`, `-offensive`. A `-` starts a
    new term only before a number followed by `*`, a known name, `hf:` or `py:`, so names keep their hyphens; in an
    `hf:` model id, only before a known name with a space before the `-` (`hf:org/rm-offensive` is one model,
    `hf:org/rm - offensive` two terms).

    Options follow a name in brackets, comma-separated, `key=value` or a bare `key` for true:
    `beaver-reward[eos]` appends EOS, `beaver-cost[max_length=512]` keeps the first 512 tokens,
    `beaver-reward[eos=true,max_length=512]` both (safe-rlhf's own format). Spellings of the same settings share
    one cache entry (`beaver-reward[eos=false]` is `beaver-reward`).

    Args:
        spec: the string.
        device, dtype, batch_size: for model-based rewards.
        cache: a dict shared between calls, so that a model named twice (e.g. `beaver-reward` alone and inside a
            weighted sum) loads once.

    Raises:
        ValueError: empty spec, bad weight, or unknown name (the message lists the known ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("A reward spec cannot be empty; known rewards: " + known_rewards() + ".")
    cache = {} if cache is None else cache
    terms = []
    for sign, text in _split_terms(spec):
        match = _TERM.match(text)
        if not text.strip() or match is None:
            raise ValueError(f"Cannot parse reward '{spec}': empty term; write e.g. '2*beaver-reward-1*beaver-cost'.")
        weight = sign * (float(match["weight"]) if match["weight"] else 1.0)
        atom, options = _atom_options(match["atom"], spec)
        if atom not in cache:
            cache[atom] = _build_atom(atom, spec, options, device=device, dtype=dtype, batch_size=batch_size)
        terms.append((weight, cache[atom]))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return WeightedReward(terms, name=spec.replace(" ", ""))


def known_rewards() -> str:
    return ", ".join(list(KNOWN_REWARDS) + ["hf:<model id or path>", "py:<module:function>"])


def _atom_options(atom: str, spec: str) -> tuple[str, dict]:
    """`(canonical atom, factory keyword arguments)` of an atom that may carry options in brackets; the canonical
    atom lists only the options that differ from their defaults (`beaver-reward[eos=false]` -> `beaver-reward`)."""
    match = _WITH_OPTIONS.match(atom)
    if match is None or match["name"] not in KNOWN_REWARDS:
        return atom, {}
    name = match["name"]
    if not match["options"].strip():
        raise ValueError(f"Empty options '[]' after reward '{name}' in '{spec}'; write e.g. '{name}[eos]' or "
                         f"'{name}'.")
    allowed = REWARD_OPTIONS.get(name)
    if not allowed:
        raise ValueError(f"Reward '{name}' in '{spec}' takes no options (remove '[{match['options']}]').")
    described = "; ".join(option[3] for option in allowed.values())
    kwargs, shown = {}, []
    for item in match["options"].split(","):
        key, _, text = (part.strip() for part in item.partition("="))
        if key not in allowed:
            raise ValueError(f"Unknown option '{key}' of reward '{name}' in '{spec}'; it takes {described}.")
        keyword, parse, default, _ = allowed[key]
        try:
            value = parse(text)
        except ValueError as err:
            raise ValueError(f"Option '{key}' of reward '{name}' in '{spec}' has to be {err}, got '{text}'.") from None
        kwargs[keyword] = value
        shown = [entry for entry in shown if entry[0] != key]
        if value != default:
            shown.append((key, "" if value is True else f"={'none' if value is None else value}"))
    canonical = name + ("[" + ",".join(key + text for key, text in sorted(shown)) + "]" if shown else "")
    return canonical, kwargs


def _build_atom(atom: str, spec: str, options: dict | None = None, *, device, dtype, batch_size) -> Reward:
    name = atom.partition("[")[0] if options else atom  # options: a known name with settings in brackets
    if name in KNOWN_REWARDS:
        if name in MODEL_REWARDS:
            return KNOWN_REWARDS[name](device=device, dtype=dtype, batch_size=batch_size, name=atom, **(options or {}))
        return KNOWN_REWARDS[name]()
    if atom.startswith("hf:"):
        source = atom[3:].strip()
        if not source:
            raise ValueError(f"Reward '{spec}': 'hf:' needs a model id or path, e.g. 'hf:OpenAssistant/reward-model'.")
        return SequenceClassifierReward(source, device=device, dtype=dtype, batch_size=batch_size, name=atom)
    if atom.startswith("py:"):
        return CallableReward(load_callable(atom[3:]), name=atom)
    if re.fullmatch(_NUMBER, atom):
        raise ValueError(f"Cannot parse reward '{spec}': '{atom}' is a number without a reward; write e.g. "
                         f"'{atom}*vader'.")
    raise ValueError(f"Unknown reward '{atom}' in '{spec}'; known rewards: {known_rewards()}, and weighted sums "
                     "such as '2*beaver-reward-1*beaver-cost'.")
