"""A small, generic training loop over 🤗 accelerate, with exact resume.

(Over 400 lines: one Trainer whose resume guarantees couple the checkpoint format, the data order and
the run identity; splitting them would spread one invariant over several modules.)

``train_loop(model, step_fn, data, cfg, run_dir)`` (or ``Trainer(...).fit()``) runs
``cfg``'s step budget with the U-MARVEL optimisation recipe (docs/recipe.md "Stages"): AdamW with weight decay 0,
cosine schedule with warm-up ratio (transformers' ``get_cosine_schedule_with_warmup``), gradient
clipping at 1.0, optional bf16 autocast. The model-specific part is ``step_fn(batch, ctx)``,
which returns the loss (or a dict with ``"loss"`` and other scalars such as ``"tau"``):

* if the returned loss still has a graph, the engine back-propagates it;
* if it is detached, ``step_fn`` already back-propagated (GradCache does); the engine checks that
  some gradient exists, so a forgotten backward cannot silently train nothing.

Run directory::

    run_dir/config.json            config, identity and their hash
    run_dir/metrics.jsonl          one line per step: step, loss, lr, grad_norm, tau, ...
    run_dir/eval.jsonl             one line per eval callback: step, metrics
    run_dir/checkpoints/step_XXXXXXXX/   model.safetensors (trainable params), optimizer.pt,
                                   scheduler.pt, rng.pt, state.json  (written atomically)
    run_dir/final/model.safetensors
    run_dir/FINISHED.json          final marker: config hash, steps, last loss
    run_dir/FAILED.json            written when a non-finite loss stops the run

Guarantees (tested in ``tests/test_engine.py``):

* **Exact resume**: weights, optimizer, scheduler, torch/numpy/python RNG states, data position
  and step are restored from the newest checkpoint, so a run killed at any point and resumed ends
  with the same weights as an uninterrupted run. Metric lines past the checkpoint are dropped.
* **Non-finite loss** (or gradient norm) raises :class:`NonFiniteLossError` before the optimizer
  step; no checkpoint is written, so the newest checkpoint is the last good state.
* **Several processes** (``accelerate launch``/``torchrun``, CPU or GPU): ``batch_size`` is the
  global batch; each rank takes its contiguous slice, and after ``step_fn`` the trainable
  gradients are averaged over ranks in one all-reduce (no DDP wrapper, so step functions may call
  the model directly, as GradCache closures do). With a loss over gathered embeddings
  (``gather_with_grad``) two CPU processes train like one (``test_two_processes_train_like_one``).
  DeepSpeed launches keep accelerate's wrapped model and are untested here.
* **Sharded** (``Trainer(..., shard="fsdp")``, or by default under ``accelerate launch`` with an
  FSDP config: :func:`shard_mode` decides): torch's FSDP2 ``fully_shard`` on every layer class named
  by the launch (``FSDP_TRANSFORMER_CLS_TO_WRAP``), the accelerate FSDP config given as
  ``fsdp_config`` or the shipped ``configs/accelerate_fsdp_8gpu.yaml``, then on the root, after LoRA
  is attached; never accelerate's ``prepare_model`` wrapping. Scalar parameters (τ) stay replicated.
  FSDP averages the sharded gradients, the engine the replicated ones. Checkpoints and the final
  weights gather the full trainable state (and optimizer state) to rank 0; :meth:`Trainer.trained_model`
  rebuilds a plain model from them; resuming a sharded run is refused. ``FINISHED.json`` records how
  the run was sharded (``shard``). Two CPU processes (gloo) train the tiny released-format Qwen2-VL
  and Qwen3-VL like one process (``tests/test_fsdp.py``), and ``accelerate launch`` of ``umarvel run``
  with the shipped config like the unsharded run (``tests/test_released_format.py``).
* **A finished run is not re-run**: if ``FINISHED.json`` carries the same config hash, the final
  weights are loaded into the model and the loop returns at once; a different hash is refused.

``optimizer_fn(model, total_steps) -> (optimizer, scheduler)`` replaces the recipe's AdamW and
schedule for a run with its own (the micro backbone's pre-training, :mod:`umarvel_lib.micro.pretrain`).

Budget is in optimizer steps (``max_steps``) or in ``epochs`` of a sized dataset, never in time;
``stop_fn`` (called with every eval record after each periodic eval) may end a run early, e.g. when
its dev curve has plateaued (``FINISHED.json`` then says ``stopped_early``).
Only the trainable parameters (``requires_grad``) are checkpointed: the caller must rebuild the
frozen part identically (same base weights / same seed) before resuming.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from umarvel_lib.identity import IDENTITY_FIELDS, NOT_IDENTITY, identity
from umarvel_lib.io import (
    DamagedFileError,
    accelerate_cpu,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    env_true,
    read_json,
)

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "StepContext",
    "TrainResult",
    "NonFiniteLossError",
    "RunConflictError",
    "Trainer",
    "train_loop",
    "trainable_state_dict",
    "load_trainable_state_dict",
    "latest_checkpoint",
    "shard_fsdp",
    "full_state_dict",
    "fsdp_layer_classes",
]

# What a training run's identity is (checked against the run directory on resume): every field of
# TrainConfig is classified in identity.IDENTITY_FIELDS / identity.NOT_IDENTITY, with the reason for each
# exclusion; an unclassified field makes identity() raise (tests/test_config.py checks every field).
IDENTITY_FIELDS["TrainConfig"] = (
    "lr",
    "max_steps",
    "epochs",
    "batch_size",
    "warmup_ratio",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "max_grad_norm",
    "seed",
    "shuffle",
    "drop_last",
    "mixed_precision",
)
NOT_IDENTITY["TrainConfig"] = {
    "grad_cache_chunk": "GradCache chunk: memory only; the gradients equal the full batch's up to float rounding",
    "save_every": "when checkpoints are written, not what is trained",
    "keep_checkpoints": "how many checkpoints are kept",
    "eval_every": "when the curve is evaluated; a plateau stop's dev settings are in the stage's identity",
    "eval_at_start": "an extra evaluation before the first step",
    "log_every": "progress-bar refresh",
    "tqdm_mininterval": "progress-bar refresh",
    "progress": "whether bars are shown",
}


@dataclass
class TrainConfig:
    """Optimisation settings of one training run (defaults follow the official recipe, docs/recipe.md "Stages")."""

    lr: float = 1e-4
    max_steps: int | None = None  # budget in optimizer steps (wins over epochs)
    epochs: float | None = None  # or in epochs of a sized dataset
    batch_size: int = 8  # items per step (per process)
    grad_cache_chunk: int | None = None  # for step_fn (GradCache chunk size); None = plain backward
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 42
    shuffle: bool = True
    drop_last: bool = True  # in-batch negatives want full batches
    mixed_precision: Literal["no", "bf16"] = "no"
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 1  # newest N step checkpoints kept
    eval_every: int = 0  # 0: no periodic eval
    eval_at_start: bool = False  # eval before the first step (learning-curve origin)
    log_every: int = 1  # progress-bar refresh (metrics.jsonl gets every step)
    tqdm_mininterval: float = 1.0
    progress: bool = True

    def __post_init__(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("TrainConfig needs max_steps or epochs")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"mixed_precision must be 'no' or 'bf16' (fp16 needs loss scaling, which GradCache "
                f"surrogates do not get), got {self.mixed_precision!r}"
            )
        self.adam_betas = tuple(self.adam_betas)

    def identity(self) -> dict:
        return identity(self)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before the optimizer step."""


class RunConflictError(RuntimeError):
    """The run directory holds a run with a different configuration."""


@dataclass
class StepContext:
    """What ``step_fn(batch, ctx)`` gets besides the batch."""

    model: (
        nn.Module
    )  # on accelerate's device; not DDP-wrapped (gradients are averaged by the engine)
    accelerator: Any
    cfg: TrainConfig
    step: int  # optimizer steps done before this one
    epoch: int
    autocast: Callable[[], contextlib.AbstractContextManager]

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self):
        return self.accelerator.no_sync(self.model)


def shard_mode(shard: str | None = None) -> Literal["fsdp"] | None:
    """How training is sharded, decided here only: ``shard`` when given (``"fsdp"``, or ``"none"`` for
    plain replicated training), else ``"fsdp"`` when ``accelerate launch`` started this process with an
    FSDP config (it sets ``ACCELERATE_USE_FSDP=true``) in a group of several processes (``WORLD_SIZE``).
    The engine then shards with torch's FSDP2 itself and never lets accelerate wrap the model (its
    ``prepare_model`` wrapping would hide the model the step functions call; on CPU accelerate ignores
    FSDP altogether). Settings of the launch config the engine cannot honour are refused or logged."""
    if shard not in (None, "fsdp", "none"):
        raise ValueError(f"shard must be None, 'fsdp' or 'none', got {shard!r}")
    if shard is not None:
        return None if shard == "none" else "fsdp"
    if not env_true("ACCELERATE_USE_FSDP") or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            f"accelerate FSDP config: fsdp_auto_wrap_policy {policy} is not supported; the kit wraps the "
            f"layer classes of fsdp_transformer_layer_cls_to_wrap (TRANSFORMER_BASED_WRAP)"
        )
    if env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError(
            "accelerate FSDP config: fsdp_cpu_ram_efficient_loading: true makes transformers load empty "
            "(meta) weights on every rank but 0, which the kit's FSDP2 path does not fill in; set it to "
            "false (as umarvel_lib/configs/accelerate_fsdp_8gpu.yaml does)"
        )
    ignored = [n for n in ("FSDP_ACTIVATION_CHECKPOINTING", "FSDP_OFFLOAD_PARAMS") if env_true(n)]
    if ignored:
        log.warning("accelerate FSDP config: %s not applied by the kit's FSDP2 path", ignored)
    return "fsdp"


def fsdp_layer_classes(config: str | Path | None = None) -> list[str]:
    """The layer classes an accelerate FSDP config wraps (``fsdp_transformer_layer_cls_to_wrap``):
    from ``config``; else, under ``accelerate launch`` with an FSDP config, from the launch
    (``FSDP_TRANSFORMER_CLS_TO_WRAP``); else the shipped ``configs/accelerate_fsdp_8gpu.yaml``
    (Qwen2-VL's classes)."""
    import yaml

    launched = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if config is None and launched and env_true("ACCELERATE_USE_FSDP"):
        return [n.strip() for n in launched.split(",") if n.strip()]
    shipped = Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp_8gpu.yaml"
    path = Path(config or shipped)
    names = yaml.safe_load(path.read_text(encoding="utf-8"))["fsdp_config"]
    return [n.strip() for n in names["fsdp_transformer_layer_cls_to_wrap"].split(",") if n.strip()]


def shard_fsdp(model: nn.Module, layer_classes: Sequence[str] | None = None) -> nn.Module:
    """FSDP2 ``fully_shard`` on every module whose class is in ``layer_classes`` (default:
    :func:`fsdp_layer_classes`), then on the root; needs an initialised process group. Scalar
    parameters (the embedder's learnable temperature, which the loss reads outside the model's
    forward) stay plain and replicated: FSDP2 shards along dim 0, which a scalar lacks."""
    from torch.distributed.fsdp import fully_shard

    names = set(layer_classes or fsdp_layer_classes())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    missing = names - {type(m).__name__ for m in layers}
    if missing:  # as accelerate: a class the model lacks is a config for another model
        raise ValueError(
            f"no module of the FSDP layer classes {sorted(missing)} in {type(model).__name__}; "
            f"name this model's classes in fsdp_transformer_layer_cls_to_wrap"
        )
    scalars = {p for p in model.parameters() if p.ndim == 0} or None
    for m in layers:
        fully_shard(m, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    return model


def full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict of an FSDP-sharded model; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if trainable_only:
        want = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in want}
    return sd


def _sync_grads(params: list[torch.Tensor]) -> None:
    """Average ``.grad`` over all ranks (one flattened all-reduce); a missing gradient counts as zero."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    skipped: bool = False  # True when a finished run was found
    resumed_from: int | None = None  # step of the checkpoint resumed from
    final_dir: Path | None = None
    history: list[dict] = field(default_factory=list)  # metric lines of this call


# --------------------------------------------------------------------------------------------
# state helpers
# --------------------------------------------------------------------------------------------
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters with ``requires_grad`` (by name)."""
    return {
        n: p.detach().to("cpu").contiguous().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sd`` into the model's trainable parameters; every trainable name must be present."""
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = want - set(sd), set(sd) - set(params)
    if missing or unexpected:
        raise KeyError(
            f"trainable state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for n, t in sd.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint directories of a run, oldest first."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.glob("step_*") if (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint directory of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return out


def _truncate_jsonl(path: Path, max_step: int) -> None:
    rows = [r for r in _read_jsonl(path) if r.get("step", 0) <= max_step]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class _Batches:
    """Deterministic, resumable batches.

    * a sized dataset (``__len__`` + ``__getitem__``): shuffled per epoch with a generator seeded by
      ``(seed, epoch)``, cut into ``batch_size`` batches, passed through ``collate_fn`` (default:
      the list of items). Resuming jumps straight to the saved batch index.
    * a callable ``data(epoch) -> iterable of ready batches``: must be deterministic in
      ``epoch``; resuming skips the consumed batches.
    """

    def __init__(self, data, cfg: TrainConfig, collate_fn):
        self.data, self.cfg = data, cfg
        self.rank, self.world = 0, 1
        self.collate = collate_fn or (lambda items: items)
        self.sized = (
            hasattr(data, "__len__") and hasattr(data, "__getitem__") and not callable(data)
        )
        if not self.sized and not callable(data):
            raise TypeError(
                "data must be a sized dataset (len + getitem) or a callable epoch -> iterable of batches"
            )

    def shard(self, rank: int, world: int) -> None:
        """Under ``world`` processes, rank ``rank`` takes its contiguous slice of every global batch
        (``batch_size`` stays the global batch, as in the paper's recipe)."""
        if world > 1 and self.sized and self.cfg.batch_size % world:
            raise ValueError(
                f"global batch {self.cfg.batch_size} is not divisible by {world} processes"
            )
        self.rank, self.world = rank, world

    def batches_per_epoch(self) -> int | None:
        if not self.sized:
            return None
        n, b = len(self.data), self.cfg.batch_size
        return n // b if self.cfg.drop_last else math.ceil(n / b)

    def iterate(self, epoch: int, start: int) -> Iterable[Any]:
        if self.sized:
            n, b = len(self.data), self.cfg.batch_size
            if self.cfg.shuffle:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            for i in range(start, self.batches_per_epoch()):
                idx = order[i * b : (i + 1) * b]
                if (
                    self.world > 1
                ):  # contiguous slices: gathered in rank order, the batch of one process
                    per = math.ceil(len(idx) / self.world)
                    idx = idx[self.rank * per : (self.rank + 1) * per]
                yield self.collate([self.data[j] for j in idx])
        else:
            yield from itertools.islice(self.data(epoch), start, None)


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """See the module docstring. ``fit()`` runs (or resumes, or skips) the run."""

    def __init__(
        self,
        model: nn.Module,
        step_fn: Callable[[Any, StepContext], torch.Tensor | Mapping[str, Any]],
        data: Sequence | Callable[[int], Iterable],
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        collate_fn: Callable[[list], Any] | None = None,
        eval_fn: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
        stop_fn: Callable[[list[dict]], bool] | None = None,
        run_identity: Mapping[str, Any] | None = None,
        resume: bool = True,
        accelerator=None,
        shard: Literal["fsdp", "none"] | None = None,
        fsdp_config: str | Path | None = None,
        optimizer_fn: Callable[[nn.Module, int], tuple[Any, Any]] | None = None,
    ):
        self.shard, self.fsdp_config = shard_mode(shard), fsdp_config
        self.model, self.step_fn, self.cfg = model, step_fn, cfg
        # (model, total_steps) -> (optimizer, scheduler) instead of the recipe's AdamW + cosine
        # (cfg's lr/betas/weight_decay/warmup then do not act; the caller puts its own recipe in
        # run_identity). Gradients are checked and clipped over every trainable parameter either way.
        self.optimizer_fn = optimizer_fn
        self.run_dir = Path(run_dir)
        self.batches = _Batches(data, cfg, collate_fn)
        self.eval_fn = eval_fn
        self.stop_fn = (
            stop_fn  # early stop: called with every eval record so far after each periodic eval
        )
        self.identity = {"train": cfg.identity(), "run": dict(run_identity or {})}
        self.hash = config_hash(self.identity)
        self.resume = resume
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=accelerate_cpu())
        self.acc = accelerator
        # a scalar parameter named "...tau" (the embedder's Temperature) is logged as τ automatically
        self._tau = next(
            (
                p
                for n, p in model.named_parameters()
                if (n == "tau" or n.endswith(".tau")) and p.numel() == 1
            ),
            None,
        )

    # -- paths
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.run_dir / "eval.jsonl"

    @property
    def finished_path(self) -> Path:
        return self.run_dir / "FINISHED.json"

    def total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return int(self.cfg.max_steps)
        bpe = self.batches.batches_per_epoch()
        if bpe is None:
            raise ValueError(
                "epochs budget needs a sized dataset; give max_steps for a batch generator"
            )
        if bpe == 0:
            raise ValueError(
                f"dataset of {len(self.batches.data)} items gives no full batch of {self.cfg.batch_size}"
            )
        return math.ceil(self.cfg.epochs * bpe)

    def _autocast(self):
        return torch.autocast(
            device_type=self.acc.device.type,
            dtype=torch.bfloat16,
            enabled=self.cfg.mixed_precision == "bf16",
        )

    # -- checkpoints
    def _save_checkpoint(self, step: int, epoch: int, pos: int) -> Path:
        from safetensors.torch import save_file

        path = self.run_dir / "checkpoints" / f"step_{step:08d}"
        if self.shard:  # collectives: every rank gathers, rank 0 writes
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = full_state_dict(self.model, trainable_only=True)
            optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        elif self.acc.is_main_process:
            model_sd = trainable_state_dict(self.acc.unwrap_model(self.model))
            optim_sd = self.optimizer.state_dict()
        if self.acc.is_main_process:
            with atomic_dir(path) as tmp:
                save_file(model_sd, str(tmp / "model.safetensors"))
                torch.save(optim_sd, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(_rng_state(), tmp / "rng.pt")
                atomic_write_json(
                    tmp / "state.json",
                    {
                        "step": step,
                        "epoch": epoch,
                        "batch_in_epoch": pos,
                        "config_hash": self.hash,
                        "total_steps": self._total,
                        "time": time.time(),
                    },
                )
            old = sorted(p for p in path.parent.glob("step_*") if p != path)
            for p in old[: max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path) -> dict:
        """Restore model, optimizer, scheduler and RNG from ``path``. Every file is read before anything is
        restored, so a damaged checkpoint (:class:`DamagedFileError`, naming the file) changes nothing."""
        from safetensors.torch import load_file

        state = read_json(path / "state.json")
        if state["config_hash"] != self.hash:
            raise RunConflictError(
                f"{path} was written by a run with config hash {state['config_hash']}, this run is "
                f"{self.hash}; use another run_dir or delete it"
            )
        parts = {}
        for name, load in (
            ("model.safetensors", lambda f: load_file(str(f))),
            ("optimizer.pt", lambda f: torch.load(f, weights_only=True)),
            ("scheduler.pt", lambda f: torch.load(f, weights_only=True)),
            ("rng.pt", lambda f: torch.load(f, weights_only=True)),
        ):
            try:
                parts[name] = load(path / name)
            except Exception as e:  # noqa: BLE001  (safetensors, pickle and zip errors name no file)
                raise DamagedFileError(
                    f"{path / name}: damaged checkpoint file ({type(e).__name__}: {e})"
                ) from None
        load_trainable_state_dict(self.acc.unwrap_model(self.model), parts["model.safetensors"])
        self.optimizer.load_state_dict(parts["optimizer.pt"])
        self.scheduler.load_state_dict(parts["scheduler.pt"])
        _set_rng_state(parts["rng.pt"])
        return state

    # -- main
    def fit(self) -> TrainResult:
        from safetensors.torch import load_file, save_file
        from transformers import get_cosine_schedule_with_warmup

        cfg, acc = self.cfg, self.acc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final_dir = self.run_dir / "final"

        # a finished run is not re-run
        fin = None
        if self.finished_path.exists():
            try:
                fin = read_json(self.finished_path)
            except DamagedFileError as e:  # not finished after all: resume from the last checkpoint
                log.warning("%s; the run is resumed", e)
        if fin is not None:
            if fin.get("config_hash") != self.hash:
                raise RunConflictError(
                    f"{self.run_dir} holds a finished run with config hash {fin.get('config_hash')}, "
                    f"this run is {self.hash}; use another run_dir"
                )
            try:
                final_state = load_file(str(final_dir / "model.safetensors"))
            except Exception as e:  # noqa: BLE001
                raise DamagedFileError(
                    f"{final_dir / 'model.safetensors'}: damaged final weights ({e}); delete "
                    f"{self.finished_path} to train again from the last checkpoint"
                ) from None
            load_trainable_state_dict(acc.unwrap_model(self.model), final_state)
            log.info(
                "run %s already finished (step %s, hash %s): skipped",
                self.run_dir,
                fin.get("step"),
                self.hash,
            )
            return TrainResult(
                self.run_dir, int(fin["step"]), fin.get("loss"), skipped=True, final_dir=final_dir
            )

        existing = self.run_dir / "config.json"
        if existing.exists():
            old = read_json(existing).get("config_hash")
            if old != self.hash:
                raise RunConflictError(
                    f"{self.run_dir} holds a run with config hash {old}, this run is {self.hash}; "
                    f"use another run_dir or delete it"
                )
        if acc.is_main_process:
            atomic_write_json(existing, {"config_hash": self.hash, **self.identity})

        self._total = total = self.total_steps()
        from accelerate.utils import set_seed

        set_seed(cfg.seed)

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        # the trainable parameters whose gradients the engine averages over ranks after step_fn
        self._sync: list[torch.Tensor] = []
        self.shard_record = {"mode": self.shard or "none", "processes": acc.num_processes}
        if self.shard:
            if self.eval_fn is not None and (cfg.eval_every or cfg.eval_at_start):
                raise NotImplementedError(
                    f"{self.run_dir}: periodic evaluation of a sharded (shard='fsdp') run is not supported"
                )
            from torch.distributed.tensor import DTensor

            classes = fsdp_layer_classes(self.fsdp_config)
            self.model = shard_fsdp(self.model.to(acc.device), classes)
            params = [p for p in self.model.parameters() if p.requires_grad]  # now DTensors
            # FSDP reduce-scatters (averages) the sharded gradients; the engine the replicated ones
            self._sync = [p for p in params if not isinstance(p, DTensor)]
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.shard_record |= {
                "wrapped": {
                    c: sum(type(m).__name__.removeprefix("FSDP") == c for m in self.model.modules())
                    for c in classes
                },
                "sharded_trainable": sum(isinstance(p, DTensor) for _, p in named),
                "replicated_trainable": [n for n, p in named if not isinstance(p, DTensor)],
            }
        elif acc.num_processes > 1 and acc.distributed_type.value in (
            "MULTI_CPU",
            "MULTI_GPU",
            "FSDP",  # an FSDP launch with shard='none': replicated, as MULTI_GPU
        ):
            # Step functions call the model directly (GradCache closures, the embedder captured by
            # contrastive_step), never through a DDP wrapper, so gradients are averaged over ranks
            # explicitly after step_fn (_sync_grads) instead of by DDP hooks.
            self.model = self.model.to(acc.device)
            self._sync = params
        else:
            self.model = acc.prepare_model(self.model)
        self.batches.shard(acc.process_index, acc.num_processes)
        self._params = params
        if self.optimizer_fn is not None:
            self.optimizer, self.scheduler = self.optimizer_fn(self.model, total)
        else:
            self.optimizer = torch.optim.AdamW(
                params,
                lr=cfg.lr,
                betas=cfg.adam_betas,
                eps=cfg.adam_eps,
                weight_decay=cfg.weight_decay,
            )
            warmup = math.ceil(cfg.warmup_ratio * total)
            self.scheduler = get_cosine_schedule_with_warmup(
                self.optimizer, num_warmup_steps=warmup, num_training_steps=total
            )

        step, epoch, pos, resumed_from = 0, 0, 0, None
        ck = None
        # newest first; a damaged checkpoint is skipped (logged with its path) for the one before it
        for cand in reversed(complete_checkpoints(self.run_dir)) if self.resume else ():
            if self.shard:
                raise NotImplementedError(
                    f"{cand}: resuming a sharded (shard='fsdp') run is not supported; delete "
                    f"{self.run_dir / 'checkpoints'} or pass resume=False"
                )
            try:
                st = self._load_checkpoint(cand)
            except DamagedFileError as e:
                log.warning("%s; resuming from an earlier checkpoint", e)
                continue
            ck = cand
            step, epoch, pos, resumed_from = (
                st["step"],
                st["epoch"],
                st["batch_in_epoch"],
                st["step"],
            )
            log.info("resuming %s from %s (step %d/%d)", self.run_dir, ck.name, step, total)
            break
        if not self.resume and (self.run_dir / "checkpoints").exists() and acc.is_main_process:
            shutil.rmtree(self.run_dir / "checkpoints")
        if acc.is_main_process:
            # lines written after the checkpoint by a killed run would be duplicated: drop them
            if resumed_from is not None:
                _truncate_jsonl(self.metrics_path, step)
                _truncate_jsonl(self.eval_path, step)
            else:
                for p in (self.metrics_path, self.eval_path):
                    p.unlink(missing_ok=True)
            (self.run_dir / "FAILED.json").unlink(missing_ok=True)

        if cfg.eval_at_start and step == 0 and self.eval_fn is not None:
            self._eval(0)

        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=step,
            desc=self.run_dir.name,
            mininterval=cfg.tqdm_mininterval,
            disable=not (cfg.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        history: list[dict] = []
        last_loss, stopped_early = None, False
        it = iter(self.batches.iterate(epoch, pos))
        metrics_f = open(self.metrics_path, "a", encoding="utf-8") if acc.is_main_process else None
        try:
            while step < total:
                try:
                    batch = next(it)
                except StopIteration:
                    if pos == 0:
                        raise ValueError(f"epoch {epoch} yielded no batch") from None
                    epoch, pos = epoch + 1, 0
                    it = iter(self.batches.iterate(epoch, 0))
                    continue
                pos += 1
                rec = self._train_step(batch, step, epoch)
                step += 1
                last_loss = rec["loss"]
                rec = {"step": step, "epoch": epoch, **rec}
                history.append(rec)
                if metrics_f is not None:
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                bar.update(1)
                if step % max(1, cfg.log_every) == 0:
                    post = {"loss": f"{rec['loss']:.4f}"}
                    if "tau" in rec:
                        post["tau"] = f"{rec['tau']:.4f}"
                    bar.set_postfix(post, refresh=False)
                if self.eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    self._eval(step)
                    if self.stop_fn is not None and step < total and self._should_stop():
                        stopped_early = True
                        break
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    self._save_checkpoint(step, epoch, pos)
        finally:
            bar.close()
            if metrics_f is not None:
                metrics_f.close()

        # final: last checkpoint (resumable), final weights, marker
        self._save_checkpoint(step, epoch, pos)
        done_evals = {r.get("step") for r in _read_jsonl(self.eval_path)}
        if (
            self.eval_fn is not None
            and (cfg.eval_every or cfg.eval_at_start)
            and step not in done_evals
        ):
            self._eval(step)
        final_sd = (
            full_state_dict(self.model, trainable_only=True)
            if self.shard
            else trainable_state_dict(acc.unwrap_model(self.model))
            if acc.is_main_process
            else None
        )
        if acc.is_main_process:
            with atomic_dir(final_dir) as tmp:
                save_file(final_sd, str(tmp / "model.safetensors"))
            atomic_write_json(
                self.finished_path,
                {
                    "config_hash": self.hash,
                    "step": step,
                    "loss": last_loss,
                    "total_steps": total,
                    "stopped_early": stopped_early,
                    "shard": self.shard_record,
                    "time": time.time(),
                },
            )
        acc.wait_for_everyone()
        return TrainResult(
            self.run_dir,
            step,
            last_loss,
            resumed_from=resumed_from,
            final_dir=final_dir,
            history=history,
        )

    def trained_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained model as a plain module: the model passed in, unless ``fit()`` sharded it; then,
        on the main process, ``build()`` (the model rebuilt as it was passed in) with the final
        trainable weights loaded, and None on the other ranks (a sharded model cannot be merged or
        saved in place)."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            return self.acc.unwrap_model(self.model)
        if not self.acc.is_main_process:
            return None
        from safetensors.torch import load_file

        model = build()
        load_trainable_state_dict(
            model, load_file(str(self.run_dir / "final" / "model.safetensors"))
        )
        return model

    def _train_step(self, batch, step: int, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(self.model, self.acc, cfg, step, epoch, self._autocast)
        with self._autocast():
            out = self.step_fn(batch, ctx)
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise KeyError("step_fn returned a dict without 'loss'")
            loss, extra = out["loss"], {k: _scalar(v) for k, v in out.items() if k != "loss"}
        else:
            loss, extra = out, {}
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        loss_val = _scalar(loss)
        if not math.isfinite(loss_val):
            self._fail(step + 1, f"loss is {loss_val}")
        if loss.requires_grad:
            self.acc.backward(loss)
        params = self._params
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "step_fn returned a detached loss but no parameter has a gradient: call "
                "ctx.backward(loss) (or GradCache) inside step_fn, or return the loss with its graph"
            )
        if self._sync:  # after the check: _sync_grads fills missing gradients with zeros
            _sync_grads(self._sync)
        if cfg.max_grad_norm is not None or self.shard:  # accelerate's norm handles DTensors
            gn = self.acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        else:
            gn = torch.norm(
                torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
            )
        gn = _scalar(gn)
        if not math.isfinite(gn):
            self._fail(step + 1, f"gradient norm is {gn} (loss {loss_val})")
        lr = self.scheduler.get_last_lr()[0]
        if "tau" not in extra and self._tau is not None:
            extra["tau"] = _scalar(self._tau)  # the τ this step's loss used
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss_val, "lr": lr, "grad_norm": gn, **extra}

    def _should_stop(self) -> bool:
        """``stop_fn`` on the eval records so far, decided on the main process (which alone writes them)."""
        box = [
            bool(self.stop_fn(_read_jsonl(self.eval_path))) if self.acc.is_main_process else None
        ]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box, from_process=0)
        return bool(box[0])

    def _fail(self, step: int, what: str):
        ck = latest_checkpoint(self.run_dir)
        msg = (
            f"non-finite training signal at step {step}: {what}. Stopped before the optimizer step; "
            f"the last good checkpoint is {ck if ck is not None else 'none (no checkpoint written yet)'}. "
            f"Try a lower lr, fp32 (mixed_precision='no'), or inspect the batch; fit() resumes from that checkpoint."
        )
        if self.acc.is_main_process:
            atomic_write_json(
                self.run_dir / "FAILED.json",
                {"step": step, "reason": what, "last_checkpoint": str(ck) if ck else None},
            )
        raise NonFiniteLossError(msg)

    def _eval(self, step: int) -> dict:
        model = self.acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        # eval must not change what training draws next
        devices = (
            [torch.cuda.current_device()]
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []
        )
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            np_state, py_state = np.random.get_state(), random.getstate()
            try:
                metrics = dict(self.eval_fn(model, step))
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        model.train(was_training)
        rec = {
            "step": step,
            **{
                k: _scalar(v) if isinstance(v, (int, float, torch.Tensor)) else v
                for k, v in metrics.items()
            },
        }
        if self.acc.is_main_process:
            with open(self.eval_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        return rec


def train_loop(model, step_fn, data, cfg: TrainConfig, run_dir, **kw) -> TrainResult:
    """Functional form of ``Trainer(model, step_fn, data, cfg, run_dir, **kw).fit()``."""
    return Trainer(model, step_fn, data, cfg, run_dir, **kw).fit()
