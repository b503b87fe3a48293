import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ORACLE_DIRS = [ROOT / "tests" / "data" / "oracle", ROOT.parent / "shared" / "oracle"]


def oracle_path(name: str) -> Path:
    for d in ORACLE_DIRS:
        if (d / name).exists():
            return d / name
    pytest.skip(f"oracle file {name} not found in {[str(d) for d in ORACLE_DIRS]}")


def load_oracle(name: str):
    return torch.load(oracle_path(name), weights_only=True)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Keep CPU tests deterministic and friendly to 2-core CI machines.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
