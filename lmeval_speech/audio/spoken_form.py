"""How a text is written for a TTS engine so the audio says what the text twin shows (owns that rewrite).

espeak-ng (and piper, whose phonemizer is espeak-ng's) silently drops or misreads symbols that carry
the meaning of a question, exit code 0: a hyphen-minus after ``=``, ``(`` or ``^``, between spaced
operands or in ``n-1``; an en dash used as a minus or a range; ``<``, ``>``, ``->``, ``^``, ``∨``,
``·``, ``⊃``, ``∈``, ``∪``, ``∩``, ``|`` and ``____`` blanks are silent, and ``[[ ... ]]`` is read as
phoneme code (a matrix ``[[3, 2], [1, 4]]`` comes out as "3"). Measured on MMLU's test set: 40 items
had two options that sounded identical (``1, -1, i, -i``; ``x = 4`` vs ``x = –4``).
Where a symbol is ambiguous in ordinary text the rules leave it: an unspaced hyphen (``n-1``, ``B-12``,
``1914-1918``: espeak-ng says "dash" between numbers), ``__init__``, an ion's charge ``Fe^3+``.

:func:`spoken_form` rewrites those into words or into symbols espeak-ng speaks (U+2212 is read
"minus", ``≤`` "less or equal to"); ordinary text passes unchanged. It is applied to every text
before synthesis (:func:`lmeval_speech.audio.tts.render`) and its :data:`VERSION` is part of the
audio cache key and of the run conditions, so changing a rule re-renders and older captures and
``--use_cache`` databases are refused: bump it with every change of a rule.
"""

from __future__ import annotations

import re

VERSION = 2

MINUS = "\u2212"
# an operand a minus sign can follow: a number, a lone letter that is not the last word of a phrase
# ("Plan B - a backup"), a closing bracket; and one it can precede: a number, a bracket, a lone letter
# not followed by another word ("1945 - a turning point")
_LEFT = r"(?:(?<![A-Za-z])(?<![A-Za-z] )[A-Za-z]|\d|[)\]])"
_RIGHT = r"(?:\d|\.\d|[A-Za-z](?![A-Za-z])(?!\s+[A-Za-z])|[(\[])"
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"_{3,}"), " blank "),  # a fill-in blank (Python's __init__ has runs of two)
    (re.compile(r"\[\["), "[ ["),
    (re.compile(r"\]\]"), "] ]"),
    (re.compile(r"<->|<=>"), " ↔ "),
    (re.compile(r"->|=>"), " → "),
    (re.compile(r"<-(?![\d.])"), " ← "),  # x<-1 is "x less than minus 1"
    (re.compile(r"<="), " ≤ "),
    (re.compile(r">="), " ≥ "),
    (re.compile(r"!="), " ≠ "),
    (re.compile(r"<"), " less than "),
    (re.compile(r">"), " greater than "),
    (re.compile(r"(?<=\d)–(?=\d)"), " to "),  # an unspaced en dash between numbers: a range
    # a sign: a dash after the start, a space, an opening bracket or quote, an operator or a comma, before an operand
    (re.compile(rf"(?:(?<=^)|(?<=[\s(\[{{=,^+*/:;\"'$]))[-–](?={_RIGHT})"), MINUS),
    # binary minus between spaced operands (5 - 3, x – y); unspaced n-1, B-12, 10-K, 1914-1918 stay
    (re.compile(rf"(?<={_LEFT})\s+[-–]\s+(?={_RIGHT})"), f" {MINUS} "),
    (re.compile(r"\^(?!\d*[+\-−](?![\w(]))"), " to the power of "),  # not an ion's charge (Fe^3+)
    (re.compile(r"∨"), " vee "),
    (re.compile(r"∧"), " wedge "),
    (re.compile(r"·"), " dot "),
    (re.compile(r"⊃"), " horseshoe "),
    (re.compile(r"⊆"), " subset of "),
    (re.compile(r"⊂"), " proper subset of "),
    (re.compile(r"∈"), " element of "),
    (re.compile(r"∪"), " union "),
    (re.compile(r"∩"), " intersection "),
    (re.compile(r"∀"), " for all "),
    (re.compile(r"∃"), " there exists "),
    (re.compile(r"\s\|\s"), ". "),  # a separator: "Statement 1 | Statement 2"
    (re.compile(r"\|"), " bar "),
]


def spoken_form(text: str) -> str:
    """``text`` with the symbols TTS engines drop written so they are heard (see the module doc)."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return re.sub(r"[ \t]{2,}", " ", text)
