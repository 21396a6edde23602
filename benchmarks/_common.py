"""What every benchmark prints about the machine, so tables from different runs can be compared."""

from __future__ import annotations

import os
import platform
from datetime import datetime


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_info(threads: int) -> str:
    import lm_eval
    import torch
    import transformers

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{datetime.now().isoformat(timespec='seconds')} | {platform.node()} | {cpu_name()} | {os.cpu_count()} "
            f"cores, load avg {load} | torch {torch.__version__} ({threads} thread(s)), transformers "
            f"{transformers.__version__}, lm-eval {lm_eval.__version__}, Python {platform.python_version()}")
