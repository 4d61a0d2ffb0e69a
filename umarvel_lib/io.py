"""Small file-system helpers shared by every module: atomic writes, safe paths, hashes.

Nothing partial is ever left behind: files are written to a temporary sibling and renamed,
directories are built under a temporary sibling and renamed into place as a whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class UnsafePathError(ValueError):
    """A relative path from a data file points outside its root (absolute, or climbs with '..')."""


def safe_join(root: str | os.PathLike, rel: str, *, where: str = "") -> Path:
    """Join ``rel`` under ``root`` and refuse a *textual* escape: an absolute path, or one that climbs
    above ``root`` with ``..``.

    Symbolic links inside ``root`` are followed and allowed: a user who links ``mbeir_images`` to
    another disk placed that link in the root on purpose (the usual M-BEIR set-up). ``where`` (e.g.
    ``"file.jsonl:12"``) is put in the error message.
    """
    root_p = Path(root).absolute()
    if rel is None or rel == "":
        raise UnsafePathError(f"{where}: empty path")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise UnsafePathError(f"{where}: absolute path {rel!r} is refused; paths must be relative to {root_p}")
    norm = os.path.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise UnsafePathError(f"{where}: path {rel!r} escapes the data root {root_p} with '..'; refused")
    return root_p / norm


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, **kw) -> Path:
    kw.setdefault("indent", 2)
    kw.setdefault("sort_keys", True)
    return atomic_write_text(path, json.dumps(obj, **kw) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary sibling; on success rename it to ``path``.

    If the body raises (or the process dies), ``path`` is untouched: either the old complete
    directory or nothing. Stale temporaries from killed runs are removed on the next call.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj) -> str:
    """Stable short hash of a JSON-serialisable object (dataclasses go through ``dataclasses.asdict``)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on ``lock_path`` (``fcntl.flock``): serialises builds of the same
    cached artifact, so a second process waits and then reuses what the first wrote."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def checkpoint_digest(path: str | os.PathLike, *, full_limit: int = 1 << 28) -> str:
    """Identity of a checkpoint directory's weights: sha256 of each ``*.safetensors``/``*.bin`` file up
    to ``full_limit`` bytes (micro backbones: exact), else its name, size and first/last MiB (7B
    shards: cheap). Results depend on the weights, not on the recipe that produced them: a rebuilt
    backbone that came out different (pre-training is not bitwise repeatable across machines) must
    not reuse runs of the old one."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}|{size}|".encode())
        if size <= full_limit:
            h.update(file_sha256(f).encode())
        else:
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
