"""Seeds derived from integer keys, and RNG scopes (python, numpy, torch).

How the training tools use them to make a resumed run repeat the uninterrupted one is described
in :mod:`revvit_d2.training.seeding` (the detectron2 hooks built on these functions).
"""
import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "seed_all", "seeded_rng", "set_deterministic"]


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from non-negative integers (numpy's ``SeedSequence`` hash: nearby
    keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with python, numpy and torch-CPU RNGs seeded with `seed`, then put their
    previous states back (so it can run in the training process when ``num_workers=0``
    without touching the training randomness). CUDA RNGs are left alone: data pipelines run
    on the CPU."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN deterministic and
    not benchmarking, cuBLAS workspace config). Ops without a deterministic CUDA kernel warn
    instead of failing. CPU training is deterministic without this."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
