"""On-disk store of captured hidden states: safetensors shards, each with a small JSON index.

Why this shape:

* **Streaming, constant memory.** Records are buffered up to ``shard_size`` and flushed as one
  shard; a 14k-item run never holds more than one shard in memory.
* **Nothing half-written.** A shard and then its index are written to temp names and renamed; the
  index (written last) is what makes a shard visible, and it carries the shard's size and SHA-256,
  so a truncated or altered shard is reported with its path, never read as data.
* **Resumable.** A rerun reads the indexes and skips items already captured; an interrupted run
  loses at most the unflushed buffer.
* **Data-parallel.** Each rank writes its own ``rank{r}-*`` shards; a reader merges all of them.
* **Safe to read.** safetensors and JSON only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write

SCHEMA_VERSION = 1


class CaptureCorruptError(RuntimeError):
    """A shard or index on disk does not match what was written."""


#: Identity fields that must agree for two runs to share one capture dir (device and paths may differ).
IDENTITY_FIELDS = ("pretrained", "revision", "backend", "model_type", "dtype", "config_sha256", "adapter_sha256")


def mismatch(stored: dict, current: dict, keys=None) -> tuple[str, str] | None:
    """The keys whose values differ (``keys`` in their order, else all keys sorted), written ``k=v, ...``
    once with the stored values and once with the current ones; None when none differs. One wording for
    every store that refuses another run's settings (capture dirs here, ``lslm``'s ``--use_cache`` database)."""
    keys = list(keys) if keys is not None else sorted(set(stored) | set(current))
    differ = [k for k in keys if stored.get(k) != current.get(k)]
    if not differ:
        return None
    return tuple(", ".join(f"{k}={side.get(k)!r}" for k in differ) for side in (stored, current))


def check_identity(root: Path, stored: dict | None, identity: dict, has_records: bool) -> None:
    """Refuse to add one model's records to a store that holds another model's."""
    if not stored or not has_records:
        return
    differ = mismatch(stored, identity, IDENTITY_FIELDS)
    if differ:
        raise ValueError(
            f"capture dir {root} holds states of another model ({differ[0]}); this run is {differ[1]}. "
            "Use a new capture_dir (a report would otherwise compare one model's speech states with another's "
            "text states).")


def check_conditions(root: Path, stored: dict | None, conditions: dict | None, has_records: bool) -> None:
    """Refuse to add records made under other run settings (TTS voice or rate, noise, intervention,
    audio limits) to a store: a rerun skips the items already captured, so a report would read the
    first run's states beside the second run's scores."""
    if conditions is None or not has_records or stored == conditions:
        return
    if stored is None:
        raise ValueError(f"capture dir {root} holds states with no record of the settings they were captured "
                         "under (made by an older version): use a new capture_dir")
    differ = mismatch(stored, conditions)
    if differ is None:  # differ only by a key missing on one side and None on the other (a newer setting)
        return
    theirs, ours = differ
    raise ValueError(
        f"capture dir {root} holds states captured under other settings ({theirs}); this run has {ours}. "
        "Use a new capture_dir per condition (`lmeval-speech sweep` gives each condition its own).")


class CaptureInputMismatch(ValueError):
    """A store's record of an item was captured from another model input (prompt, chat template, audio)."""


def record_key(task: str, doc_id) -> str:
    return f"{task}/{doc_id}"


class CaptureWriter:
    def __init__(self, root: str | Path, rank: int = 0, shard_size: int = 64, meta: dict | None = None,
                 identity: dict | None = None, conditions: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_size = shard_size
        self._buffer: list[tuple[dict, dict[str, np.ndarray]]] = []
        existing = CaptureReader(self.root, verify=False)
        self._records = existing.records
        self.done = {record_key(r["task"], r["doc_id"]) for r in self._records}
        self.inputs = {record_key(r["task"], r["doc_id"]): r.get("input_sha256") for r in self._records}
        if identity is not None:
            check_identity(self.root, existing.meta.get("model"), identity, bool(self._records))
        check_conditions(self.root, existing.meta.get("conditions"), conditions, bool(self._records))
        if self._records and meta is not None and existing.meta.get("token_layers", meta.get("token_layers")) != \
                meta.get("token_layers"):  # capture.json would name the new layers over records holding the old
            raise ValueError(f"capture dir {self.root} holds token states of hidden states "
                             f"{existing.meta['token_layers']}; this run captures {meta.get('token_layers')} "
                             "(capture_layers): use a new capture_dir, or the same capture_layers")
        if meta is not None and rank == 0:
            atomic_write(self.root / "capture.json", json.dumps(
                {"schema_version": SCHEMA_VERSION, **meta, "model": identity or existing.meta.get("model"),
                 "conditions": conditions if conditions is not None else existing.meta.get("conditions")}, indent=2))

    def token_counts(self) -> dict[str, int]:
        """Records with token-level states per task already in the store."""
        counts: dict[str, int] = {}
        for r in self._records:
            if r.get("token_layers"):
                counts[r["task"]] = counts.get(r["task"], 0) + 1
        return counts

    def has(self, task: str, doc_id, input_sha256: str | None = None) -> bool:
        """Whether the item is captured; with ``input_sha256``, a record captured from another model
        input (prompt, chat template, audio) is an error, never taken as this input's states."""
        key = record_key(task, doc_id)
        if key not in self.done:
            return False
        stored = self.inputs.get(key)
        if input_sha256 is not None and stored is not None and stored != input_sha256:
            raise CaptureInputMismatch(
                f"capture dir {self.root} holds {key} captured from another model input (the prompt, chat "
                "template or audio changed since): use a new capture_dir, or delete the old one")
        return True

    def add(self, record: dict, tensors: dict[str, np.ndarray]) -> None:
        key = record_key(record["task"], record["doc_id"])
        if key in self.done:
            return
        self.done.add(key)
        self.inputs[key] = record.get("input_sha256")
        self._buffer.append((record, tensors))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.numpy import save

        name = f"rank{self.rank}-{uuid.uuid4().hex[:12]}"
        arrays, rows = {}, []
        for i, (record, tensors) in enumerate(self._buffer):
            for k, v in tensors.items():
                arrays[f"{i}.{k}"] = np.ascontiguousarray(v)
            rows.append({**record, "shard": f"{name}.safetensors", "slot": i, "arrays": sorted(tensors)})
        blob = save(arrays)
        atomic_write(self.root / f"{name}.safetensors", blob)
        index = {"schema_version": SCHEMA_VERSION, "shard": f"{name}.safetensors", "bytes": len(blob),
                 "sha256": hashlib.sha256(blob).hexdigest(), "records": rows}
        atomic_write(self.root / f"{name}.json", json.dumps(index).encode())
        self._buffer.clear()

    @property
    def pending(self) -> int:
        return len(self._buffer)


def common_token_layers(*records: dict) -> list[int]:
    """The hidden-state indices every one of ``records`` holds token-level states for, in the first's order."""
    first, *rest = records
    return [layer for layer in first.get("token_layers") or [] if all(layer in (r.get("token_layers") or []) for r in rest)]


def token_states(arrays: dict, record: dict, layers: list[int]) -> list[np.ndarray]:
    """A loaded record's token-level states [T, D] at each of ``layers``."""
    return [arrays["tokens"][record["token_layers"].index(layer)] for layer in layers]


class CaptureReader:
    """All records under a capture dir (every rank), loaded lazily shard by shard."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        self.verify = verify
        self.records: list[dict] = []
        self._verified: set[str] = set()
        self._shards: dict[str, dict] = {}
        for idx in sorted(self.root.glob("rank*-*.json")):
            try:
                index = json.loads(idx.read_text())
                rows = index["records"]
            except (json.JSONDecodeError, KeyError, OSError) as err:
                raise CaptureCorruptError(f"unreadable capture index {idx}: {err}") from err
            self._shards[index["shard"]] = index
            self.records.extend(rows)
        # Data-parallel padding can make two ranks capture the same item: keep one record per key.
        seen: set[str] = set()
        self.records = [r for r in self.records
                        if not (record_key(r["task"], r["doc_id"]) in seen or seen.add(record_key(r["task"], r["doc_id"])))]
        self.meta = json.loads((self.root / "capture.json").read_text()) if (self.root / "capture.json").exists() else {}

    def _check(self, shard: str) -> Path:
        path = self.root / shard
        if shard in self._verified or not self.verify:
            return path
        index = self._shards[shard]
        if not path.exists():
            raise CaptureCorruptError(f"capture shard missing: {path}")
        data = path.read_bytes()
        if len(data) != index["bytes"] or hashlib.sha256(data).hexdigest() != index["sha256"]:
            raise CaptureCorruptError(f"capture shard is truncated or altered: {path} "
                                      f"({len(data)} bytes, index says {index['bytes']})")
        self._verified.add(shard)
        return path

    def load(self, record: dict, names=None) -> dict[str, np.ndarray]:
        """The record's arrays (``names``: only those, e.g. ``("pooled",)``, which skips token states)."""
        from safetensors import safe_open

        path = self._check(record["shard"])
        out = {}
        with safe_open(str(path), framework="numpy") as f:
            for name in record["arrays"] if names is None else [n for n in record["arrays"] if n in names]:
                out[name] = f.get_tensor(f"{record['slot']}.{name}")
        return out
