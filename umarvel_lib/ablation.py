"""Ablation tables: the YAML rows of ``ablations/`` and a reader's own rows (notebook ``extra_rows``).

An :class:`Ablation` is one paper table: a base of dotted overrides, its rows (each a set of overrides
on top, with the paper's key), its findings and diagnostic checks; :meth:`Ablation.run_config` turns a
row into a :class:`~umarvel_lib.config.RunConfig` through :func:`umarvel_lib.presets.make_run_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import RunConfig
from .presets import make_run_config, validate_overrides


@dataclass
class AblationRow:
    id: str
    label: str
    overrides: dict
    paper_key: str | int | None = None
    reranker: bool = False  # evaluate the fused reranker teacher instead of the embedder (Table 6)
    explain: bool = (
        False  # a diagnostic row (no paper value), e.g. Table 1's full-fine-tuning check of T1b
    )
    own: bool = (
        False  # a reader's own row (notebook parameter ``extra_rows``), shown beside the paper's
    )


@dataclass
class Ablation:
    name: str
    table: int
    title: str
    base: dict
    rows: list[AblationRow]
    findings: list[str]
    pools: tuple[str, ...] = ("local", "global")
    # named paired comparisons beyond the paper's findings (diagnostic rows): {name: (row A, row B)}
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    checks_title: str = ""

    def row(self, rid: str) -> AblationRow:
        for r in self.rows:
            if r.id == str(rid):
                return r
        raise KeyError(f"{self.name}: no row {rid!r}")

    @property
    def baseline(self) -> AblationRow:
        """The row every other row is compared with in the table's figure: the first row of the YAML."""
        return self.rows[0]

    def with_extra_rows(self, text) -> Ablation:
        """This table plus a reader's own rows (YAML/JSON text, see :func:`parse_extra_rows`)."""
        return dataclasses.replace(self, rows=self.rows + parse_extra_rows(text, self))

    def run_config(self, row: AblationRow | str, preset: str, seed: int, **kw) -> RunConfig:
        row = self.row(row) if isinstance(row, str) else row
        over = {**self.base, **row.overrides, "seed": seed, "eval.pools": list(self.pools)}
        return make_run_config(preset, over, **kw)


def ablations_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "ablations"
    return here


def load_ablation(path_or_name) -> Ablation:
    p = Path(path_or_name)
    if not p.suffix:
        matches = sorted(ablations_dir().glob(f"{path_or_name}*.yaml"))
        if len(matches) != 1:
            raise FileNotFoundError(f"no unique ablation {path_or_name!r} in {ablations_dir()}")
        p = matches[0]
    with open(p, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: malformed YAML: {e}") from None
    for k in ("table", "title", "rows"):
        if k not in d:
            raise ValueError(f"{p}: missing key {k!r}")
    rows = [
        AblationRow(
            id=str(r["id"]),
            label=r.get("label", str(r["id"])),
            overrides=r.get("overrides") or {},
            paper_key=r.get("paper", r["id"]),
            reranker=bool(r.get("reranker", False)),
            explain=bool(r.get("explain", False)),
        )
        for r in d["rows"]
    ]
    return Ablation(
        name=p.stem,
        table=int(d["table"]),
        title=d["title"],
        base=d.get("base") or {},
        rows=rows,
        findings=list(d.get("findings") or []),
        pools=tuple(d.get("pools", ("local", "global"))),
        checks={
            str(k): (str(v[0]), str(v[1]))
            for k, v in (d.get("checks") or {}).get("pairs", {}).items()
        },
        checks_title=(d.get("checks") or {}).get("title", ""),
    )


EXTRA_ROW_KEYS = ("label", "overrides")


def parse_extra_rows(text, ablation: Ablation | None = None) -> list[AblationRow]:
    """A reader's own rows from YAML/JSON text (or an already parsed mapping)::

        {"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02}}}

    Each row id must be new to the table (and usable as a directory name); each row has only
    ``label`` and ``overrides``; the overrides are checked by :func:`validate_overrides` on top of the
    table's base. Every error is a ``ValueError`` that starts with ``extra_rows`` and names the row
    and the key."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if isinstance(text, str):
        try:
            d = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise ValueError(f"extra_rows: not YAML/JSON: {e}") from None
    else:
        d = text
    if not isinstance(d, dict):
        raise ValueError(
            "extra_rows must map row ids to {label, overrides}, e.g. "
            '\'{"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02}}}\''
        )
    taken = {r.id for r in ablation.rows} if ablation is not None else set()
    out = []
    for rid, spec in d.items():
        rid = str(rid)
        where = f"extra_rows: row {rid!r}"
        if rid in taken:
            raise ValueError(f"{where}: the table already has a row {rid!r}; choose a new id")
        if not rid.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"{where}: a row id may hold letters, digits, '_', '-' and '.' only")
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping with keys {', '.join(EXTRA_ROW_KEYS)}")
        unknown = [k for k in spec if k not in EXTRA_ROW_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(EXTRA_ROW_KEYS)}"
            )
        label = spec.get("label", rid)
        if not isinstance(label, str):
            raise ValueError(f"{where}: key 'label' takes str, not {type(label).__name__}")
        over = spec.get("overrides") or {}
        try:
            validate_overrides(over, base=ablation.base if ablation is not None else None)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append(AblationRow(id=rid, label=label, overrides=dict(over), paper_key=None, own=True))
        taken.add(rid)
    return out
