"""``lmeval-speech synthesize --tasks ...``: pre-render every spoken item of tasks into the TTS cache.

Useful before a long run (the run then only reads the cache) or to warm a shared cache once for
many machines. Reports how many items were already cached (hits) and how many were rendered.
"""

from __future__ import annotations

import json
from collections import defaultdict


def add_arguments(p) -> None:
    p.add_argument("--tasks", required=True, help="comma-separated task or group names, as for lm_eval")
    p.add_argument("--limit", type=int, default=None, help="at most this many docs per task")
    p.add_argument("--tts_engine", default=None, help="override the tasks' TTS engine (espeak-ng, piper)")
    p.add_argument("--tts_voice", default=None)
    p.add_argument("--tts_rate", type=int, default=None)
    p.add_argument("--cache_dir", default=None, help="TTS cache dir (default: $LMEVAL_SPEECH_CACHE or XDG cache)")
    p.add_argument("--include_path", default=None)


def leaf_tasks(task_dict) -> dict:
    """Flatten lm-eval's nested {group: {task: Task}} into {task name: Task}."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(leaf_tasks(value))
        else:
            out[getattr(key, "task_name", key) if not isinstance(key, str) else key] = value
    return out


def collect_texts(task_names: list[str], limit=None, include_path=None) -> dict[str, list[str]]:
    """TTS texts per spec (as JSON) from every doc of every task whose docs are spoken."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = leaf_tasks(get_task_dict(task_names, TaskManager(include_path=include_path)))
    by_spec: dict[str, list[str]] = defaultdict(list)
    for task in tasks.values():
        if not task.config.doc_to_audio:
            continue
        docs = task.eval_docs
        for i, doc in enumerate(docs):
            if limit is not None and i >= limit:
                break
            for ref in task.doc_to_audio(doc) or []:
                if isinstance(ref, dict) and "tts_text" in ref:
                    by_spec[json.dumps(ref.get("tts") or {}, sort_keys=True)].append(ref["tts_text"])
    return by_spec


def main(args) -> int:
    from lmeval_speech.audio import TTSSpec, synthesize_many

    override = {k: v for k, v in {"engine": args.tts_engine, "voice": args.tts_voice, "rate": args.tts_rate}.items() if v}
    by_spec = collect_texts([t for t in args.tasks.split(",") if t], args.limit, args.include_path)
    if not by_spec:
        print("no spoken items in", args.tasks)
        return 1
    total = {"items": 0, "hits": 0, "misses": 0, "seconds": 0.0}
    for spec_json, texts in by_spec.items():
        spec = TTSSpec.from_dict(json.loads(spec_json))
        if override:
            spec = spec.with_overrides(**override)
        stats = synthesize_many(texts, spec, cache_dir=args.cache_dir)
        print(f"{spec.engine} voice={spec.voice} rate={spec.rate}: {stats['items']} items, "
              f"{stats['hits']} cached, {stats['misses']} rendered in {stats['seconds']:.1f}s")
        for k in total:
            total[k] += stats[k]
    print(json.dumps(total))
    return 0
