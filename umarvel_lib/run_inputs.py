"""What a run reads, resolved and digested: its data root (the preset's synthetic mini-M-BEIR generated
when it is the default and missing), the content digests of the data parts each stage reads, and its
backbone checkpoint (given, shipped, or built).
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .io import DigestCache


def ensure_data(cfg: RunConfig) -> Path:
    """The data root; the synthetic mini-M-BEIR of the preset is generated when it is the default and missing."""
    root = cfg.resolved_data_root()
    if cfg.data_root is None:
        from .data.synthetic import generate

        generate(root, cfg.synthetic())
    elif not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist (pass the path of a local M-BEIR copy)"
        )
    return root


# the parts of a data root that the NLI and CC3M stages read; everything else is M-BEIR (queries, pools,
# qrels, instructions, images). Keys of RunConfig.data_digest (see config.data_parts).
DATA_PARTS = {
    "nli": "nli",
    "cc3m": "cc3m",
}  # the synthetic build's default places, inside the data root


def data_digest(cfg: RunConfig, root: Path) -> dict:
    """Content digests of the data a run reads: ``{"mbeir", "nli", "cc3m"}``, each over every file's name
    and bytes (images included), so a file fixed or replaced in place is a different run while a copy
    of the same bytes elsewhere is the same. NLI and CC3M are read where ``--nli-path`` / ``--cc3m-root``
    put them (default: ``<root>/nli``, ``<root>/cc3m``). Each file is hashed once and then recognised by
    its (path, size, mtime) (:class:`~umarvel_lib.io.DigestCache`, ``<cache_dir>/file_digests.sqlite``)."""
    store = DigestCache(Path(cfg.cache_dir) / "file_digests.sqlite")
    root = Path(root)
    out = {"mbeir": store.tree_digest(root, exclude=tuple(DATA_PARTS.values()))}
    nli = cfg.resolved_nli_path()
    out["nli"] = store.files_digest([nli], root=nli.parent) if nli.is_file() else None
    cc3m = cfg.resolved_cc3m_root()
    out["cc3m"] = store.tree_digest(cc3m) if cc3m.is_dir() else None
    return out


def backbone_path(cfg: RunConfig, *, progress: bool = True) -> Path:
    """A local checkpoint directory: ``cfg.backbone`` if given, else the preset's micro backbone: the
    build shipped in the repository (``backbones/<kind>-<size>/``) when it is of the current recipe,
    else the cached build (built when missing; ``progress``: its pre-training progress bar)."""
    if cfg.backbone:
        from .models.loading import resolve_local_checkpoint

        return resolve_local_checkpoint(cfg.backbone)
    from .micro.build import build_backbone
    from .micro.recipe import BackboneConfig
    from .micro.shipped import shipped_backbone

    bcfg = BackboneConfig(kind=cfg.backbone_kind, size=cfg.backbone_size)
    return shipped_backbone(bcfg) or build_backbone(
        bcfg, Path(cfg.cache_dir) / "backbones", progress=progress
    )
