import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The synthetic mini-M-BEIR at the smoke preset (built once per test session)."""
    from umarvel_lib.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

    root = tmp_path_factory.mktemp("mini_mbeir") / "smoke"
    generate(root, SyntheticConfig(**SYNTHETIC_PRESETS["smoke"]))
    return root
