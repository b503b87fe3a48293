"""Checkpoints of the training tools: atomic saves, strict loads, the resume point, and the one
"read a checkpoint and check it strictly" step.

* :class:`AtomicSaveMixin` for fvcore/detectron2 ``Checkpointer`` subclasses: the checkpoint
  and the ``last_checkpoint`` tag go through :func:`revvit_d2.utils.io.atomic_write`, so a kill
  during a save never leaves a truncated "last" checkpoint (fvcore writes both in place).
* :class:`AtomicCheckpointer`: detectron2's ``Checkpointer`` with atomic saves and strict loads.
* :func:`read_checked`: the checkpoint file as a dict, every failure one :class:`ToolError`
  line; :func:`load_checked` adds a strict loader (``revvit_d2.load_pretrained`` or one of its
  kind); :func:`resume_point` finds what ``--resume`` continues from.

Every file is read with :func:`revvit_d2.utils.io.read_checkpoint` (data only: a file whose
pickle needs more is refused with :class:`~revvit_d2.utils.io.UnsafeCheckpointError`); the
``allow_unsafe_pickle`` arguments, set by the tools' ``*.allow_unsafe_pickle`` config keys
(:func:`add_unsafe_pickle_key`), opt in to loading such a file (it executes code from it).
"""
import contextlib
import glob
import logging
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

from detectron2.checkpoint import Checkpointer
from detectron2.utils import comm

from ..checkpoint import CheckpointMismatchError, detect_format, load_pretrained
from ..utils.errors import UserError, one_line
from ..utils.io import TMP_PREFIX, atomic_torch_save, atomic_write, read_checkpoint
from ..utils.sharded_checkpoint import is_sharded_checkpoint
from .cli import ToolError
from .seeding import resolve_seed

__all__ = ["AtomicCheckpointer", "AtomicSaveMixin", "ResumePoint", "SHARDED_STATE_FILE",
           "SafeLoadMixin", "add_unsafe_pickle_key", "check_start_checkpoint",
           "last_checkpoint_file", "load_checked", "read_checked", "resume_from_checkpoint",
           "resume_point"]

logger = logging.getLogger(__name__)

#: In a sharded checkpoint directory (:mod:`revvit_d2.training.fsdp`): the file that holds the
#: run's non-tensor state (iteration, seed, schedule, data position), read as data only.
SHARDED_STATE_FILE = "training_state.pth"


class AtomicSaveMixin:
    """For fvcore/detectron2 ``Checkpointer`` subclasses: ``save`` and the ``last_checkpoint``
    tag are atomic (:func:`~revvit_d2.utils.io.atomic_write`). fvcore writes both files in
    place, so a kill during a save can leave a truncated "last" checkpoint."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)
        # Temporary files of a save that was killed (SIGKILL runs no cleanup); one process
        # saves into a directory, so any other one is stale.
        for stale in glob.glob(os.path.join(self.save_dir, TMP_PREFIX + "*")):
            with contextlib.suppress(OSError):
                os.remove(stale)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)


class SafeLoadMixin:
    """For fvcore/detectron2 ``Checkpointer`` subclasses: files are read with
    :func:`~revvit_d2.utils.io.read_checkpoint` (fvcore's ``torch.load`` follows torch's
    ``weights_only`` default, detectron2 unpickles ``.pkl`` files in full), so a checkpoint
    whose pickle asks for code is refused. ``allow_unsafe_pickle=True`` (keyword of the
    constructor) loads it after a warning: this executes code from the file."""

    def __init__(self, *args, allow_unsafe_pickle: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_unsafe_pickle = bool(allow_unsafe_pickle)

    def _load_file(self, filename: str):
        return read_checkpoint(filename, allow_unsafe_pickle=self.allow_unsafe_pickle)


class AtomicCheckpointer(SafeLoadMixin, AtomicSaveMixin, Checkpointer):
    """detectron2's (fvcore's) ``Checkpointer`` with atomic writes, data-only reads
    (:class:`SafeLoadMixin`) and strict loading: loading a checkpoint whose model keys do not
    match raises instead of being logged and ignored (fvcore only logs them)."""

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise RuntimeError(f"checkpoint does not match the model: missing "
                               f"{incompatible.missing_keys[:8]}, unexpected "
                               f"{incompatible.unexpected_keys[:8]}")
        return incompatible


def last_checkpoint_file(save_dir: str) -> Optional[str]:
    """The file named by ``<save_dir>/last_checkpoint`` (what ``--resume`` loads; a sharded
    checkpoint is a directory), or None when there is no such tag. Raises FileNotFoundError
    when the tag names a missing file."""
    tag = os.path.join(save_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    if not name or not (os.path.isfile(path) or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"{tag} names {name!r}, which is not a file in {save_dir}")
    return path


def check_start_checkpoint(save_dir: str, init_checkpoint, resume: bool) -> None:
    """Raise a :class:`ToolError` when the checkpoint a training tool will start from does not
    exist: the one ``last_checkpoint`` names when resuming, else ``train.init_checkpoint`` (a
    URL is left to the loader). Cheap: run it before anything is written."""
    try:
        if resume and last_checkpoint_file(save_dir) is not None:
            return
    except FileNotFoundError as e:
        raise ToolError(f"cannot resume: {e}") from None
    init = os.path.expanduser(str(init_checkpoint or ""))
    if init and is_sharded_checkpoint(init):
        raise ToolError(f"train.init_checkpoint {init_checkpoint} is a sharded checkpoint (a "
                        f"directory): --resume continues it from its train.output_dir; "
                        f"tools/convert_checkpoint.py {init_checkpoint} OUT.pth makes one file")
    if init and "://" not in init and not os.path.isfile(init):
        raise ToolError(f"train.init_checkpoint not found: {init_checkpoint}")


def add_unsafe_pickle_key(section) -> None:
    """Give a tool's config section (``train`` or ``eval``) the key ``allow_unsafe_pickle``
    (False) when it lacks it: ``train.allow_unsafe_pickle=True`` loads checkpoints whose pickle
    needs more than data, which executes code from them (only for files you trust)."""
    if "allow_unsafe_pickle" not in section:
        section["allow_unsafe_pickle"] = False


def read_checked(path, require: Sequence[str] = (), mmap: bool = False,
                 allow_unsafe_pickle: bool = False) -> dict:
    """The dict stored in checkpoint file `path` (:func:`~revvit_d2.utils.io.read_checkpoint`,
    which refuses a file whose pickle needs more than data unless `allow_unsafe_pickle`).

    Every way this can fail is one :class:`ToolError` line naming the file: it is missing,
    unreadable (empty, truncated, not a checkpoint), not a dict, or lacks one of the top-level
    keys in `require` (e.g. ``"iteration"`` for a training checkpoint). A refused file is an
    :class:`~revvit_d2.utils.io.UnsafeCheckpointError` line.
    """
    try:
        data = read_checkpoint(path, mmap=mmap, allow_unsafe_pickle=allow_unsafe_pickle)
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch.load makes of a damaged file
        raise ToolError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ToolError(f"checkpoint {path} is a {type(data).__name__}, not a dict")
    missing = [k for k in require if k not in data]
    if missing:
        raise ToolError(f"checkpoint {path} has no {', '.join(map(repr, missing))} (not a "
                        f"checkpoint written by a training tool)")
    return data


def load_checked(model, path, what: str = "the model", load: Callable = load_pretrained,
                 allow_unsafe_pickle: bool = False, **kwargs) -> dict:
    """Read checkpoint `path` (:func:`read_checked`) and load it into `model` with
    ``load(model, data, **kwargs)``, a strict loader such as :func:`revvit_d2.load_pretrained`
    (the default) that raises :class:`~revvit_d2.CheckpointMismatchError` on any missing,
    unexpected or mis-shaped key. Returns the loader's report; a checkpoint that does not fit
    is one :class:`ToolError` line (``checkpoint P (F format) does not fit <what>: ...``).
    `allow_unsafe_pickle`: see :func:`read_checked`."""
    data = read_checked(path, allow_unsafe_pickle=allow_unsafe_pickle)
    fmt = detect_format(data)
    try:
        report = load(model, data, **kwargs)
    except CheckpointMismatchError as e:
        raise ToolError(f"checkpoint {path} ({fmt} format) does not fit {what}: {e}") from None
    except KeyError as e:
        raise ToolError(f"checkpoint {path} ({fmt} format): {e.args[0] if e.args else e}") \
            from None
    logger.info("loaded checkpoint %s (%s format) into %s", path, fmt, what)
    return report


class ResumePoint(NamedTuple):
    """Where a training run starts: the checkpoint it resumes from (None: a fresh start), the
    seed of the run, and its first iteration."""
    path: Optional[str]
    seed: int
    start_iter: int


def resume_point(output_dir: str, resume: bool, configured_seed: Optional[int],
                 allow_unsafe_pickle: bool = False) -> ResumePoint:
    """With `resume`, the checkpoint ``<output_dir>/last_checkpoint`` names, read strictly
    (:func:`read_checked`: it must hold the ``iteration`` of a training checkpoint), and the
    seed saved in it; else a fresh start with ``train.seed`` (or a random seed shared by all
    processes: call it on every process). Only the small entries are read (memory-mapped).
    `allow_unsafe_pickle`: see :func:`read_checked`."""
    path = None
    saved_seed, saved_iter = None, -1
    if resume:
        try:
            path = last_checkpoint_file(output_dir)
        except FileNotFoundError as e:
            raise ToolError(f"cannot resume: {e}") from None
    if path is not None:
        state = os.path.join(path, SHARDED_STATE_FILE) if os.path.isdir(path) else path
        data = read_checked(state, require=("iteration",), mmap=True,
                            allow_unsafe_pickle=allow_unsafe_pickle)
        saved_iter = int(data["iteration"])
        seed = data.get("seed", {}).get("seed") if isinstance(data.get("seed"), dict) else None
        saved_seed = None if seed is None else int(seed)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    return ResumePoint(path, resolve_seed(configured_seed, saved_seed), saved_iter + 1)


def resume_from_checkpoint(checkpointer, trainer, point: ResumePoint) -> None:
    """Load model, optimizer, trainer and hook states from ``point.path`` with `checkpointer`
    and check that the trainer is at ``point.start_iter``. A checkpoint that does not fit is
    one :class:`ToolError` line."""
    if os.path.isdir(point.path) and not getattr(checkpointer, "saves_on_all_processes", False):
        raise ToolError(f"{point.path} is a sharded checkpoint: resume it with "
                        f"train.fsdp.enabled=True (docs/fsdp_training.md)")
    try:
        checkpointer.load(point.path)
    except UserError:
        raise
    except (RuntimeError, KeyError, OSError, ValueError) as e:
        raise ToolError(f"cannot resume from {point.path}: {one_line(e)}") from None
    if trainer.iter + 1 != point.start_iter:
        raise ToolError(f"{point.path} holds trainer iteration {trainer.iter}, not "
                        f"{point.start_iter - 1}")
    if comm.is_main_process():
        logger.info("resuming from %s at iteration %d", point.path, point.start_iter)
