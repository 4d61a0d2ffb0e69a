import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one thread is faster than two (thread overhead dominates) and leaves the other core to
# subprocesses (papermill kernels, 2-process tests). Children inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The synthetic mini-M-BEIR at the smoke preset (built once per test session)."""
    from umarvel_lib.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

    root = tmp_path_factory.mktemp("mini_mbeir") / "smoke"
    generate(root, SyntheticConfig(**SYNTHETIC_PRESETS["smoke"]))
    return root


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """Tiny random-init Qwen2-VL and Qwen3-VL checkpoints (built once per session, seconds)."""
    from umarvel_lib.micro.build import tiny_backbone

    cache = tmp_path_factory.getbasetemp() / "umarvel-tiny-backbones"
    return {k: tiny_backbone(cache, k) for k in ("qwen2_vl", "qwen3_vl")}
