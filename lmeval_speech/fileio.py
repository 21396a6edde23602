"""Owns writing files atomically: a unique temp file in the target's folder, fsync, rename.

Every result, cache, capture, calibration and checkpoint file of the package is written through
``atomic_write``, so a reader (or a run resumed after ``kill -9``) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path, obj, **kw) -> Path:
    kw.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **kw) + "\n")
