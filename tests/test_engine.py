"""Engine: exact resume after a SIGKILL, NaN stop, finished-run skip, schedule, bf16 sanity."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from umarvel_lib.train.engine import (
    NonFiniteLossError,
    RunConflictError,
    TrainConfig,
    latest_checkpoint,
    train_loop,
    trainable_state_dict,
)
from umarvel_lib.train.gradcache import grad_cache_step
from umarvel_lib.train.losses import info_nce

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.l1, self.drop, self.l2 = nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 8)
        self.tau = nn.Parameter(torch.tensor(0.05))

    def forward(self, x):
        return F.normalize(self.l2(self.drop(torch.tanh(self.l1(self.frozen(x))))), dim=-1)


def _data(n=40):
    g = torch.Generator().manual_seed(1)
    xq = torch.randn(n, 6, generator=g)
    xc = xq + 0.3 * torch.randn(n, 6, generator=g)
    return [(xq[i], xc[i]) for i in range(n)]


def _collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _cfg(**kw):
    base = dict(
        lr=1e-2,
        max_steps=12,
        batch_size=8,
        warmup_ratio=0.1,
        save_every=5,
        keep_checkpoints=2,
        eval_every=4,
        seed=0,
        progress=False,
        grad_cache_chunk=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def make_step_fn(model, kill_at=None, nan_at=None):
    def step_fn(batch, ctx):
        if kill_at is not None and ctx.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        xq, xc = batch
        if ctx.cfg.grad_cache_chunk:
            loss = grad_cache_step(
                model,
                (xq, xc),
                lambda q, c: info_nce(q, c, model.tau),
                ctx.cfg.grad_cache_chunk,
                backward=ctx.backward,
                no_sync=ctx.no_sync,
            )
        else:
            loss = info_nce(model(xq), model(xc), model.tau)
        if nan_at is not None and ctx.step == nan_at:
            loss = loss * float("nan")
        return (
            {"loss": loss, "tau": model.tau} if ctx.step % 2 else loss
        )  # τ is auto-logged otherwise

    return step_fn


def _eval_fn(model, step):
    torch.rand(5)  # consumes RNG on purpose: must not change training
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=g)
    return {"self_sim": float((model(x) @ model(x).T).diag().mean())}


def run_training(run_dir, kill_at=None, nan_at=None, **cfg_kw):
    torch.manual_seed(0)
    model = Tiny()
    res = train_loop(
        model,
        make_step_fn(model, kill_at, nan_at),
        _data(),
        _cfg(**cfg_kw),
        run_dir,
        collate_fn=_collate,
        eval_fn=_eval_fn,
    )
    return model, res


def _lines(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines()]


@pytest.mark.slow  # SIGKILL of a training subprocess, then a resume
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    ref_model, ref = run_training(tmp_path / "ref")
    assert ref.step == 12 and not ref.skipped
    # a separate process trains the same run and is SIGKILLed during step 8 (7 steps done, checkpoint at 5)
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r}); "
        f"import torch; torch.set_num_threads(1); import test_engine as t; "
        f"t.run_training({str(tmp_path / 'run')!r}, kill_at=7)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"
    assert [r["step"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 8))
    assert not (tmp_path / "run" / "FINISHED.json").exists()

    model, res = run_training(tmp_path / "run")
    assert res.resumed_from == 5 and res.step == 12
    want, got = trainable_state_dict(ref_model), trainable_state_dict(model)
    assert want.keys() == got.keys() and "frozen.weight" not in got and "tau" in got
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # metric and eval lines: each step once, same values as the uninterrupted run
    m_ref, m = (
        _lines(tmp_path / "ref" / "metrics.jsonl"),
        _lines(tmp_path / "run" / "metrics.jsonl"),
    )
    assert [r["step"] for r in m] == list(range(1, 13))
    assert [r["loss"] for r in m] == [r["loss"] for r in m_ref]
    assert all("tau" in r and "grad_norm" in r and "lr" in r for r in m)
    e_ref, e = _lines(tmp_path / "ref" / "eval.jsonl"), _lines(tmp_path / "run" / "eval.jsonl")
    assert [r["step"] for r in e] == [4, 8, 12] and e == e_ref
    # keep_checkpoints=2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000010",
        "step_00000012",
    ]


def test_eval_does_not_change_training(tmp_path):
    a, _ = run_training(tmp_path / "a", max_steps=6, save_every=0)
    b, _ = run_training(tmp_path / "b", max_steps=6, save_every=0, eval_every=0)
    for k, v in trainable_state_dict(a).items():
        assert torch.equal(v, trainable_state_dict(b)[k])


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss is nan.*step_00000002"):
        run_training(tmp_path / "run", nan_at=3, save_every=2, max_steps=6)
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "step_00000002"
    assert json.loads((tmp_path / "run" / "FAILED.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "FINISHED.json").exists()
    # fixed, the run resumes from the good checkpoint and finishes
    _, res = run_training(tmp_path / "run", save_every=2, max_steps=6)
    assert (
        res.resumed_from == 2 and res.step == 6 and not (tmp_path / "run" / "FAILED.json").exists()
    )


def test_finished_run_is_skipped_and_conflicts_refused(tmp_path):
    model, res = run_training(tmp_path / "run", max_steps=3, save_every=0, eval_every=0)
    fin = json.loads((tmp_path / "run" / "FINISHED.json").read_text())
    assert fin["step"] == 3 and len(fin["config_hash"]) == 16

    torch.manual_seed(0)
    fresh = Tiny()

    def boom(batch, ctx):
        raise AssertionError("a finished run must not train again")

    # save/eval/log settings are not part of the identity
    res2 = train_loop(
        fresh,
        boom,
        _data(),
        _cfg(max_steps=3, save_every=1, eval_every=0),
        tmp_path / "run",
        collate_fn=_collate,
    )
    assert res2.skipped and res2.step == 3
    for k, v in trainable_state_dict(model).items():
        assert torch.equal(v, trainable_state_dict(fresh)[k])  # final weights loaded
    with pytest.raises(RunConflictError):
        train_loop(
            Tiny(), boom, _data(), _cfg(max_steps=3, lr=5e-3), tmp_path / "run", collate_fn=_collate
        )


def test_schedule_epochs_budget_and_plain_backward(tmp_path):
    _, res = run_training(
        tmp_path / "run",
        max_steps=None,
        epochs=2,
        save_every=0,
        eval_every=0,
        grad_cache_chunk=None,
        warmup_ratio=0.2,
    )
    assert res.step == 10  # 40 items / 8 = 5 batches × 2 epochs
    lrs = [r["lr"] for r in _lines(tmp_path / "run" / "metrics.jsonl")]
    warm = 2
    want = [
        1e-2 * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (10 - warm))))
        for s in range(10)
    ]
    assert lrs == pytest.approx(want)
    assert [r["epoch"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == [0] * 5 + [1] * 5


def test_detached_loss_without_backward_is_an_error(tmp_path):
    model = Tiny()

    def lazy(batch, ctx):
        with torch.no_grad():
            return info_nce(model(batch[0]), model(batch[1]), model.tau)

    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        train_loop(model, lazy, _data(), _cfg(max_steps=2), tmp_path / "run", collate_fn=_collate)


def test_bf16_autocast_loss_is_sane(tmp_path):
    _, r32 = run_training(tmp_path / "fp32", max_steps=8, save_every=0, eval_every=0)
    _, r16 = run_training(
        tmp_path / "bf16", max_steps=8, save_every=0, eval_every=0, mixed_precision="bf16"
    )
    l32, l16 = [h["loss"] for h in r32.history], [h["loss"] for h in r16.history]
    assert all(math.isfinite(x) for x in l16)
    # bf16 matmuls follow the fp32 trajectory closely (a broken autocast/loss would not)
    assert l16 == pytest.approx(l32, rel=5e-2)
    assert l16 != l32  # autocast really was on


# ---- two CPU processes (gloo): the engine shards each global batch and averages gradients -----------
def run_gathered_training(run_dir, steps=6):
    """GradCache InfoNCE over the gathered global batch (no dropout, no clipping, so one process and
    two processes are comparable: Adam is invariant to the 1/world scale DDP-style averaging gives)."""
    from umarvel_lib.train.losses import gather_with_grad

    torch.manual_seed(0)
    model = Tiny().double()
    model.drop.p = 0.0

    def step_fn(batch, ctx):
        xq, xc = (x.double() for x in batch)

        def lf(q, c):
            return info_nce(gather_with_grad(q), gather_with_grad(c), model.tau)

        return grad_cache_step(model, (xq, xc), lf, 2, backward=ctx.backward)

    res = train_loop(
        model,
        step_fn,
        _data(),
        _cfg(max_steps=steps, max_grad_norm=None, eval_every=0, save_every=3),
        run_dir,
        collate_fn=_collate,
    )
    return model, res


@pytest.mark.slow  # two torchrun processes (gloo)
def test_two_processes_train_like_one(tmp_path):
    from gloo import run_ranks

    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r}); "
        f"import torch; torch.set_num_threads(1); import test_engine as t; "
        f"m, r = t.run_gathered_training({str(tmp_path / 'ddp')!r}); "
        f"import torch.distributed as d; rank = d.get_rank(); "
        f"torch.save({{k: v for k, v in m.state_dict().items()}}, {str(tmp_path)!r} + f'/rank{{rank}}.pt'); "
        f"d.destroy_process_group()"
    )
    run_ranks([sys.executable, "-c", code], env={"ACCELERATE_USE_CPU": "true"})
    ref, res = run_gathered_training(tmp_path / "single")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k, v in ref.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k  # the ranks stay in lockstep
        assert torch.allclose(r0[k], v, rtol=0, atol=1e-7), (
            k,
            (r0[k] - v).abs().max(),
        )  # = one process
    assert not torch.equal(r0["l1.weight"], Tiny().double().l1.weight)  # it trained
    m = _lines(tmp_path / "ddp" / "metrics.jsonl")  # one writer: the main process
    assert [r["step"] for r in m] == list(range(1, 7))
    single = _lines(tmp_path / "single" / "metrics.jsonl")
    assert all(
        math.isclose(a["loss"], b["loss"], rel_tol=0, abs_tol=1e-6) for a, b in zip(m, single)
    )
