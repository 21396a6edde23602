"""Owns ``report.html`` and ``leaderboard.html``: pages that open from disk with no server or network.

``report.html`` holds the gap table, the plots (inline PNG data) and an item browser over every paired
item (failed and truncated ones too, with their reasons): the text twin's prompt, the text the TTS
engine spoke, a player with the samples the model heard (``report/clips.py``: FLAC files in ``audio/``
beside the page), each option's log-likelihood in every twin, the gold answer, the cascade transcript
and WER, APS and the Bottom-3 speech positions. Audio is written for at most ``max_clips`` items
(all speech-only errors first, then a seeded sample of the rest); the others name their audio cache
file. The page's HTML/CSS/JS is ``templates/report.html`` (plain inline code, no framework: the page
must work offline from a copied folder), filled with :class:`string.Template`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from string import Template

import numpy as np

from lmeval_speech import twins
from lmeval_speech.fileio import atomic_write
from lmeval_speech.report.render import fmt, fmt_p
from lmeval_speech.runs import logged_flags, twin_rows

TEMPLATES = Path(__file__).with_name("templates")
#: clips written by default: every speech-only error first, then a seeded sample of the other items
MAX_CLIPS = 300
AUDIO_DIR = "audio"


# ------------------------------------------------------------------------------- item records

def _ll(resp) -> float | None:
    """One logged log-likelihood (``[value, is_greedy]`` as strings): a float, None when not scored."""
    value = resp[0] if isinstance(resp, (list, tuple)) and resp else resp
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None  # lslm's Scored(nan, failed=...) mark
    return x if math.isfinite(x) else None


def _twin_view(row: dict, metric: str | None) -> dict:
    """What one twin did on one item: per-option log-likelihoods, its choice, score and flags."""
    lls = [_ll(r[0] if isinstance(r, list) and r and isinstance(r[0], list) else r) for r in row.get("resps") or []]
    finite = [x for x in lls if x is not None]
    failed, truncated = logged_flags(row)
    out = {"ll": lls, "choice": int(np.argmax([-np.inf if x is None else x for x in lls])) if finite else None,
           "correct": None if metric is None or metric not in row else bool(float(row[metric])),
           "failed": failed, "truncated": truncated}
    if "asr_transcript" in row:
        out["transcript"], out["wer"] = row.get("asr_transcript"), row.get("asr_wer")
    return out


def _args(row: dict) -> list[dict]:
    args = row.get("arguments") or {}
    return [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[-1]))] if isinstance(args, dict) else []


def audio_item(run: dict, task: str, row: dict | None) -> dict | None:
    """The audio reference the speech twin's request carried for one item: lm-eval logs it in the
    sample's ``arguments`` (``arg_2``: ``{"audio": [...]}``; the first audio); else rebuilt from the task's
    metadata and ``twins.spoken_text`` (what ``tasks/prompts`` synthesizes). None when neither gives one."""
    logged = next(iter(_args(row or {})), {}).get("arg_2")
    audio = logged.get("audio") if isinstance(logged, dict) else None
    audio = audio[0] if isinstance(audio, list) and audio else audio
    if isinstance(audio, dict) and (audio.get("tts_text") or audio.get("recorded") or audio.get("path")):
        return audio
    meta = run["tasks"][task]["config"].get("metadata") or {}
    text = twins.spoken_text(task, (row or {}).get("doc"))
    if not meta.get("tts") or text is None:
        return None
    return {"tts_text": text, "tts": meta["tts"]}


def item_records(run: dict, report: dict) -> list[dict]:
    """One record per item of every pair (doc ids of the text or speech twin), all twins side by side."""
    rows_by_key = {(r["pair"], r["doc_id"]): r for r in report.get("items") or []}
    records = []
    for pair, tasks in run["pairs"].items():
        metric = (report["pairs"].get(pair) or {}).get("metric")
        rows = {twin: twin_rows(run, pair, twin) for twin in tasks}
        for doc_id in sorted(set(rows["text"]) | set(rows["speech"])):
            text_row, speech_row = rows["text"].get(doc_id), rows["speech"].get(doc_id)
            first = text_row or speech_row
            args = _args(first)
            options = [str(a.get("arg_1", "")) for a in args]
            target = str(first.get("target"))
            gold = int(target) if target.isdigit() and int(target) < len(options) else None
            rec = {"id": f"{pair}:{doc_id}", "pair": pair, "doc": doc_id, "target": target, "gold": gold,
                   "options": options, "prompt": str(args[0].get("arg_0", "")) if args else "",
                   "speech_prompt": str((_args(speech_row) or [{}])[0].get("arg_0", "")) if speech_row else "",
                   "twins": {twin: _twin_view(r[doc_id], metric) for twin, r in rows.items() if doc_id in r}}
            item = audio_item(run, tasks["speech"], speech_row or first)
            rec["_audio_item"] = item
            rec["spoken"] = item.get("tts_text") if item else None
            at = rec["prompt"].find(rec["spoken"]) if rec["spoken"] else -1
            if at >= 0:  # the page holds the text once: the spoken part is a span of the prompt
                rec["spoken_at"], rec["spoken"] = [at, at + len(rec["spoken"])], None
            scored = rows_by_key.get((pair, doc_id))
            for key in ("aps", "monotonicity", "cosine", "bottom3", "bottom3_layer", "n_speech"):
                rec[key] = scored.get(key) if scored else None
            rec["reason"] = "; ".join(f"{twin}: {', '.join(x for x in (v['failed'], v['truncated']) if x)}"
                                      for twin, v in rec["twins"].items() if v["failed"] or v["truncated"])
            rec["cat"] = _category(rec, scored)
            t, s = rec["twins"].get("text", {}), rec["twins"].get("speech", {})
            rec["dll"] = (t["ll"][gold] - s["ll"][gold]) if gold is not None and _both(t, s, gold) else None
            records.append(rec)
    return records


def _both(t: dict, s: dict, gold: int) -> bool:
    return all(len(v.get("ll") or []) > gold and v["ll"][gold] is not None for v in (t, s))


def _category(rec: dict, scored: dict | None) -> str:
    if scored is None:  # not in the gap: failed or truncated (the reason says which twin), or missing a twin
        return "failed" if any(v["failed"] for v in rec["twins"].values()) else \
            "truncated" if any(v["truncated"] for v in rec["twins"].values()) else "unpaired"
    return {(True, True): "both_right", (True, False): "speech_only", (False, True): "text_only",
            (False, False): "both_wrong"}[(scored["text_correct"], scored["speech_correct"])]


def choose_clips(records: list[dict], max_clips: int, seed: int = 0) -> set[str]:
    """Ids of the items whose audio is written: all speech-only errors, then failed/truncated, then a
    seeded sample of the rest, up to ``max_clips`` in all (only items with a synthesized audio)."""
    eligible = [r for r in records if r["_audio_item"] is not None]
    first = [r["id"] for r in eligible if r["cat"] == "speech_only"]
    second = [r["id"] for r in eligible if r["cat"] in ("failed", "truncated")]
    rest = [r["id"] for r in eligible if r["cat"] not in ("speech_only", "failed", "truncated")]
    rest = [rest[i] for i in sorted(np.random.default_rng(seed).permutation(len(rest)))] if rest else []
    return set((first + second + rest)[:max(0, max_clips)])


def captured_seconds(capture_dir) -> dict:
    """{(pair, doc_id): seconds} of the speech twin's audio as the model's capture recorded it (the
    length of the array the encoder got), {} without a capture."""
    if not capture_dir or not Path(capture_dir).is_dir():
        return {}
    from lmeval_speech.capture.store import CaptureReader

    seconds = {}
    for rec in CaptureReader(capture_dir).records:
        notes = rec.get("audio")
        notes = notes[0] if isinstance(notes, list) and notes else notes
        if rec.get("modality") == "speech" and isinstance(notes, dict) and notes.get("seconds") is not None:
            seconds[(rec["pair"], rec["doc_id"])] = float(notes["seconds"])
    return seconds


def attach_audio(records: list[dict], run: dict, out: Path, max_clips: int = MAX_CLIPS, captured=None) -> dict:
    """Write the chosen items' clips to ``out/audio/`` and add ``audio`` (src, seconds, samples, notes)
    or ``audio_cache`` / ``audio_note`` (where the audio is, or why there is none) to every record;
    ``captured`` (:func:`captured_seconds`): a clip whose length differs from the one the model's capture
    recorded says so. Returns the counts, bytes, and clips checked against / differing from the capture."""
    from lmeval_speech.report import clips

    settings = ((run["results"].get("config") or {}).get("lmeval_speech") or {}).get("settings") or {}
    chosen = choose_clips(records, max_clips)
    written, total, failed, checked, differ = 0, 0, 0, 0, 0
    for rec in records:
        item = rec.pop("_audio_item")
        rec["audio"] = None
        if item is None:
            rec["audio_note"] = "no synthesized audio to rebuild (recorded audio, or a task of no known family)"
            continue
        said = clips.synthesized_text(item)
        rec["spoken_form"] = said if said != item.get("tts_text") else None  # only when spoken_form rewrote it
        if rec["id"] not in chosen:
            rec["audio_cache"] = clips.cache_file(item, settings) or json.dumps(item)[:200]  # the page says why
            continue
        try:
            samples, notes = clips.heard(item, settings)
        except Exception as err:  # noqa: BLE001  (an item whose audio failed in the run fails here too: shown)
            failed += 1
            rec["audio_note"] = f"audio not rebuilt: {type(err).__name__}: {err}"
            continue
        name = f"{AUDIO_DIR}/{_safe(rec['pair'])}_{rec['doc']}.flac"
        info = clips.write_flac(out / name, samples)
        heard_s = (captured or {}).get((rec["pair"], rec["doc"]))
        if heard_s is not None:
            checked += 1
            if abs(heard_s - info["seconds"]) > 0.5 / clips.MODEL_RATE:
                differ += 1
                notes = [*notes, (f"NOT the model's length: its capture recorded {heard_s:.4f} s (another "
                                  "sampling rate or settings than this report assumes)")]
        rec["audio"] = {"src": name, "seconds": info["seconds"], "samples": info["samples"], "notes": notes}
        written, total = written + 1, total + info["bytes"]
    keep = {out / r["audio"]["src"] for r in records if r["audio"]}
    for stale in (out / AUDIO_DIR).glob("*.flac"):  # an earlier report's clips in this folder
        if stale not in keep:
            stale.unlink()
    return {"written": written, "bytes": total, "not_rebuilt": failed, "max_clips": max_clips,
            "checked_against_capture": checked, "differ_from_capture": differ}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ------------------------------------------------------------------------------- page

def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _gap_table(report: dict) -> str:
    head = ("<tr><th>pair</th><th>n</th><th>text acc</th><th>speech acc</th><th>gap</th><th>95% CI</th>"
            "<th>McNemar p</th><th>only text right / only speech right</th><th>excluded</th></tr>")
    rows = []
    for name, g in [*report["pairs"].items(), ("overall", report["overall"])]:
        t = g["table"]
        excluded = ", ".join(f"{k} {v}" for k, v in (g.get("excluded") or {}).items())
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{g['n']}</td><td>{fmt(g['text_acc'])}</td>"
                    f"<td>{fmt(g['speech_acc'])}</td><td><b>{fmt(g['gap'])}</b></td>"
                    f"<td>[{fmt(g['ci_low'])}, {fmt(g['ci_high'])}]</td><td>{fmt_p(g['mcnemar']['p'])}</td>"
                    f"<td>{t['text_only']} / {t['speech_only']}</td><td>{html.escape(excluded)}</td></tr>")
    return f"<table class=\"num\">{head}{''.join(rows)}</table>"


def _script_json(obj) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can end it)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


def write_report_html(report: dict, run: dict, out, max_clips: int = MAX_CLIPS) -> dict:
    """``out/report.html`` (+ ``out/audio/*.flac``) for a report computed from ``run``; returns
    {"path", "items", "audio": attach_audio's counts, "page_bytes"}."""
    from lmeval_speech.report.schema import jsonable

    out = Path(out)
    records = item_records(run, report)
    audio = attach_audio(records, run, out, max_clips, captured_seconds(report["run"].get("capture_dir")))
    plots = "".join(f"<figure>{_img(out / f)}</figure>" for f in report["files"]["plots"].values()
                    if (out / f).is_file())
    model = report["run"].get("model_args") or ""
    data = {"items": jsonable(records), "audio": audio,
            "metric": {p: g.get("metric") for p, g in report["pairs"].items()}}
    page = Template((TEMPLATES / "report.html").read_text(encoding="utf-8")).substitute(
        title=html.escape(f"Modality gap: {model}"), model=html.escape(str(model)),
        results=html.escape(report["run"]["results_file"]), gap_table=_gap_table(report), plots=plots,
        notes="".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes") or []) or "<li>none</li>",
        clips=html.escape(f"{audio['written']} clips written ({audio['bytes'] / 1e6:.1f} MB of FLAC, "
                          f"at most {max_clips}: every speech-only error first, then failed or truncated items, "
                          "then a seeded sample); other items name their audio cache file. "
                          f"{audio['checked_against_capture']} clips checked against the length the model's "
                          f"capture recorded: {audio['differ_from_capture']} differ"),
        data=_script_json(data))
    atomic_write(out / "report.html", page)
    return {"path": str(out / "report.html"), "items": len(records), "audio": audio,
            "page_bytes": len(page.encode("utf-8"))}


# ------------------------------------------------------------------------------- leaderboard

LEADERBOARD_COLUMNS = ("label", "pretrained", "tts", "n", "text_acc", "speech_acc", "gap", "ci_low", "ci_high",
                       "mcnemar_p", "S_cos", "S_euc", "aps", "flags")


def write_leaderboard_html(board: dict, out) -> str:
    """``out/leaderboard.html``: the run rows and pair rows as sortable tables, with every
    comparability difference listed (a flagged row is marked)."""
    def table(rows, columns, tid):
        head = "".join(f'<th><button type="button" data-col="{i}">{c}</button></th>' for i, c in enumerate(columns))
        body = []
        for r in rows:
            cells = []
            for c in columns:
                v = r.get(c)
                if isinstance(v, float):
                    cells.append(f'<td data-v="{v!r}">{fmt(v)}</td>')
                elif isinstance(v, list):
                    cells.append(f"<td>{html.escape(', '.join(map(str, v)))}</td>")
                else:
                    cells.append(f"<td>{'' if v is None else html.escape(str(v))}</td>")
            body.append(f'<tr class="{"flagged" if r.get("flags") else ""}">{"".join(cells)}</tr>')
        return f'<table class="num sortable" id="{tid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'

    diffs = board["comparability"]["differences"]
    listed = "".join(f"<li><b>{html.escape(d['aspect'])}</b> ({html.escape(', '.join(d['runs']))}): "
                     f"{html.escape('; '.join(map(str, d['detail'])))}</li>" for d in diffs)
    page = Template((TEMPLATES / "leaderboard.html").read_text(encoding="utf-8")).substitute(
        runs=table(board["runs"], LEADERBOARD_COLUMNS, "runs"),
        pairs=table(board["pairs"], ("label", "pair") + LEADERBOARD_COLUMNS[3:], "pairs"),
        comparable="all runs comparable" if not diffs else f"{len(diffs)} comparability differences (rows flagged)",
        differences=listed or "<li>none</li>",
        notes="".join(f"<li>{html.escape(n)}</li>" for n in board.get("notes") or []) or "<li>none</li>")
    atomic_write(Path(out) / "leaderboard.html", page)
    return str(Path(out) / "leaderboard.html")
