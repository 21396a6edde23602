"""The package's structure (issue 30): imports between its folders point one way (each unit imports only units
before it in ``ORDER``, checked on the source with ``ast``, function-level imports included), and every module
has a docstring saying what it owns and at most 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmeval_speech"

#: lowest first: a unit may import the units before it, never one after it
ORDER = [
    "__init__",                                                   # the package's constants (AUDIO_MARKER)
    "fileio", "conditions", "layers", "twins", "nltk_data", "hooks", "metrics",  # foundations
    "audio",                                                      # synthesis, loading, ASR
    "outcomes", "capture",                                        # per-item outcomes, the state store
    "interventions",                                              # edits (read the store for steering)
    "tasks", "own_tasks",                                         # lm-eval task families, a user's own pairs
    "models",                                                     # the lslm adapter, backends, planner
    "mini",                                                       # the embedded model (a backend plugin)
    "runs", "manifest",                                           # reading a finished run
    "report",                                                     # report, compare, check
    "sweep", "registration", "cli", "_autoload",                  # entry points
]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lmeval_speech":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if path.name != "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module == "lmeval_speech":  # from lmeval_speech import twins (a module) or a name
                out |= {f"lmeval_speech.{a.name}" if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").exists()
                        else "lmeval_speech" for a in node.names}
            else:
                out.add(node.module or "")
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = rel.parts[1]  # lmeval_speech/<unit>[/...]; the package's own __init__ is the unit "__init__"
        for target in _imports(path, module):
            dst = _unit(target)
            if dst and dst != src:
                found.setdefault((src, dst), []).append(str(path.relative_to(PACKAGE)))
    return found


def test_every_unit_is_placed():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units <= set(ORDER), f"place these in ORDER: {sorted(units - set(ORDER))}"


def test_imports_point_one_way():
    rank = {u: i for i, u in enumerate(ORDER)}
    upward = {f"{a} -> {b}": files for (a, b), files in edges().items() if rank[b] >= rank[a]}
    assert not upward, f"imports against the layering (ORDER in this test): {upward}"


def test_every_module_says_what_it_owns_and_stays_under_400_lines():
    long, undocumented = {}, []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if not ast.get_docstring(ast.parse(text)):
            undocumented.append(str(path.relative_to(PACKAGE)))
        if (n := text.count("\n")) > 400:
            long[str(path.relative_to(PACKAGE))] = n
    assert not undocumented, f"modules without a docstring saying what they own: {undocumented}"
    assert not long, f"modules over 400 lines (split them by job): {long}"
