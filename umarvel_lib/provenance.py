"""Where a result came from: the code's git commit and the software/hardware it ran on.

One helper for every sidecar (``row.json`` of a run, ``config.json`` of an evaluation), so both
record the same package set. Torch-free: the CUDA device is read only when torch is already loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

#: Distributions whose versions are recorded (None when not installed).
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "numpy",
    "pandas",
    "faiss-cpu",
    "faiss-gpu",
)


# what a run writes into the checkout (results/<preset>/...): changing it is not changing the kit, so a
# run that overwrites a committed result does not make the runs after it "+dirty"
OUTPUT_DIRS = ("results",)


def git_commit(where: Path | None = None) -> str | None:
    """``HEAD`` of the kit's checkout (``where``: any path inside it; default this package), with
    ``+dirty`` when tracked files outside :data:`OUTPUT_DIRS` are modified; None outside git."""
    here = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)"]
            + [f":(top,exclude){d}" for d in OUTPUT_DIRS],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    """Python, platform, CPU count, CUDA device (if torch is loaded) and the :data:`PACKAGES` versions."""
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    torch = sys.modules.get("torch")
    try:
        out["cuda"] = (
            torch.cuda.get_device_name(0)
            if torch is not None and torch.cuda.is_available()
            else None
        )
    except Exception:  # noqa: BLE001  (a broken driver must not sink a sidecar)
        out["cuda"] = None
    return out


def provenance() -> dict:
    """``{"git": commit, "versions": {...}}``: what every sidecar records."""
    return {"git": git_commit(), "versions": versions()}
