"""Default run names: ``MODEL[-METHOD]-YYYYmmdd-HHMMSS``, never one already taken.

A run without ``name`` (``--name``) or ``train.out_dir`` (``--out``) is named after its model,
its conversion method and its start time, as timm's ``train.py`` names its output folders, and
claims ``runs/NAME`` by creating it (an atomic ``mkdir``): a second run started in the same
second, in this process or another, gets ``NAME-2``, then ``NAME-3``, ...
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

__all__ = ["RUNS", "claim_run_folder", "default_run_name"]

#: The folder that holds the named runs (relative to the working directory).
RUNS = Path("runs")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_run_name(config: dict[str, Any], when: float | None = None) -> str:
    """``MODEL[-METHOD]-YYYYmmdd-HHMMSS`` of a configuration, at time ``when`` (default: now)."""
    model = config["model"]
    parts = [model["name"]]
    if model["convert"]:
        parts.append(model["convert"]["method"])
    when = time.time() if when is None else when
    parts.append(time.strftime("%Y%m%d-%H%M%S", time.localtime(when)))
    return "-".join(_UNSAFE.sub("_", part).strip("._") or "model" for part in parts)


def claim_run_folder(name: str, root: Path = RUNS) -> Path:
    """Create and return ``root/name``, or ``root/name-2``, ``-3``... the first not taken."""
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        folder = root / (name if number == 1 else f"{name}-{number}")
        try:
            folder.mkdir()
        except FileExistsError:
            number += 1
            continue
        return folder
