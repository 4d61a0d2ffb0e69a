"""Sharded training (issue 15): the tiny released-format Qwen2-VL, LoRA attached, decoder layers wrapped
with FSDP2 ``fully_shard`` (the classes named in the shipped accelerate FSDP config) on two CPU processes
(gloo), trained a few steps, the full state gathered, LoRA merged, saved and reloaded in one process:
the same weights as the same steps trained in one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH = 3, 4


def _data(n=16, length=10):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1000, (length,), generator=g) for _ in range(n)]


def train_merge_save(ckpt, run_dir, out_dir, shard):
    """Train ``STEPS`` LoRA steps from ``ckpt`` (sharded when ``shard``), merge, save to ``out_dir``."""
    from accelerate import Accelerator

    from umarvel_lib.models.backbone import load_backbone
    from umarvel_lib.models.lora import apply_lora, merge_lora
    from umarvel_lib.train.engine import TrainConfig, Trainer, full_state_dict

    def build():
        torch.manual_seed(0)
        model, processor = load_backbone(ckpt, dtype=torch.float32)
        return apply_lora(model, r=4, alpha=8, dropout=0.0), processor

    model, _ = build()

    def step_fn(batch, ctx):  # mean token loss: rank halves of equal length average to the global one
        ids = torch.stack(batch)
        return ctx.model(input_ids=ids, labels=ids).loss

    cfg = TrainConfig(lr=1e-2, max_steps=STEPS, batch_size=GLOBAL_BATCH, seed=0, progress=False, warmup_ratio=0.0)
    acc = Accelerator()
    trainer = Trainer(model, step_fn, _data(), cfg, run_dir, accelerator=acc, shard=shard)
    trainer.fit()
    if shard:  # really sharded: the wrapped layers hold DTensor shards, half the rows on each rank
        from torch.distributed.tensor import DTensor

        q = dict(trainer.model.named_parameters())[
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
        ]
        assert isinstance(q, DTensor) and q.to_local().shape[0] * 2 == q.shape[0], q.to_local().shape
    sd = full_state_dict(trainer.model) if shard else trainer.model.state_dict()
    if acc.is_main_process:
        plain, processor = build()  # an unsharded copy receives the gathered state, then the kit's merge
        plain.load_state_dict(sd)
        merge_lora(plain).save_pretrained(out_dir, safe_serialization=True)  # as build_backbone saves
        processor.save_pretrained(out_dir)
    acc.wait_for_everyone()


@pytest.mark.slow  # two processes load and train a tiny Qwen2-VL
def test_fsdp_two_processes_train_like_one(tmp_path):
    from released_format import write_checkpoint

    from umarvel_lib.models.backbone import load_backbone

    ckpt = write_checkpoint(tmp_path / "Qwen2-VL-7B-Instruct", "qwen2_vl")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r}); "
        f"import torch; torch.set_num_threads(1); import test_fsdp as t; "
        f"t.train_merge_save({str(ckpt)!r}, {str(tmp_path / 'fsdp')!r}, {str(tmp_path / 'fsdp_merged')!r}, 'fsdp'); "
        f"import torch.distributed as d; d.destroy_process_group()"
    )
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true",
        }
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    train_merge_save(ckpt, tmp_path / "single", tmp_path / "single_merged", None)

    sharded, _ = load_backbone(tmp_path / "fsdp_merged", dtype=torch.float32)
    single, _ = load_backbone(tmp_path / "single_merged", dtype=torch.float32)
    base, _ = load_backbone(ckpt, dtype=torch.float32)
    a, b, o = sharded.state_dict(), single.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and not any("lora" in k for k in a)  # merged: plain model keys
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    print("max |sharded - single|:", max((a[k] - b[k]).abs().max().item() for k in b))
    print("max |trained - base|:", max((b[k] - o[k]).abs().max().item() for k in b))
    changed = [k for k in b if not torch.equal(b[k], o[k])]
    assert any("layers.0.self_attn.q_proj.weight" in k for k in changed), changed[:5]  # LoRA merged in
    ck = sorted((tmp_path / "fsdp" / "checkpoints").glob("step_*"))
    assert ck and (ck[-1] / "optimizer.pt").is_file()  # the gathered checkpoint was written
