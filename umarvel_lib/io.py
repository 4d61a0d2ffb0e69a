"""Small file-system helpers shared by every module: atomic writes, safe paths, hashes.

(Over 400 lines: the lowest layer, which every module may import; splitting it would only add
import paths for the same small helpers.)

Nothing partial is ever left behind: files are written to a temporary sibling and renamed,
directories are built under a temporary sibling and renamed into place as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


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
        raise UnsafePathError(
            f"{where}: absolute path {rel!r} is refused; paths must be relative to {root_p}"
        )
    norm = os.path.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise UnsafePathError(
            f"{where}: path {rel!r} escapes the data root {root_p} with '..'; refused"
        )
    return root_p / norm


class DamagedFileError(ValueError):
    """A file that exists but cannot be read (truncated, not JSON, wrong shape); the message names it."""


def read_json(path: str | os.PathLike):
    """``json.load`` of ``path``; a damaged file raises :class:`DamagedFileError` naming it (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFileError(
            f"{path}:{e.lineno}: damaged JSON ({e.msg}, column {e.colno}); "
            "delete it to rebuild what it records"
        ) from None


def read_jsonl(path: str | os.PathLike) -> list:
    """The records of a JSON-lines file (blank lines skipped); a damaged line raises
    :class:`DamagedFileError` naming the file and line."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DamagedFileError(
                            f"{path}:{n}: damaged JSON line ({e.msg}, column {e.colno})"
                        ) from None
        except UnicodeDecodeError as e:
            raise DamagedFileError(f"{path}: not UTF-8 text ({e.reason})") from None
    return out


# ---- temporaries owned by their process ------------------------------------------------------------
# A temporary sibling is named ``.<name>.tmp-<host>-<pid>-<random>``: the process that made it is the
# only one that removes it, unless that process is provably dead (same host, pid gone). Several
# processes (``reproduce --jobs N``, two notebooks, a shared cache) may write next to each other.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP_RE = re.compile(r"\.(?:tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[^/]*$")


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary sibling of ``name`` owned by this process (mkstemp/mkdtemp add the random part)."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_stale_tmp(path: str | os.PathLike) -> bool:
    """True only for a temporary of this naming scheme whose owner is dead on this host. A temporary of
    another host, of a live process, or of this process is never stale."""
    m = _TMP_RE.search(Path(path).name)
    if not m or m["host"] != _HOST:
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_tmp(directory: str | os.PathLike, pattern: str = ".*.tmp-*") -> int:
    """Remove the stale temporaries (see :func:`is_stale_tmp`) matching ``pattern`` in ``directory``."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.glob(pattern):
        if is_stale_tmp(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give (0666 minus the umask): mkstemp's 0600 would make a
    results tree or cache shared by a group unreadable to the others."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def atomic_write_stream(path: str | os.PathLike, chunks: Iterable[bytes | str]) -> Path:
    """Write ``chunks`` (bytes, or str encoded as UTF-8) to a temporary sibling owned by this process,
    fsync, give it the umask-derived mode, rename over ``path``.

    The one atomic writer: the chunks are streamed, never joined in memory (a global TREC run is
    ~10M lines); on any error the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_stream(path, (data,))


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
    directory or nothing. The temporary belongs to this process; temporaries of dead processes are
    removed on the next call, those of live ones (a concurrent writer of the same directory) are left
    alone. When two processes finish the same directory, the last rename wins (both are complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent, f".{path.name}.tmp-*")
    remove_stale_tmp(path.parent, f".{path.name}.old-*")
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), dir=path.parent))
    os.chmod(tmp, dir_mode())
    try:
        yield tmp
        for _attempt in range(10):
            try:
                os.replace(tmp, path)  # replaces nothing or an empty directory
                break
            except (
                OSError
            ) as e:  # a complete directory is there (an earlier run, or a concurrent writer)
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not overwrite:
                    raise FileExistsError(path) from None
                old = Path(
                    tempfile.mkdtemp(
                        prefix=f".{path.name}.old-{_HOST}-{os.getpid()}-", dir=path.parent
                    )
                )
                with contextlib.suppress(
                    FileNotFoundError
                ):  # another writer may have moved it first
                    os.replace(path, old / "d")
                shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(
                f"{path}: could not rename the finished directory into place (concurrent writers)"
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """sha256 of files, remembered by (resolved path, size, mtime_ns): hashing every image of a data build
    on each run would cost minutes at paper scale, so a file is hashed once and looked up by its stat
    afterwards (a file rewritten in place changes its mtime, so it is hashed again). The remembered
    digests live in an SQLite file (``path``; None: in this process only) shared safely by concurrent
    processes. The same trade-off as ``make`` and ``git``: a file changed without changing its size or
    mtime (``touch -d`` back to the old time) would be missed."""

    _memo: dict[tuple[str, int, int], str] = {}  # every instance of this process

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._db = None
        self._pending: list[tuple] = []

    def _conn(self):
        if self._db is None and self.path is not None:
            import sqlite3

            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(self.path, timeout=120)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                    "mtime_ns INTEGER, sha256 TEXT)"
                )
                self._db.commit()
            except sqlite3.DatabaseError as e:
                raise DamagedFileError(
                    f"{self.path}: damaged digest cache ({e}); delete it (it is rebuilt)"
                ) from None
        return self._db

    def __call__(self, f: str | os.PathLike) -> str:
        f = Path(f).resolve()
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key in self._memo:
            return self._memo[key]
        db = self._conn()
        if db is not None:
            row = db.execute(
                "SELECT sha256 FROM digests WHERE path=? AND size=? AND mtime_ns=?", key
            ).fetchone()
            if row:
                self._memo[key] = row[0]
                return row[0]
        sha = file_sha256(f)
        self._memo[key] = sha
        self._pending.append((*key, sha))
        return sha

    def flush(self) -> None:
        db = self._conn()
        if db is not None and self._pending:
            db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", self._pending)
            db.commit()
        self._pending = []

    def files_digest(self, files, *, root: str | os.PathLike | None = None) -> str:
        """One digest of the (name, bytes) of ``files``; names relative to ``root`` when given."""
        h = hashlib.sha256()
        for f in sorted({Path(f) for f in files}):
            name = f.relative_to(root) if root is not None else f
            h.update(f"{name}|{self(f)}\n".encode())
        self.flush()
        return h.hexdigest()[:16]

    def tree_digest(self, root: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> str:
        """Digest of every file under ``root`` (names and bytes; hidden names, i.e. temporaries and locks,
        and the top-level entries in ``exclude`` are skipped)."""
        root = Path(root)
        files = []
        for d, dirs, names in os.walk(root, followlinks=True):  # image folders are often links
            top = Path(d) == root
            dirs[:] = [x for x in dirs if not x.startswith(".") and not (top and x in exclude)]
            files += [
                Path(d) / n for n in names if not n.startswith(".") and not (top and n in exclude)
            ]
        return self.files_digest(files, root=root)


def config_hash(obj) -> str:
    """Stable short hash of a JSON-serialisable object (dataclasses go through ``dataclasses.asdict``)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def env_true(name: str) -> bool:
    """An environment flag as launchers write it (``true``/``1``/``yes``, any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def accelerate_cpu() -> bool:
    """Whether accelerate must be told ``cpu=True``: without a GPU it joins the CPU process group
    (gloo) of a launch only when told so (``ACCELERATE_USE_CPU``, which ``accelerate launch`` sets only
    for CPU configs: an FSDP launch on a machine without GPUs does not)."""
    import torch

    return env_true("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, *, every_rank: bool = False) -> Iterator[None]:
    """Exclusive inter-process lock on ``lock_path`` (``fcntl.flock``): serialises builds of the same
    cached artifact, so a second process waits and then reuses what the first wrote.

    The processes of one launch (``accelerate launch``/``torchrun``: ``WORLD_SIZE`` > 1) build together
    (training, sharded encoding are collectives): only rank 0 takes the lock, the other ranks follow
    it, since a rank waiting here while rank 0 waits for it in a collective would never return.
    ``every_rank``: every process takes the lock, for a build that runs no collective (the micro
    backbone's, whose pre-training runs in a child process), so one rank builds and the others wait."""
    import fcntl

    if (
        not every_rank
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and int(os.environ.get("RANK", "0")) != 0
    ):
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` naming ``path`` unless it is a whole ``.safetensors`` file: a
    readable header whose tensors end exactly at the end of the file (cheap: reads the header only)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes, its header needs {8 + n + end}")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DamagedFileError(
            f"{path}: damaged safetensors file ({e}); was it cut short?"
        ) from None


def checkpoint_digest(path: str | os.PathLike, *, full_limit: int = 1 << 28) -> str:
    """Identity of a checkpoint directory's weights: sha256 of each ``*.safetensors``/``*.bin`` file up
    to ``full_limit`` bytes (micro backbones: exact), else its name, size and first/last MiB (7B
    shards: cheap). Results depend on the weights, not on the recipe that produced them: a rebuilt
    backbone that came out different (pre-training is not bitwise repeatable across machines) must
    not reuse runs of the old one."""
    h = hashlib.sha256()
    files = sorted(
        p for p in Path(path).rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files")
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
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
