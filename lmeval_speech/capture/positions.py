"""Which positions of a sequence are "speech" and which are "text", and which twin a task is.

Speech positions come from the adapter itself (where each audio's embeddings were scattered), not
from guessing. Text positions are the tokens of the text twin's *spoken content*: from the start of
the doc's question to the prompt's final ``Answer:`` line, i.e. exactly what the speech twin speaks
(question, plus the options in the letter format). A task whose doc has no ``question`` field uses
its whole context.
"""

from __future__ import annotations

TWIN_SUFFIXES = ("_text", "_speech")


def pair_and_modality(task_name: str | None, has_audio: bool) -> tuple[str, str]:
    name = task_name or "unknown"
    for suffix in TWIN_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
    return name, "speech" if has_audio else "text"


def question_char_span(context: str, doc) -> tuple[int, int]:
    """Character span of the spoken content inside a text twin's prompt (last occurrence)."""
    question = doc.get("question") if isinstance(doc, dict) else None
    question = question.strip() if isinstance(question, str) else ""
    start = context.rfind(question) if question else -1
    if start < 0:
        return 0, len(context)
    end = context.rfind("\nAnswer:")
    return start, end if end > start else len(context)
