"""Micro backbones that ship with the repository (``backbones/<kind>-<size>/``).

Pre-training a micro backbone is not bitwise repeatable across machines (thread counts, BLAS
kernels), and every run is keyed by the digest of the weights it used, so results made on one
machine would retrain on another. The build the committed results used therefore ships in the
repository: the files of a complete :func:`~.build.build_backbone` directory (``model.safetensors``,
``config.json``, tokenizer and processor files, ``recipe.json``) plus ``shipped.json`` with the
weights' :func:`~umarvel_lib.io.checkpoint_digest`.

* :func:`shipped_backbone` is what runs use by default (``run_inputs.backbone_path``): the shipped
  build of a recipe if its ``recipe.json`` hash is the recipe's (a changed recipe falls back to a
  cached build), after checking that its weights still have the recorded digest.
* :func:`ship` copies a complete build into the shipped location (``umarvel backbone --ship``).
* :func:`rebuild` builds the recipe afresh into the cache and compares it with the shipped build
  (``umarvel backbone --rebuild``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, checkpoint_digest, read_json
from .build import build_backbone, is_complete_build, read_recipe
from .recipe import BackboneConfig

SHIPPED_ROOT = Path(__file__).resolve().parents[2] / "backbones"  # the repository's backbones/
SHIPPED_FILE = "shipped.json"


class ShippedBackboneError(RuntimeError):
    """A shipped backbone whose weights do not match its recorded digest (corrupt or a Git LFS pointer)."""


def shipped_dir(
    kind: str = "qwen2_vl", size: str = "micro", root: str | Path | None = None
) -> Path:
    return Path(root or SHIPPED_ROOT) / f"{kind}-{size}"


def shipped_backbone(cfg: BackboneConfig, root: str | Path | None = None) -> Path | None:
    """The shipped build of ``cfg``'s recipe, or ``None`` (nothing shipped, or shipped for another recipe).

    Raises :class:`ShippedBackboneError` when the shipped weights are not the ones recorded in
    ``shipped.json`` (a truncated copy, an un-fetched Git LFS pointer): silently training on other
    weights would break the identity of every committed run.
    """
    cfg = cfg.resolved()
    p = shipped_dir(cfg.kind, cfg.size, root)
    if not (is_complete_build(p) and (p / SHIPPED_FILE).is_file()):
        return None
    if read_recipe(p).get("hash") != cfg.hash:
        return None
    meta = read_json(p / SHIPPED_FILE)
    digest = checkpoint_digest(p)
    if digest != meta.get("digest"):
        raise ShippedBackboneError(
            f"{p / 'model.safetensors'}: weights digest {digest} differs from the {meta.get('digest')} recorded in "
            f"{p / SHIPPED_FILE}; restore the file (git checkout -- {p}) or rebuild with `umarvel backbone --rebuild`"
        )
    return p


def ship(build: str | Path, root: str | Path | None = None) -> Path:
    """Copy a complete build directory into ``<root>/<kind>-<size>/`` and record its digest.

    The copy is written to a temporary sibling and renamed, so an interrupted copy leaves the old
    shipped build (or nothing).
    """
    build = Path(build)
    if not is_complete_build(build):
        raise FileNotFoundError(
            f"{build}: not a complete backbone build (recipe.json, config.json, "
            f"model.safetensors); build it with `umarvel backbone` first"
        )
    recipe = read_recipe(build)
    cfg = BackboneConfig.from_dict(recipe["config"])
    out = shipped_dir(cfg.kind, cfg.size, root)
    with atomic_dir(out) as tmp:
        for f in sorted(build.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(
            tmp / SHIPPED_FILE,
            {
                "digest": checkpoint_digest(tmp),
                "name": recipe["name"],
                "hash": recipe["hash"],
                "shipped_from": build.name,
                "shipped_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
    return out


def rebuild(
    cfg: BackboneConfig,
    cache_dir: str | Path,
    root: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Build ``cfg``'s recipe afresh under ``cache_dir`` (replacing a cached build) and compare its
    weights' digest with the shipped build's. Returns ``{"path", "digest", "shipped", "shipped_digest",
    "identical"}`` (``shipped``/``shipped_digest``/``identical`` are ``None`` when nothing is shipped)."""
    cfg = cfg.resolved()
    path = build_backbone(cfg, cache_dir, progress=progress, force=True)
    ship_p = shipped_dir(cfg.kind, cfg.size, root)
    shipped = (
        ship_p
        if (is_complete_build(ship_p) and read_recipe(ship_p).get("hash") == cfg.hash)
        else None
    )
    ref = checkpoint_digest(shipped) if shipped else None
    digest = checkpoint_digest(path)
    return {
        "path": path,
        "digest": digest,
        "shipped": shipped,
        "shipped_digest": ref,
        "identical": (digest == ref) if ref else None,
    }


__all__ = [
    "SHIPPED_ROOT",
    "SHIPPED_FILE",
    "ShippedBackboneError",
    "shipped_dir",
    "shipped_backbone",
    "ship",
    "rebuild",
]
