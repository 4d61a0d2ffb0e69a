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
