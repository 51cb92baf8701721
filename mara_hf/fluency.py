"""A cheap offline fluency screen: repeated n-grams, loops of the same words, and drift out of the prompt's language.

One definition serves three uses: the `fluency` reward (`mara_hf.rewards.FluencyReward`, usable in weighted sums such
as `10*vader+5*fluency`), the share of degenerate answers that `mara-hf eval` reports for both sides, and
`benchmarks/eval/fluency.py`. It needs no model and no download, is deterministic, and scores a 64-token answer in
well under a millisecond.

Four measurements are taken on the words of the response (whitespace-split, lower-cased, leading and trailing
punctuation stripped). Each becomes a penalty `clip(0.5 * (m - free) / (edge - free), 0, 1)`: nothing up to `free`
(what fluent text shows), 0.5 at `edge` (degenerate), 1 at twice that distance.

| measurement m | free | edge |
|---|---|---|
| rep-3 (Welleck et al., 2019): share of word trigrams repeating an earlier one, `1 - distinct / total` | 0.1 | 0.2 |
| run: longest immediate repetition of a word n-gram, n = 1..4 ("no, no, no": 3) | 2 | 3 |
| foreign script: share of the response's letters in a script the prompt's letters do not use | 0.05 | 0.1 |
| language drift: `(share_other - share_prompt_language) / share_other` over function words | 0 | 0.5 |

`repetition` is the rep-3 penalty, `loop` the run penalty ("I'll not. I'll not. I'll not." is a run of 3 of a
bigram), `drift` the larger of the last two. ASCII letters always count as the prompt's script (names, terms and
code are often English). Language drift tells English, Spanish, French, German, Italian, Portuguese, Dutch and
Polish apart by short lists of their most common words; it needs a prompt of 3+ words with 2+ function words of one
language more than of any other, and a response of 8+ words with 3+ function words of the other language.

`fluency = -max(repetition, loop, drift)`, in [-1, 0]: 0 is fluent, -1 fully degenerate; an answer is
**degenerate** when its fluency is <= -0.5 (`DEGENERATE_THRESHOLD`). It is a screen for gross failures, not a
quality score: it misses bland or incoherent text, and lists whose items share a phrase cost some repetition.

```python
>>> from mara_hf.fluency import fluency, is_degenerate
>>> fluency("Why?", "Because the sky scatters blue light more than red light.")
0.0
>>> is_degenerate("Why?", "Because because because because.")
True

```
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import asdict, dataclass

DEGENERATE_THRESHOLD = -0.5
"""An answer is degenerate when its fluency is at or below this."""

REP3_FREE, REP3_EDGE = 0.1, 0.2
"""rep-3 up to which repetition costs nothing, and at which an answer is degenerate."""
RUN_FREE, RUN_EDGE = 2, 3
"""Immediate repetitions of a word n-gram that cost nothing ("very very"), and that are degenerate."""
SCRIPT_FREE, SCRIPT_EDGE = 0.05, 0.1
"""Share of foreign-script letters that costs nothing (a borrowed word), and that is degenerate."""
DRIFT_FREE, DRIFT_EDGE = 0.0, 0.5
"""Language drift that costs nothing, and that is degenerate (another language's function words twice the prompt
language's)."""
LOOP_MAX_N = 4
"""Longest word n-gram whose immediate repetitions count as a loop."""
MIN_WORDS_FOR_LANGUAGE = (3, 8)
"""Words a prompt and a response need before their language is compared."""
MIN_FUNCTION_WORDS = (2, 3)
"""Function words the prompt's language needs to be recognised (more than any other language's), and function
words of another language a response needs before it counts as drifted."""

FLUENCY_DEFINITION = (
    "fluency = -max(repetition, loop, drift) in [-1, 0] (mara_hf.fluency); degenerate when fluency <= -0.5. Each "
    "penalty is clip(0.5 * (m - free) / (edge - free), 0, 1) of a measurement m on the response's words "
    "(lower-cased, outer punctuation stripped): repetition: m = rep-3 = 1 - distinct / total word trigrams, free 0.1, "
    "edge 0.2; loop: m = the longest immediate repetition of a word n-gram (n = 1..4), free 2, edge 3; drift: the "
    "larger of m = the share of letters in a script the prompt does not use (ASCII always allowed), free 0.05, edge "
    "0.1, and m = (share_other - share_prompt) / share_other when the function words of another language (en, es, "
    "fr, de, it, pt, nl, pl; 3+ of them) outnumber those of the prompt's language (2+ function words in a prompt of "
    "3+ words) in a response of 8+ words, free 0, edge 0.5."
)

_FUNCTION_WORDS = {
    "en": "a the of and to in is you that it for on with as are be this can your or not by have but an they at from "
          "if their will we my what there so about would them he she his her more how some which when all was i do "
          "it's i'm don't these those has been were our any also such than",
    "es": "el la los las de del que y en un una por para con no es se su al lo como más pero sus le ya o este sí "
          "porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos todos uno les ni "
          "otros ese eso ellos esto yo otro otra él esa estos mucho nada ella estar estas algo",
    "fr": "le la les de des du et est un une en que qui dans pour pas sur au aux avec ce il elle ne se son sa ses "
          "plus par je vous nous on mais ou comme sont été être cette tout leur",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem es auch ich sie er wir ihr aber "
          "wie oder wenn noch nur bei aus um am kann werden sind hat haben einen einer",
    "it": "il lo la gli le di che e è un una per non con del della dei delle si sono ma come anche più questo "
          "questa nel nella al alla ho io tu lui lei noi voi loro mi ti ci",
    "pt": "o a os as de do da dos das que e é um uma em no na nos nas para com não por se mais mas como seu sua ao "
          "ou ele ela eu você isso este esta muito também",
    "nl": "de het een en van is dat die niet op te in zijn voor met er maar ook als aan bij ik je we hij zij wat om "
          "dan naar nog wordt kan deze dit",
    "pl": "i w z na się nie to do że jest o jak ale po co tak za od jego ich przez dla czy już jej tylko być może są "
          "był oraz ten ta te jako we ze mnie mi",
}
FUNCTION_WORDS = {language: frozenset(words.split()) for language, words in _FUNCTION_WORDS.items()}
"""The most common words of each language the drift check tells apart (English first: it wins ties)."""

_SCRIPT_FAMILIES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HALFWIDTH": "CJK", "IDEOGRAPHIC": "CJK"}
_OUTER_PUNCTUATION = re.compile(r"^\W+|\W+$")


@dataclass(frozen=True)
class FluencyReport:
    """The measurements behind one fluency score (see the module docstring).

    Attributes:
        rep3: share of repeated word trigrams.
        longest_run: longest immediate repetition of a word n-gram (1 = none).
        foreign_script_share: share of the response's letters in a script the prompt does not use.
        language_drift: how far the function words of another language outnumber the prompt language's (0-1).
        repetition, loop, drift: the three penalties in [0, 1].
        score: `-max(repetition, loop, drift)`.
    """

    rep3: float
    longest_run: int
    foreign_script_share: float
    language_drift: float
    repetition: float
    loop: float
    drift: float
    score: float

    @property
    def degenerate(self) -> bool:
        return self.score <= DEGENERATE_THRESHOLD

    def to_dict(self) -> dict:
        return {**asdict(self), "degenerate": self.degenerate}


def words(text: str) -> list[str]:
    """The words of `text`: split at whitespace, lower-cased, leading and trailing punctuation stripped; pieces
    that are only punctuation (list bullets, `**`) are dropped."""
    pieces = (_OUTER_PUNCTUATION.sub("", piece.lower()) for piece in text.split())
    return [piece for piece in pieces if piece]


def rep_n(tokens: list[str], n: int = 3) -> float:
    """`1 - distinct / total` over the n-grams of `tokens` (0 when there are none)."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def longest_run(tokens: list[str], max_n: int = LOOP_MAX_N) -> int:
    """How many times in a row the most repeated word n-gram (n <= `max_n`) occurs: 1 when nothing repeats
    immediately, 3 for "no no no" or "I'll not I'll not I'll not"."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        same = 0  # consecutive positions i with tokens[i] == tokens[i + n]
        for i in range(len(tokens) - n):
            same = same + 1 if tokens[i] == tokens[i + n] else 0
            best = max(best, same // n + 1)
    return best


def _script(char: str) -> str:
    if char.isascii():
        return "ASCII"
    try:
        name = unicodedata.name(char).split()[0]
    except ValueError:
        return "UNKNOWN"
    return _SCRIPT_FAMILIES.get(name, name)


def foreign_script_share(prompt: str, response: str) -> float:
    """Share of the response's letters whose script (the first word of its Unicode name, with Japanese kana
    counted as CJK and ASCII letters always allowed) does not occur among the prompt's letters. 0 when the prompt
    has no letters."""
    allowed = {_script(char) for char in prompt if char.isalpha()}
    letters = [char for char in response if char.isalpha()]
    if not allowed or not letters:
        return 0.0
    allowed.add("ASCII")
    return sum(_script(char) not in allowed for char in letters) / len(letters)


def _function_word_shares(tokens: list[str]) -> dict[str, tuple[int, float]]:
    return {language: (hits := sum(token in vocabulary for token in tokens), hits / len(tokens))
            for language, vocabulary in FUNCTION_WORDS.items()}


def language_drift(prompt_words: list[str], response_words: list[str]) -> float:
    """`(share_other - share_prompt) / share_other` when another language's function words outnumber those of the
    prompt's language in the response; 0 when they do not, or when either text is too short to tell."""
    if len(prompt_words) < MIN_WORDS_FOR_LANGUAGE[0] or len(response_words) < MIN_WORDS_FOR_LANGUAGE[1]:
        return 0.0
    prompt_hits = sorted(((hits, name) for name, (hits, _) in _function_word_shares(prompt_words).items()),
                         reverse=True)
    (hits, language), (runner_up, _) = prompt_hits[0], prompt_hits[1]
    if hits < MIN_FUNCTION_WORDS[0] or hits == runner_up:
        return 0.0  # the prompt's language is not clear
    shares = _function_word_shares(response_words)
    other = max(shares, key=lambda name: shares[name][0])
    hits, share = shares[other]
    if other == language or hits < MIN_FUNCTION_WORDS[1] or hits == shares[language][0]:
        return 0.0
    return (share - shares[language][1]) / share


def _penalty(measurement: float, free: float, edge: float) -> float:
    """0 up to `free`, 0.5 at `edge`, 1 from `2 * edge - free` on."""
    return min(1.0, max(0.0, 0.5 * (measurement - free) / (edge - free)))


def fluency_report(prompt: str, response: str) -> FluencyReport:
    """All measurements and penalties of one (prompt, response) pair."""
    response_words = words(response)
    rep3 = rep_n(response_words, 3)
    run = longest_run(response_words)
    script_share = foreign_script_share(prompt, response)
    drift_words = language_drift(words(prompt), response_words)
    repetition = _penalty(rep3, REP3_FREE, REP3_EDGE)
    loop = _penalty(run, RUN_FREE, RUN_EDGE)
    drift = max(_penalty(script_share, SCRIPT_FREE, SCRIPT_EDGE), _penalty(drift_words, DRIFT_FREE, DRIFT_EDGE))
    return FluencyReport(rep3=rep3, longest_run=run, foreign_script_share=script_share, language_drift=drift_words,
                         repetition=repetition, loop=loop, drift=drift, score=0.0 - max(repetition, loop, drift))


def fluency(prompt: str, response: str) -> float:
    """`-max(repetition, loop, drift)` in [-1, 0]: 0 = fluent, <= -0.5 = degenerate."""
    return fluency_report(prompt, response).score


def is_degenerate(prompt: str, response: str) -> bool:
    """Whether the response's fluency is at or below `DEGENERATE_THRESHOLD` (-0.5)."""
    return fluency(prompt, response) <= DEGENERATE_THRESHOLD


def degenerate_summary(prompts: list[str], responses: list[str]) -> dict:
    """`count`, `rate` (share of the responses) and `mean_fluency` of a set of answers."""
    scores = [fluency(p, r) for p, r in zip(prompts, responses, strict=True)]
    count = sum(score <= DEGENERATE_THRESHOLD for score in scores)
    return {"count": count, "rate": count / len(scores) if scores else None,
            "mean_fluency": math.fsum(scores) / len(scores) if scores else None}  # the same on every Python
