"""What every benchmark records beside its numbers: machine, card, commit, date."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone

import torch


def machine() -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit(),
    }
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
    else:
        info["card"] = "none (CPU)"
        info["cpu"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def commit() -> str:
    if os.environ.get("UDML_COMMIT"):
        return os.environ["UDML_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
