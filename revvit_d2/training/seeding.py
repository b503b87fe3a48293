"""Seeds and RNG scopes that make a resumed training run repeat the uninterrupted one.

Three rules, shared by ``tools/train_net.py`` and ``tools/run_video.py``:

1. Every iteration starts from global RNGs (python, numpy, torch CPU and CUDA) seeded from
   ``(seed, rank, iteration)`` (:class:`ReseedHook`). What happens between iterations (an
   evaluation, a checkpoint, a data-loader iterator drawing its base seed, a restart) cannot
   change the randomness of the next one, on any number of processes. Saving and restoring RNG
   states instead would need every rank's state in the main process's checkpoint and would
   still be disturbed by whatever draws between the save and the next step.
2. Every training sample is made under RNGs seeded from ``(seed, its position in the sample
   stream)`` (:func:`revvit_d2.utils.seeding.seeded_rng`), so its augmentation does not depend
   on which data-loader worker made it or on that worker's history.
3. The sample stream is a function of ``(seed, position)``; a loader restarted at iteration i
   yields what the uninterrupted one yields at i (see :mod:`revvit_d2.d2.sampler` and
   ``revvit_video.data``).

The seed of a run is saved in its checkpoints (:class:`SeedState`) and read back before the
data loaders are built (:func:`revvit_d2.training.resume_point`), so a run with a random seed
(``train.seed`` < 0, detectron2's default) resumes with the same one. The plain functions
(``derive_seed``, ``seed_all``, ``seeded_rng``, ``set_deterministic``) live in
:mod:`revvit_d2.utils.seeding`; this module adds the detectron2 parts.
"""
import logging
from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.seeding import derive_seed, seed_all

__all__ = ["ReseedHook", "SeedState", "add_seed_keys", "resolve_seed"]

logger = logging.getLogger(__name__)


class ReseedHook(HookBase):
    """Seeds every RNG from ``(seed, rank, iteration)`` before each training step (rule 1 of
    the module docstring). Register it first so that it runs before the other hooks."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        # A 32-bit seed: seed_all seeds exactly like detectron2's seed_all_rng.
        seed_all(derive_seed(self.seed, comm.get_rank(), self.trainer.iter))


class SeedState:
    """The run's seed as a checkpointable (``Checkpointer(..., seed=SeedState(s))`` saves
    ``{"seed": s}`` under ``"seed"``). It is read back by
    :func:`~revvit_d2.training.resume_point` before the loaders are built; loading only checks
    that the run uses the same seed."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        if int(state["seed"]) != self.seed:
            logger.warning("the checkpoint was written with seed %d, this run uses %d",
                           int(state["seed"]), self.seed)


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
