"""How a text is written for a TTS engine so the audio says what the text twin shows (owns that rewrite).

espeak-ng (and piper, whose phonemizer is espeak-ng's) silently drops or misreads symbols that carry
the meaning of a question, exit code 0: a hyphen-minus after ``=``, ``(`` or ``^``, between spaced
operands or in ``n-1``; an en dash used as a minus or a range; ``<``, ``>``, ``->``, ``^``, ``∨``,
``·``, ``⊃``, ``∈``, ``∪``, ``∩``, ``|`` and ``____`` blanks are silent, and ``[[ ... ]]`` is read as
phoneme code (a matrix ``[[3, 2], [1, 4]]`` comes out as "3"). Measured on MMLU's test set: 40 items
had two options that sounded identical (``1, -1, i, -i``; ``x = 4`` vs ``x = –4``).

:func:`spoken_form` rewrites those into words or into symbols espeak-ng speaks (U+2212 is read
"minus", ``≤`` "less or equal to"); ordinary text passes unchanged. It is applied to every text
before synthesis (:func:`lmeval_speech.audio.tts.render`) and its :data:`VERSION` is part of the
audio cache key, so changing a rule re-renders. A digit-digit hyphen (``1914-1918``, ``10-3``) stays:
espeak-ng says "dash", as ambiguous as the text.
"""

from __future__ import annotations

import re

VERSION = 1

MINUS = "\u2212"
# an operand that a minus sign can follow or precede: a number, a lone letter (a variable), a bracket
_LEFT = r"(?:(?<![A-Za-z])[A-Za-z]|\d|[)\]])"
_RIGHT = r"(?:\d|\.\d|[A-Za-z](?![A-Za-z])|[(\[])"
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"_{2,}"), " blank "),
    (re.compile(r"\[\["), "[ ["),
    (re.compile(r"\]\]"), "] ]"),
    (re.compile(r"<->|<=>"), " ↔ "),
    (re.compile(r"->|=>"), " → "),
    (re.compile(r"<-"), " ← "),
    (re.compile(r"<="), " ≤ "),
    (re.compile(r">="), " ≥ "),
    (re.compile(r"!="), " ≠ "),
    (re.compile(r"<"), " less than "),
    (re.compile(r">"), " greater than "),
    # en dash between numbers: a range
    (re.compile(r"(?<=\d)\s?–\s?(?=\d)"), " to "),
    # a sign: a dash after the start, a space, an opening bracket, an operator or a comma, before an operand
    (re.compile(rf"(?:(?<=^)|(?<=[\s(\[{{=,^+*/:;]))[-–](?={_RIGHT})"), MINUS),
    # binary minus between operands: spaced (5 - 3, x – y) or a variable next to a number (n-1, 2-x)
    (re.compile(rf"(?<={_LEFT})\s+[-–]\s+(?={_RIGHT})"), f" {MINUS} "),
    (re.compile(r"(?<![A-Za-z])([A-Za-z])-(?=\d)"), rf"\1{MINUS}"),
    (re.compile(r"(?<=\d)-(?=[A-Za-z](?![A-Za-z]))"), MINUS),
    (re.compile(r"\^"), " to the power of "),
    (re.compile(r"∨"), " vee "),
    (re.compile(r"·"), " dot "),
    (re.compile(r"⊃"), " horseshoe "),
    (re.compile(r"∈"), " element of "),
    (re.compile(r"∪"), " union "),
    (re.compile(r"∩"), " intersection "),
    (re.compile(r"\|"), " bar "),
]


def spoken_form(text: str) -> str:
    """``text`` with the symbols TTS engines drop written so they are heard (see the module doc)."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return re.sub(r"[ \t]{2,}", " ", text)
