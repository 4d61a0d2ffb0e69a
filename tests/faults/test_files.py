"""Temporaries, modes and damaged files (no model: fast)."""

import os
import subprocess
import sys

import pytest

from umarvel_lib.io import (
    DamagedFileError,
    atomic_dir,
    atomic_write_text,
    check_safetensors,
    checkpoint_digest,
    is_stale_tmp,
    read_json,
    tmp_prefix,
)


def _foreign(name, pid):
    return tmp_prefix(name).replace(f"-{os.getpid()}-", f"-{pid}-") + "x1y2"


def test_atomic_dir_removes_only_temporaries_of_dead_owners(tmp_path, dead_pid):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        other = tmp_path / _foreign("out", live.pid)  # a concurrent writer's half-built directory
        stale = tmp_path / _foreign("out", dead_pid)  # a killed writer's
        legacy = tmp_path / ".out.tmp-abc123"  # no owner in the name: never provably stale
        for d in (other, stale, legacy):
            d.mkdir()
            (d / "f").write_text("partial")
        assert not is_stale_tmp(other) and is_stale_tmp(stale) and not is_stale_tmp(legacy)
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("complete")
        assert (tmp_path / "out" / "f").read_text() == "complete"
        assert other.is_dir() and legacy.is_dir() and not stale.exists()
    finally:
        live.kill()
        live.wait()


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "recipe.json", "{}")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_damaged_json_names_the_file_and_line(tmp_path):
    f = tmp_path / "metrics.json"
    f.write_text('{\n  "avg": {"headline": 1.0,\n')
    with pytest.raises(DamagedFileError, match=rf"{f}:3: damaged JSON"):
        read_json(f)
    f.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(DamagedFileError, match=rf"{f}: not UTF-8"):
        read_json(f)


def test_truncated_weights_name_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    w = tmp_path / "ckpt" / "model.safetensors"
    w.parent.mkdir()
    save_file({"a": torch.arange(1000, dtype=torch.float32)}, str(w))
    check_safetensors(w)
    digest = checkpoint_digest(w.parent)
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(DamagedFileError, match=rf"{w}: damaged safetensors file"):
        check_safetensors(w)
    with pytest.raises(DamagedFileError, match=str(w)):
        checkpoint_digest(w.parent)
    w.write_bytes(b"\x00" * 3)
    with pytest.raises(DamagedFileError, match=str(w)):
        check_safetensors(w)
    assert len(digest) == 16


def test_damaged_checkpoint_resumes_from_the_one_before_with_identical_weights(tmp_path, caplog):
    """A checkpoint whose optimizer file was cut short is skipped (logged with its path); training resumes
    from the previous checkpoint and ends with the weights of an undisturbed run."""
    import torch

    from umarvel_lib.train.engine import TrainConfig, Trainer, complete_checkpoints

    def run(run_dir, max_steps, resume=True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        data = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(32)]

        def step(batch, ctx):
            loss = model(torch.stack(batch)).pow(2).mean()
            ctx.backward(loss)
            return loss.detach()

        cfg = TrainConfig(
            lr=0.1,
            max_steps=max_steps,
            batch_size=4,
            seed=0,
            save_every=2,
            keep_checkpoints=5,
            progress=False,
        )
        Trainer(model, step, data, cfg, run_dir, collate_fn=list, resume=resume).fit()
        return model.weight.detach().clone()

    clean = run(tmp_path / "clean", 8)
    part = tmp_path / "part"
    run(part, 8)
    (part / "FINISHED.json").write_text(
        '{"config_hash": '
    )  # a damaged marker: not finished after all
    last = complete_checkpoints(part)[-1]
    opt = last / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:50])
    with caplog.at_level("WARNING"):
        again = run(part, 8)
    assert str(opt) in caplog.text and "FINISHED.json" in caplog.text
    torch.testing.assert_close(again, clean, rtol=0, atol=0)
