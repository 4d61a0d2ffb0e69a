"""Batch reproduction: every notebook through papermill, executed copies under ``results/<preset>/notebooks``.

One failed notebook is recorded and the batch goes on; finished (row, seed) runs are skipped by the
notebooks themselves (config-hash sidecars), so a rerun only does what is missing. ``08_report``
always runs last and writes ``REPORT.md``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write_json

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# (notebook, paper table it reproduces or None)
NOTEBOOKS = (
    ("00_quickstart", None), ("01_embedding_extraction", 1), ("02_instruction_masking", 2),
    ("03_progressive_transition", 3), ("04_batch_lr_temperature", 4), ("05_hard_negatives", 5),
    ("06_distillation", 6), ("07_main_results", 7), ("08_report", None),
)
KERNEL = "umarvel-kit"


def kernel_name() -> str:
    """The kit's registered kernel when present (``make setup`` registers it), else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"
    except Exception:  # noqa: BLE001
        return "python3"


def select(tables=None) -> list[tuple[str, int | None]]:
    if not tables:
        return list(NOTEBOOKS)
    want = {int(t) for t in tables}
    return [(n, t) for n, t in NOTEBOOKS if t in want or n == "08_report"]


def reproduce(preset: str = "cpu", *, tables=None, seeds: str | None = None, results: str | None = None,
              backbone: str | None = None, data_root: str | None = None, timeout: int | None = None,
              notebook_dir: Path = NOTEBOOK_DIR) -> dict:
    import papermill as pm
    from tqdm.auto import tqdm

    res = Path(results or Path("results") / preset).resolve()
    out_dir = res / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    status_file = res / "batch.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    params = {"preset": preset, "results_dir": str(res)}
    if seeds is not None:
        params["seeds"] = seeds
    if backbone:
        params["backbone"] = backbone
    if data_root:
        params["data_root"] = data_root
    chosen = select(tables)
    kname = kernel_name()
    bar = tqdm(chosen, desc=f"reproduce ({preset})", unit="notebook")
    for name, _table in bar:
        bar.set_postfix_str(name)
        src = notebook_dir / f"{name}.ipynb"
        dst = out_dir / f"{name}.ipynb"
        tmp = out_dir / f".{name}.running.ipynb"
        t0 = time.time()
        try:
            pm.execute_notebook(str(src), str(tmp), parameters=params, kernel_name=kname, progress_bar=False,
                                execution_timeout=timeout, cwd=str(Path.cwd()))
            tmp.replace(dst)
            status[name] = {"status": "ok", "wall_s": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001  (one failed notebook does not sink the batch)
            if tmp.is_file():
                tmp.replace(out_dir / f"{name}.FAILED.ipynb")
            status[name] = {"status": "failed", "wall_s": round(time.time() - t0, 1),
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
            print(f"notebook {name} FAILED ({status[name]['error']}); continuing")
        status[name]["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(status_file, status)
    failed = [n for n, _ in chosen if status.get(n, {}).get("status") != "ok"]
    print(f"reproduce {preset}: {len(chosen) - len(failed)}/{len(chosen)} notebooks ok"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; report: {res / 'REPORT.md'}")
    return status
