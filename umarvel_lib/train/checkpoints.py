"""A stage directory as later runs read it: is its checkpoint complete, and its dev curve.

A stage (or the reranker) saves its merged checkpoint under ``<stage dir>/model`` with a marker file
written last (``embedder.json``, ``reranker.json``); the trainer logs the dev evaluations in
``<stage dir>/train/eval.jsonl``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import DamagedFileError, check_safetensors, read_json

log = logging.getLogger(__name__)


def checkpoint_complete(final: Path, marker: str) -> bool:
    """A finished stage (or reranker) checkpoint: ``marker`` written last, and whole weight files. A damaged
    one (a weight file cut short) is logged with its path and counts as not finished: it is trained
    again and replaced as a whole."""
    if not (final / marker).is_file():
        return False
    try:
        for f in sorted(final.glob("*.safetensors")):
            check_safetensors(f)
        read_json(final / marker)
    except DamagedFileError as e:
        log.warning("%s; %s is trained again", e, final)
        return False
    return True


def dev_curve(sdir: Path) -> list[dict]:
    """A stage's dev curve: ``{"step", "dev_avg", "dev_ci_lo", "dev_ci_hi", ...}`` from its ``train/eval.jsonl``."""
    f = Path(sdir) / "train" / "eval.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r for r in recs if "dev_avg" in r]
