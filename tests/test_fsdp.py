"""Sharded training (issue 15): the tiny released-format Qwen2-VL and Qwen3-VL, LoRA attached, decoder layers wrapped
with FSDP2 ``fully_shard`` (the classes named in the shipped accelerate FSDP config; for Qwen3-VL in a
copy naming its classes, as the README tells users) on two CPU processes
(gloo), trained a few steps, the full state gathered, LoRA merged, saved and reloaded in one process:
the same weights as the same steps trained in one process."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH = 3, 4


def _data(n=16, length=10):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1000, (length,), generator=g) for _ in range(n)]


def train_merge_save(ckpt, run_dir, out_dir, shard, fsdp_config=None):
    """Train ``STEPS`` LoRA steps from ``ckpt`` (sharded when ``shard``), merge, save to ``out_dir``."""
    from accelerate import Accelerator

    from umarvel_lib.models.loading import load_backbone
    from umarvel_lib.models.lora import apply_lora, merge_lora
    from umarvel_lib.train.engine import TrainConfig, Trainer, full_state_dict

    def build():
        torch.manual_seed(0)
        model, processor = load_backbone(ckpt, dtype=torch.float32)
        return apply_lora(model, r=4, alpha=8, dropout=0.0), processor

    model, _ = build()

    # mean token loss: the ranks' halves (equal lengths) average to the loss of the global batch
    def step_fn(batch, ctx):
        ids = torch.stack(batch)
        return ctx.model(input_ids=ids, labels=ids).loss

    cfg = TrainConfig(
        lr=1e-2, max_steps=STEPS, batch_size=GLOBAL_BATCH, seed=0, progress=False, warmup_ratio=0.0
    )
    acc = Accelerator()
    trainer = Trainer(
        model, step_fn, _data(), cfg, run_dir, accelerator=acc, shard=shard, fsdp_config=fsdp_config
    )
    trainer.fit()
    if shard:  # really sharded: the wrapped layers hold DTensor shards, half the rows on each rank
        from torch.distributed.tensor import DTensor

        q = dict(trainer.model.named_parameters())[
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
        ]
        local = q.to_local().shape
        assert isinstance(q, DTensor) and local[0] * 2 == q.shape[0], local
    sd = full_state_dict(trainer.model) if shard else trainer.model.state_dict()
    if acc.is_main_process:
        # an unsharded copy receives the gathered state, then the kit's merge; saved as build_backbone
        plain, processor = build()
        plain.load_state_dict(sd)
        merge_lora(plain).save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
    acc.wait_for_everyone()


@pytest.mark.slow  # two processes load and train a tiny Qwen2-VL / Qwen3-VL
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_fsdp_two_processes_train_like_one(tmp_path, kind):
    import yaml
    from gloo import run_ranks
    from released_format import write_checkpoint

    from umarvel_lib.models.loading import load_backbone
    from umarvel_lib.train.engine import fsdp_layer_classes

    ckpt = write_checkpoint(tmp_path / f"{kind}-Instruct", kind)
    config = None  # the shipped config (Qwen2-VL's classes)
    # Qwen3-VL: a copy of the shipped config naming its classes (README "Multi-GPU")
    if kind == "qwen3_vl":
        shipped = ROOT / "umarvel_lib" / "configs" / "accelerate_fsdp_8gpu.yaml"
        conf = yaml.safe_load(shipped.read_text())
        classes = "Qwen3VLTextDecoderLayer,Qwen3VLVisionBlock"
        conf["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = classes
        config = tmp_path / "accelerate_fsdp_qwen3vl.yaml"
        config.write_text(yaml.safe_dump(conf))
        assert fsdp_layer_classes(config) == classes.split(",")
    else:
        assert "Qwen2VLDecoderLayer" in fsdp_layer_classes()
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r}); "
        f"import torch; torch.set_num_threads(1); import test_fsdp as t; "
        f"t.train_merge_save({str(ckpt)!r}, {str(tmp_path / 'fsdp')!r}, {str(tmp_path / 'fsdp_merged')!r}, 'fsdp', {str(config) if config else None!r}); "
        f"import torch.distributed as d; d.destroy_process_group()"
    )
    run_ranks([sys.executable, "-c", code], timeout=300, env={"ACCELERATE_USE_CPU": "true"})
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
    # the LoRA delta was merged into the base weights
    assert any("layers.0.self_attn.q_proj.weight" in k for k in changed), changed[:5]
    ck = sorted((tmp_path / "fsdp" / "checkpoints").glob("step_*"))
    assert ck and (ck[-1] / "optimizer.pt").is_file()  # the gathered checkpoint was written


def test_shard_mode_follows_an_accelerate_fsdp_launch(monkeypatch):
    """One place decides: an explicit setting wins; else an FSDP launch (accelerate's env) of several
    processes shards with the launch's layer classes; settings the FSDP2 path cannot honour are refused."""
    from umarvel_lib.train.engine import fsdp_layer_classes, shard_mode

    for k in ("ACCELERATE_USE_FSDP", "WORLD_SIZE", "FSDP_TRANSFORMER_CLS_TO_WRAP"):
        monkeypatch.delenv(k, raising=False)
    assert shard_mode() is None and shard_mode("fsdp") == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen3VLTextDecoderLayer,Qwen3VLVisionBlock")
    assert shard_mode() is None  # one process: nothing to shard over
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_mode() == "fsdp" and shard_mode("none") is None
    assert fsdp_layer_classes() == ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        shard_mode()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(ValueError, match="SIZE_BASED_WRAP"):
        shard_mode()
    with pytest.raises(ValueError, match="shard must be"):
        shard_mode("ddp")
