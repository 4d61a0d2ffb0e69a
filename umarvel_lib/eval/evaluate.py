"""The M-BEIR evaluation driver: encode -> search -> score, with cached artifacts.

:func:`evaluate` runs the 16-row protocol (docs/mbeir.md "Evaluation protocol") for any encoder that satisfies
:class:`Encoder`, against the local pools and/or the global pool, and writes one self-contained
run directory per pool (``<out>/local/``, ``<out>/global/``; files in :mod:`.runs`).

- **Queries**: each row's queries, with an instruction sampled per query from the instruction TSV
  (seeded: the row's seed is derived from ``instruction_seed`` and the row name, so it does not
  depend on which other rows are evaluated); the instruction used is written to ``queries.jsonl``.
  Queries with no positive in the qrels are not encoded, are excluded from every number, and are
  counted as ``n_skipped_no_positive``.
- **Pools**: local = the row's own pool file; global = ``data.global_pool(dedup=...)`` (the union of
  the local test pools, deduplicated by did by default; ``dedup=False`` is the official
  concatenation, where a duplicated did can fill two top-k slots). The global pool is never
  encoded twice: it is a view over the local pools' cached shards (plus any candidate that only
  the global pool file has).
- **Search**: exact, streamed from the shard cache (:mod:`.search`); ties: higher score, then lower
  candidate index in the pool's order.
- **Processes**: under ``accelerate launch`` (``PartialState``), every process encodes a share of
  the shards and searches a share of each pool; partial top-k lists are merged exactly on the main
  process, which alone writes the run directories.

Item, instruction and candidate semantics are those of :mod:`umarvel_lib.data.items`.

Size: over 400 lines because the driver's steps (queries, pools, encode jobs, distributed search and
gather, run-dir writing) share private state types (``_RowQueries``, ``_Pool``) used nowhere else;
the reusable parts already live in :mod:`.cache`, :mod:`.search`, :mod:`.runs` and :mod:`.rerank`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import EvalConfig
from ..data.items import Item, candidate_item, query_items
from ..data.mbeir import MBEIR, Row
from ..data.mbeir_records import Candidate
from ..data.mbeir_rows import ROW_NAMES
from ..io import DigestCache, atomic_dir, atomic_write_json, file_sha256
from ..provenance import git_commit, versions
from . import runs
from .cache import EmbeddingCache, EncodeJob, ShardStore
from .metrics import METRIC_NAME, score_rows
from .search import TIE_BREAK, MappedSource, SearchError, TopK, merge_topk, search, split_parts

log = logging.getLogger(__name__)

POOLS = ("local", "global")
PAPER_TABLE = {"local": "iclr_table07_mbeir_local_pool", "global": "iclr_table08_mbeir_global_pool"}


class Encoder(Protocol):
    """What :func:`evaluate` needs from an embedder."""

    def encode(self, items: list[Item], batch_size: int) -> np.ndarray:
        """(len(items), dim) float32, L2-normalised rows."""

    def fingerprint(self) -> str:
        """Identifies checkpoint + embedder config; part of every cache key."""


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (unknown pool, qrels naming candidates outside the pool...)."""


# ---- a deterministic stand-in encoder -------------------------------------------------------------


class HashingEncoder:
    """Bag-of-words hashing encoder for tests and smoke runs (not a model).

    Each lower-cased word gets a fixed random unit vector (seeded by its sha256); an item's
    embedding is the normalised sum over the words of its text and of its image *file name*
    (``red_circle_3.png`` -> ``red``, ``circle``), so lexically matching queries and candidates
    score high and recall is far from chance. Instructions are ignored unless
    ``instruction_weight`` > 0.
    """

    def __init__(self, dim: int = 64, *, seed: int = 0, instruction_weight: float = 0.0):
        self.dim, self.seed, self.instruction_weight = dim, seed, instruction_weight
        self._vec: dict[str, np.ndarray] = {}
        self.calls = 0
        self.items_encoded = 0

    def fingerprint(self) -> str:
        return f"hashing-bow-v1:dim={self.dim}:seed={self.seed}:instr={self.instruction_weight}"

    def _word(self, w: str) -> np.ndarray:
        v = self._vec.get(w)
        if v is None:
            h = int.from_bytes(hashlib.sha256(f"{self.seed}:{w}".encode()).digest()[:8], "little")
            v = np.random.default_rng(h).standard_normal(self.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            self._vec[w] = v
        return v

    @staticmethod
    def _words(s: str | None) -> list[str]:
        import re

        return [w for w in re.split(r"[^a-z]+", (s or "").lower()) if w]

    def encode(self, items: list[Item], batch_size: int = 16) -> np.ndarray:
        self.calls += 1
        self.items_encoded += len(items)
        out = np.zeros((len(items), self.dim), np.float32)
        for n, it in enumerate(items):
            words = self._words(it.txt) + (
                self._words(Path(it.image_path).stem) if it.image_path else []
            )
            v = sum((self._word(w) for w in words), np.zeros(self.dim, np.float32))
            if self.instruction_weight and it.instruction:
                v = v + self.instruction_weight * sum(
                    (self._word(w) for w in self._words(it.instruction)),
                    np.zeros(self.dim, np.float32),
                )
            if not np.any(v):
                v = self._word("<empty>")
            out[n] = v / np.linalg.norm(v)
        return out


# ---- process group ---------------------------------------------------------------------------------


class _SingleProcess:
    process_index, num_processes, is_main_process, device = 0, 1, True, "cpu"

    def wait_for_everyone(self):
        pass


def _state(state=None):
    if state is not None:
        return state
    try:
        from accelerate import PartialState
    except ImportError:
        return _SingleProcess()
    from ..io import accelerate_cpu

    return PartialState(cpu=accelerate_cpu())


# ---- helpers ----------------------------------------------------------------------------------------


def _encoder_identity(encoder) -> dict:
    fp = encoder.fingerprint()
    if not isinstance(fp, str) or not fp:
        raise EvaluationError(f"encoder.fingerprint() must return a non-empty str, got {fp!r}")
    cfg = getattr(encoder, "config_hash", None)
    return {"encoder": fp, "embedder_config": cfg() if callable(cfg) else cfg}


def row_seed(instruction_seed: int, row: str) -> int:
    """The instruction-sampling seed of one row, derived from the run's seed and the row name."""
    return int.from_bytes(
        hashlib.sha256(f"{instruction_seed}/{row}".encode()).digest()[:4], "little"
    )


def _digest(records) -> str:
    return hashlib.sha256(
        json.dumps(records, separators=(",", ":"), default=str).encode()
    ).hexdigest()


@dataclass
class _RowQueries:
    row: Row
    qids: list[str]  # run keys, all queries of the row
    mbeir_qids: list[str]
    instructions: list[str | None]
    scored: list[bool]
    items: list[Item]  # scored queries only
    qrels: dict[str, set[str]]  # by run key
    seed: int


def _run_keys(per_row: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """Run-file query ids: the M-BEIR qid, or ``qid@row`` for a qid that two evaluated rows share."""
    seen: dict[str, int] = {}
    for qids in per_row.values():
        for q in set(qids):
            seen[q] = seen.get(q, 0) + 1
    return {
        (r, q): (q if seen[q] == 1 else f"{q}@{r}") for r, qids in per_row.items() for q in qids
    }


def _collect_queries(
    data: MBEIR, rows: list[Row], instructions: bool, instruction_seed: int
) -> list[_RowQueries]:
    raw = {r.name: data.queries(r) for r in rows}
    keys = _run_keys({n: [q.qid for q in qs] for n, qs in raw.items()})
    out = []
    for r in rows:
        qs = raw[r.name]
        qrels = data.qrels(r)  # validated against the row's queries and local pool
        seed = row_seed(instruction_seed, r.name)
        items, instr = query_items(qs, data, instructions=instructions, seed=seed)
        scored = [bool(qrels.get(q.qid)) for q in qs]
        if not any(scored):
            raise EvaluationError(
                f"row {r.name}: none of its {len(qs)} queries has a positive in "
                f"{r.qrels_file}; nothing to evaluate"
            )
        rk = [keys[(r.name, q.qid)] for q in qs]
        out.append(
            _RowQueries(
                r,
                rk,
                [q.qid for q in qs],
                instr,
                scored,
                [it for it, s in zip(items, scored) if s],
                {k: set(qrels[q.qid]) for k, q, s in zip(rk, qs, scored) if s},
                seed,
            )
        )
    return out


class _Pool:
    """A pool to search: its dids (in index order) and how to build its candidate source."""

    def __init__(self, name: str, dids: list[str], members: list[tuple[int, np.ndarray]]):
        self.name, self.dids, self.members = name, dids, members  # members: (store id, gmap)

    def source(self, stores: list[ShardStore]):
        if len(self.members) == 1 and np.array_equal(self.members[0][1], np.arange(len(self.dids))):
            return stores[self.members[0][0]]
        return MappedSource([(stores[m], g) for m, g in self.members], len(self.dids))


def _positives_outside(rq: _RowQueries, dids: set[str], pool: str, where: str) -> int:
    """Scored (query, positive) pairs whose candidate is not in the pool. Not an error (UniIR: OVEN /
    INFOSEEK positives may sit in the other dataset's pool); such a positive cannot be retrieved, so
    it can only lower recall. Counted in ``metrics.json`` and logged."""
    n = sum(len(pos - dids) for pos in rq.qrels.values())
    if n:
        log.warning(
            "%s pool: %d qrels positive(s) of %s (%s) are not in %s and cannot be retrieved",
            pool,
            n,
            rq.row.name,
            rq.row.qrels_file,
            where,
        )
    return n


def _barrier(state):
    state.wait_for_everyone()


def _shared_paths(state, out_dir, cache_dir) -> tuple[Path, Path | None]:
    """The main process's ``out_dir``/``cache_dir`` on every process (callers may pass a per-process
    temporary directory; shards and partial results must meet in one place)."""
    paths = [str(out_dir), None if cache_dir is None else str(cache_dir)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(paths, from_process=0)
    return Path(paths[0]), (None if paths[1] is None else Path(paths[1]))


# ---- the driver -------------------------------------------------------------------------------------


def evaluate(
    encoder,
    data: MBEIR,
    out_dir,
    cfg: EvalConfig | None = None,
    *,
    cache_dir=None,
    shared_dir=None,
    reranker=None,
    fusion_weights: Mapping[str, float] | None = None,
    fusion_default: float = 1.0,
    progress: bool = False,
    state=None,
) -> dict:
    """Evaluate ``encoder`` on M-BEIR as ``cfg`` says; write ``<out_dir>/{local,global}/``, return their metrics.

    ``cfg`` (:class:`~umarvel_lib.config.EvalConfig`, defaults when omitted): pools, rows (names like
    ``mscoco_task0`` whose queries are evaluated, default all present; the global pool is always the
    union of *all* local pools present), instructions (None: the encoder's ``cfg.instructions``),
    search backend (``"torch"`` on the process's device, or ``"faiss"``), depth (results kept per
    query in ``run.trec``), ks, bootstrap, cache layout (``cache_dtype="float16"`` halves the disk
    of a 5.6M x 3584 global pool, ~40 GB instead of ~80 GB) and ``dedup_global``.

    Run-time arguments (not results): ``cache_dir``, where embedding shards are kept between runs
    (resume, reuse); ``None`` uses ``<out_dir>/.tmp_embedding_cache``, deleted after a successful
    run (kept after a failure, so rerunning with the same ``out_dir`` resumes). ``shared_dir``: when
    given, each pool directory references one shared copy of ``qrels.txt``/``queries.jsonl`` there
    (:func:`.runs.share_inputs`) instead of holding its own. ``reranker`` (a checkpoint directory or
    a :class:`~umarvel_lib.models.reranker.Reranker`): re-sort each query's top ``cfg.rerank_top_k``
    by the fused score (:mod:`.rerank`, weights ``fusion_weights``/``fusion_default``). ``state``:
    an ``accelerate.PartialState`` (created if omitted; launch several processes with ``accelerate
    launch`` on GPUs, or ``torchrun --nproc_per_node N`` on CPU). Returns ``{"local": metrics,
    "global": metrics, "out_dir": ...}`` on every process. Queries without positives: see the
    module doc.
    """
    t_start = time.perf_counter()
    cfg = cfg if cfg is not None else EvalConfig()
    cfg = dataclasses.replace(
        cfg, pools=tuple(cfg.pools), ks=tuple(sorted(set(int(k) for k in cfg.ks)))
    )
    ecfg = getattr(encoder, "cfg", None)
    instructions = (
        cfg.instructions
        if cfg.instructions is not None
        else bool(getattr(ecfg, "instructions", True))
    )
    pools, rows, depth = cfg.pools, cfg.rows, cfg.depth
    bad = [p for p in pools if p not in POOLS]
    if bad or not pools:
        raise EvaluationError(f"pools must be a non-empty subset of {POOLS}, got {pools}")
    if depth < max(cfg.ks):
        raise EvaluationError(f"depth {depth} < largest k {max(cfg.ks)}")
    state = _state(state)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    out_dir, cache_dir = _shared_paths(state, out_dir, cache_dir)
    ident = _encoder_identity(encoder)
    # the embeddings depend on the image bytes too, not only on the records naming them
    digests = DigestCache(
        Path(cache_dir) / "file_digests.sqlite" if cache_dir is not None else None
    )

    # ---- what to encode ----------------------------------------------------------------------
    eval_rows = data.rows(only=rows)
    if not eval_rows:
        raise EvaluationError(f"no evaluation rows found under {data.root / 'query' / data.split}")
    rqs = _collect_queries(data, eval_rows, instructions, cfg.instruction_seed)
    pool_rows = (
        data.rows() if "global" in pools else list(eval_rows)
    )  # data.rows() includes eval_rows
    local_lists = {r.name: data.local_pool(r) for r in pool_rows}

    jobs: list[EncodeJob] = []
    store_of_row: dict[str, int] = {}
    pool_files = {}
    for r in pool_rows:
        sha = file_sha256(r.pool_file)
        pool_files[r.name] = {
            "file": str(r.pool_file),
            "sha256": sha,
            "n": len(local_lists[r.name]),
        }
        cands = local_lists[r.name]
        store_of_row[r.name] = len(jobs)
        jobs.append(
            EncodeJob(
                {
                    "kind": "pool",
                    **ident,
                    "source": f"file:sha256:{sha}",
                    "n": len(cands),
                    "images": _images_digest(digests, [candidate_item(c, data) for c in cands]),
                },
                len(cands),
                _cand_fetcher(cands, data),
                name=f"pool:{r.name}",
            )
        )
    qjob_of_row: dict[str, int] = {}
    for rq in rqs:
        recs = [
            [k, rq.mbeir_qids[i], rq.instructions[i]] for i, k in enumerate(rq.qids) if rq.scored[i]
        ]
        qsrc = [file_sha256(rq.row.query_file), recs]
        qjob_of_row[rq.row.name] = len(jobs)
        jobs.append(
            EncodeJob(
                {
                    "kind": "queries",
                    **ident,
                    "source": f"queries:sha256:{_digest(qsrc)}",
                    "n": len(rq.items),
                    "images": _images_digest(digests, rq.items),
                },
                len(rq.items),
                rq.items,
                name=f"queries:{rq.row.name}",
            )
        )

    # ---- pools --------------------------------------------------------------------------------
    pool_defs: dict[str, list[tuple[list[_RowQueries], _Pool]]] = {}
    outside: dict[str, dict[str, int]] = {}
    if "local" in pools:
        pool_defs["local"] = []
        for rq in rqs:
            dids = [c.did for c in local_lists[rq.row.name]]
            outside.setdefault("local", {})[rq.row.name] = _positives_outside(
                rq, set(dids), "local", rq.row.pool_file
            )
            pool_defs["local"].append(
                (
                    [rq],
                    _Pool(rq.row.name, dids, [(store_of_row[rq.row.name], np.arange(len(dids)))]),
                )
            )
    global_info = {}
    if "global" in pools:
        gpool, extra_job, global_info = _global_pool(
            data,
            pool_rows,
            local_lists,
            store_of_row,
            cfg.dedup_global,
            ident,
            extra_store_id=len(jobs),
            digests=digests,
        )
        if extra_job is not None:
            jobs.append(extra_job)
        gdids = set(gpool.dids)
        for rq in rqs:
            outside.setdefault("global", {})[rq.row.name] = _positives_outside(
                rq, gdids, "global", global_info["source"]
            )
        pool_defs["global"] = [(rqs, gpool)]

    # ---- encode (every process, its share of shards) -----------------------------------------
    tmp_cache = cache_dir is None
    cache_root = Path(cache_dir) if cache_dir is not None else out_dir / ".tmp_embedding_cache"
    cache = EmbeddingCache(cache_root, shard_size=cfg.shard_size, dtype=cfg.cache_dtype)
    if main:
        cache.cleanup_tmp()
    _barrier(state)
    t0 = time.perf_counter()
    stores = cache.encode(
        jobs, encoder, batch_size=cfg.batch_size, rank=rank, world_size=world, progress=progress
    )
    _barrier(state)
    for s in stores:
        s.verify()
    dims = {s.dim for s in stores if s.n}
    if len(dims) > 1:
        raise SearchError(
            f"embedding dimension mismatch across cache entries: {sorted(dims)} "
            f"(queries and candidates must come from the same encoder)"
        )
    t_encode = time.perf_counter() - t0

    # ---- search + write -----------------------------------------------------------------------
    scratch = out_dir / ".tmp_search_parts"
    results = {}
    for pool_name, tasks in pool_defs.items():
        t0 = time.perf_counter()
        topks = []
        for t_i, (rq_list, pool) in enumerate(tasks):
            q = np.concatenate([stores[qjob_of_row[rq.row.name]].load() for rq in rq_list])
            src = pool.source(stores)
            part = search(
                q,
                src,
                depth,
                backend=cfg.backend,
                parts=split_parts(src.num_parts, rank, world),
                block_size=cfg.block_size,
                query_chunk=cfg.query_chunk,
                device=getattr(state, "device", None) if cfg.backend == "torch" else None,
            )
            topks.append(_gather(part, state, scratch / f"{pool_name}_{t_i}", depth))
        t_search = time.perf_counter() - t0
        if main:
            record = _config(
                pool_name,
                cfg,
                instructions,
                data,
                encoder,
                ident,
                eval_rows,
                rqs,
                cache_root if not tmp_cache else None,
                world,
                pool_files,
                global_info,
                {"encode_s": round(t_encode, 3), "search_s": round(t_search, 3)},
                sum(len(p.dids) for _, p in tasks) if pool_name == "global" else None,
            )
            results[pool_name] = _write_run_dir(
                out_dir / pool_name,
                pool_name,
                tasks,
                topks,
                record,
                cfg,
                data.split,
                shared_dir,
                outside[pool_name],
            )
    _barrier(state)  # every process is done with the scratch parts and the cache
    if main:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp_cache:
            shutil.rmtree(cache_root, ignore_errors=True)
        if reranker is not None:
            from .rerank import rerank_pools

            results.update(
                rerank_pools(
                    out_dir,
                    reranker,
                    data,
                    top_k=cfg.rerank_top_k,
                    weights=fusion_weights,
                    default_weight=fusion_default,
                    progress=progress,
                )
            )
        for pool_name in pools:  # every pool's per-query hits, kept (committed) beside run.trec
            runs.headline_hits(out_dir / pool_name)
    if (
        world > 1
    ):  # hand the metrics over in memory: out_dir may be the main process's temporary dir
        from accelerate.utils import broadcast_object_list

        box = [results if main else None]
        broadcast_object_list(box, from_process=0)
        results = box[0]
    log.info("evaluation done in %.1fs", time.perf_counter() - t_start)
    return {**results, "out_dir": str(out_dir)}


def _cand_fetcher(cands: list[Candidate], data: MBEIR):
    return lambda lo, hi: [candidate_item(c, data) for c in cands[lo:hi]]


def _images_digest(digests: DigestCache, items) -> str | None:
    """Digest of the bytes of the image files that ``items`` read (None when they read none)."""
    files = [it.image_path for it in items if it.image_path]
    return digests.files_digest(files) if files else None


def _global_pool(
    data: MBEIR,
    pool_rows: list[Row],
    local_lists,
    store_of_row,
    dedup: bool,
    ident,
    *,
    extra_store_id: int,
    digests: DigestCache,
):
    """The global pool as a view over the local pools' stores (+ an extra job for leftovers)."""
    gl = data.global_pool(dedup=dedup)
    if not gl:
        raise EvaluationError(
            f"global pool is empty (no local pools under {data.root / 'cand_pool' / 'local'})"
        )
    source = (
        str(data.global_pool_file())
        if dedup and data.global_pool_file().is_file()
        else f"concatenation of {len(pool_rows)} local pools"
        + (", deduplicated by did" if dedup else "")
    )
    dids = [c.did for c in gl]
    members: list[tuple[int, np.ndarray]] = []
    extra_job = None
    if not dedup:
        # The official concatenation: positions map one to one onto the local pools, in order.
        off = 0
        for r in data.rows():
            cands = local_lists[r.name]
            if [c.did for c in cands] != dids[off : off + len(cands)]:
                raise EvaluationError(
                    "global pool (dedup=False) is not the concatenation of the local pools"
                )
            members.append((store_of_row[r.name], np.arange(off, off + len(cands))))
            off += len(cands)
        if off != len(dids):
            raise EvaluationError(
                "global pool (dedup=False) is not the concatenation of the local pools"
            )
        return (
            _Pool("global", dids, members),
            None,
            {"source": source, "dedup": False, "n": len(dids), "n_unique_dids": len(set(dids))},
        )
    gpos = {}
    for i, d in enumerate(dids):
        if d in gpos:
            raise EvaluationError(f"global pool {source}: duplicate did {d!r} with dedup=True")
        gpos[d] = i
    taken = np.zeros(len(dids), bool)
    for r in pool_rows:
        cands = local_lists[r.name]
        g = np.full(len(cands), -1, np.int64)
        for i, c in enumerate(cands):
            j = gpos.get(c.did)
            if j is not None and not taken[j] and gl[j] == c:
                g[i] = j
                taken[j] = True
        members.append((store_of_row[r.name], g))
    left = np.flatnonzero(~taken)
    if left.size:
        extra = [gl[j] for j in left]
        recs = [[c.did, c.txt, c.img_path, c.modality] for c in extra]
        extra_job = EncodeJob(
            {
                "kind": "pool",
                **ident,
                "source": f"global-extra:sha256:{_digest(recs)}",
                "n": len(extra),
                "images": _images_digest(digests, [candidate_item(c, data) for c in extra]),
            },
            len(extra),
            _cand_fetcher(extra, data),
            name="pool:global-extra",
        )
        members.append((extra_store_id, left.astype(np.int64)))
    return (
        _Pool("global", dids, members),
        extra_job,
        {"source": source, "dedup": True, "n": len(dids), "n_not_in_local_pools": int(left.size)},
    )


def _gather(part: TopK, state, scratch: Path, k: int) -> TopK | None:
    """Merge the processes' partial top-k on the main process (files + barrier; exact)."""
    if state.num_processes == 1:
        return part
    scratch.mkdir(parents=True, exist_ok=True)
    part.save(scratch / f"rank{state.process_index}.npz")
    _barrier(state)
    if not state.is_main_process:
        return None
    return merge_topk([TopK.load(scratch / f"rank{r}.npz") for r in range(state.num_processes)], k)


def _write_run_dir(
    path: Path,
    pool_name,
    tasks,
    topks,
    record: dict,
    cfg: EvalConfig,
    split: str,
    shared_dir,
    outside: dict[str, int],
) -> dict:
    qrels_all: dict[str, set[str]] = {}
    task_of: dict[str, int] = {}
    row_qids: dict[str, list[str]] = {}
    qrecs = []
    run: dict[str, list[str]] = {}
    line_gens = []
    for (rq_list, pool), tk in zip(tasks, topks):
        keys = [k for rq in rq_list for k, s in zip(rq.qids, rq.scored) if s]
        line_gens.append(
            runs.trec_lines(keys, tk.indices, tk.scores, pool.dids, cfg.run_tag, cfg.depth)
        )
        for key, row_idx in zip(keys, tk.indices):
            run[key] = [pool.dids[i] for i in row_idx if i >= 0]
    for rq in (rq for rq_list, _ in tasks for rq in rq_list):
        row_qids[rq.row.name] = list(rq.qids)
        for key, mq, ins, s in zip(rq.qids, rq.mbeir_qids, rq.instructions, rq.scored):
            qrecs.append(
                {
                    "qid": key,
                    "mbeir_qid": mq,
                    "row": rq.row.name,
                    "task_id": rq.row.task_id,
                    "instruction": ins,
                    "instruction_seed": rq.seed,
                    "scored": s,
                }
            )
            if s:
                qrels_all[key] = rq.qrels[key]
                task_of[key] = rq.row.task_id
    metrics = score_rows(run, qrels_all, row_qids, ks=cfg.ks, n_boot=cfg.n_boot, seed=cfg.boot_seed)
    metrics.update(
        pool=pool_name,
        paper_table=PAPER_TABLE[pool_name],
        split=split,
        instruction_seed=cfg.instruction_seed,
    )
    if any(
        outside.values()
    ):  # only where it happens: metrics.json of complete pools stays as it was
        metrics["positives_outside_pool"] = {r: n for r, n in outside.items() if n}
    with atomic_dir(path) as tmp:
        runs.write_run(tmp / runs.RUN_FILE, itertools.chain.from_iterable(line_gens))
        runs.write_qrels(tmp / runs.QRELS_FILE, qrels_all, task_of)
        runs.write_queries(tmp / runs.QUERIES_FILE, qrecs)
        runs.write_metrics(tmp / runs.METRICS_FILE, metrics)
        atomic_write_json(tmp / runs.CONFIG_FILE, record)
        if shared_dir is not None:
            runs.share_inputs(tmp, shared_dir, final_dir=path)
    return metrics


def _config(
    pool_name,
    cfg: EvalConfig,
    instructions: bool,
    data,
    encoder,
    ident,
    eval_rows,
    rqs,
    cache_dir,
    world,
    pool_files,
    global_info,
    timing,
    n_global,
) -> dict:
    """``config.json`` of one pool directory: the evaluation settings and where every input came from."""
    rec = {
        "pool": pool_name,
        "pools_evaluated": list(cfg.pools),
        "paper_table": PAPER_TABLE[pool_name],
        "metric": METRIC_NAME,
        "data_root": str(data.root),
        "split": data.split,
        "rows": [r.name for r in eval_rows],
        "all_16_rows": [r.name for r in eval_rows] == list(ROW_NAMES),
        **ident,
        "encoder_class": type(encoder).__qualname__,
        "instructions": instructions,
        "instruction_seed": cfg.instruction_seed,
        "row_instruction_seeds": {rq.row.name: rq.seed for rq in rqs},
        "batch_size": cfg.batch_size,
        "backend": cfg.backend,
        "depth": cfg.depth,
        "ks": list(cfg.ks),
        "tie_break": TIE_BREAK,
        "bootstrap": {"n": cfg.n_boot, "seed": cfg.boot_seed},
        "cache_dir": str(cache_dir) if cache_dir else None,
        "shard_size": cfg.shard_size,
        "cache_dtype": cfg.cache_dtype,
        "num_processes": world,
        "timing": timing,
        "versions": {**versions(), "git_commit": git_commit()},
        "query_files": {rq.row.name: str(rq.row.query_file) for rq in rqs},
        "qrels_files": {rq.row.name: str(rq.row.qrels_file) for rq in rqs},
    }
    if pool_name == "local":
        rec["pool_files"] = {r.name: pool_files[r.name] for r in eval_rows}
    else:
        rec["global_pool"] = {
            **global_info,
            "dedup": cfg.dedup_global,
            "n_candidates": n_global,
            "local_pool_files": pool_files,
        }
    return rec


__all__ = [
    "Encoder",
    "HashingEncoder",
    "EvaluationError",
    "evaluate",
    "row_seed",
    "POOLS",
    "PAPER_TABLE",
]
