"""Seeds and RNG scopes that make a resumed training run repeat the uninterrupted one.

Three rules, shared by ``tools/train_net.py`` and ``tools/run_video.py``:

1. Every iteration starts from global RNGs (python, numpy, torch CPU and CUDA) seeded from
   ``(seed, rank, iteration)`` (:class:`ReseedHook`). What happens between iterations (an
   evaluation, a checkpoint, a data-loader iterator drawing its base seed, a restart) cannot
   change the randomness of the next one, on any number of processes. Saving and restoring RNG
   states instead would need every rank's state in the main process's checkpoint and would
   still be disturbed by whatever draws between the save and the next step.
2. Every training sample is made under RNGs seeded from ``(seed, its position in the sample
   stream)`` (:func:`seeded_rng`), so its augmentation does not depend on which data-loader
   worker made it or on that worker's history.
3. The sample stream is a function of ``(seed, position)``; a loader restarted at iteration i
   yields what the uninterrupted one yields at i (see :mod:`revvit_d2.d2.sampler` and
   ``revvit_video.data``).

The seed of a run is saved in its checkpoints (:class:`SeedState`) and read back before the
data loaders are built (:func:`saved_run_state`), so a run with a random seed (``train.seed``
< 0, detectron2's default) resumes with the same one.
"""
import contextlib
import logging
import os
import random
from typing import Optional, Tuple

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

__all__ = ["ReseedHook", "SeedState", "add_seed_keys", "derive_seed", "resolve_seed",
           "saved_run_state", "seeded_rng", "set_deterministic"]

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from non-negative integers (numpy's ``SeedSequence`` hash: nearby
    keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int):
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


class ReseedHook(HookBase):
    """Seeds every RNG from ``(seed, rank, iteration)`` before each training step (rule 1 of
    the module docstring). Register it first so that it runs before the other hooks."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        seed_all_rng(derive_seed(self.seed, comm.get_rank(), self.trainer.iter))


class SeedState:
    """The run's seed as a checkpointable (``Checkpointer(..., seed=SeedState(s))`` saves
    ``{"seed": s}`` under ``"seed"``). It is read back by :func:`saved_run_state` before the
    loaders are built; loading only checks that the run uses the same seed."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        if int(state["seed"]) != self.seed:
            logger.warning("the checkpoint was written with seed %d, this run uses %d",
                           int(state["seed"]), self.seed)


def saved_run_state(path: str) -> Tuple[Optional[int], Optional[int]]:
    """``(seed, iteration)`` recorded in a checkpoint written by our checkpointers (None for
    what it lacks). The file is memory-mapped: only these small entries are read."""
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - a trainer state with Python objects
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    seed = data.get("seed", {}).get("seed") if isinstance(data, dict) else None
    iteration = data.get("iteration") if isinstance(data, dict) else None
    return (None if seed is None else int(seed)), (None if iteration is None else int(iteration))


def resolve_seed(configured: Optional[int], saved: Optional[int]) -> int:
    """The seed of this run: the checkpoint's when resuming, else ``train.seed`` when >= 0,
    else a random one shared by all processes (call it on every process)."""
    if saved is not None:
        if configured is not None and int(configured) >= 0 and int(configured) != saved:
            logger.warning("resuming with the checkpoint's seed %d (train.seed=%d is ignored)",
                           saved, int(configured))
        return saved
    if configured is not None and int(configured) >= 0:
        return int(configured)
    seed = comm.shared_random_seed()
    logger.info("train.seed < 0: using the random seed %d (saved in the checkpoints)", seed)
    return int(seed)


def add_seed_keys(train_cfg) -> None:
    """Give the ``train`` section of a config the keys read here when it lacks them:
    ``seed`` (-1: random, detectron2's default) and ``deterministic`` (False)."""
    for key, default in (("seed", -1), ("deterministic", False)):
        if key not in train_cfg:
            train_cfg[key] = default


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
