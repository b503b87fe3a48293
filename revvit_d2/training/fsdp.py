"""Sharded training (FSDP2) in the training tools: the ``train.fsdp`` config section, the model
sharded instead of wrapped by DDP, and sharded checkpoints (docs/fsdp_training.md).

* :func:`add_fsdp_keys` gives a tool's ``train`` section the ``fsdp`` keys (:data:`FSDP_DEFAULTS`:
  disabled, so DDP stays the default and ``train.fsdp.enabled=True`` is a valid override);
* :func:`fsdp_settings`: the ``fully_shard`` keyword arguments ``train.fsdp`` asks for, or None;
  a setting that does not apply is one :class:`ToolError` line;
* :func:`shard_for_training`: the model sharded (:func:`revvit_d2.shard_model`). Build the
  optimizer after it: it must hold the sharded parameters;
* :func:`unsharded_copy`: the full weights in an unsharded model, for evaluation (the processes
  evaluate different numbers of batches, and every forward of a sharded model is a collective);
* :class:`ShardedCheckpointer`: checkpoints written with ``torch.distributed.checkpoint`` by all
  processes at once, atomically, resumable with another number of processes.

Layout of one checkpoint, a directory ``<output_dir>/model_0000099/``::

    .metadata                DCP: global shape, dtype and file of every tensor
    __0_0.distcp ...         DCP: the tensor bytes, one file per saving process
    training_state.pth       the rest: iteration, seed, LR schedule, data position, grad scaler,
                             the optimizer's parameter groups (plain data, read with
                             revvit_d2.utils.io.read_checkpoint)

The tensors are those of ``get_state_dict(model, optimizer)`` under ``model.`` and
``optimizer.state.`` with the model's own parameter names. A save goes into
``.tmp_<name>/``, which is renamed to ``<name>/`` once complete; ``last_checkpoint`` is written
after that: a process killed during a save leaves the previous checkpoint as the last one.
"""
import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from detectron2.utils import comm
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from ..modeling import shard_model
from ..utils.errors import UserError, one_line
from ..utils.io import TMP_PREFIX, atomic_torch_save, atomic_write
from ..utils.sharded_checkpoint import METADATA_FILE, SafeShardedReader, is_sharded_checkpoint
from .checkpoint import SHARDED_STATE_FILE, read_checked
from .cli import ToolError

__all__ = ["FSDP_DEFAULTS", "ShardedCheckpointer", "add_fsdp_keys", "fsdp_settings",
           "is_sharded", "shard_for_training", "unsharded_copy"]

logger = logging.getLogger(__name__)

#: The keys of ``train.fsdp`` and their defaults.
FSDP_DEFAULTS = {
    # FSDP2 instead of DDP: parameters, gradients and optimizer state sharded over the processes
    "enabled": False,
    # free each block's gathered parameters after its forward (gathered again for backward);
    # the reversible engine needs True (it releases every block right after its F and G)
    "reshard_after_forward": True,
    # "bf16": bfloat16 parameters in forward/backward, float32 gradient reduction and master
    # weights (MixedPrecisionPolicy); None: float32 throughout
    "mixed_precision": None,
}
_MIXED_PRECISION = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def add_fsdp_keys(train_cfg) -> None:
    """Give a tool's ``train`` section the keys of :data:`FSDP_DEFAULTS` it lacks (under
    ``fsdp``), so that existing configs need no change and ``train.fsdp.enabled=True`` is an
    override like any other."""
    if train_cfg.get("fsdp") is None:
        train_cfg["fsdp"] = dict(FSDP_DEFAULTS)
        return
    for key, value in FSDP_DEFAULTS.items():
        if key not in train_cfg.fsdp:
            train_cfg.fsdp[key] = value


def fsdp_settings(train_cfg, amp_dtype: Optional[torch.dtype] = None) -> Optional[Dict[str, Any]]:
    """The ``fully_shard`` keyword arguments of ``train.fsdp``, or None when it is disabled.

    A setting that does not apply is one :class:`ToolError` line naming it: an unknown key of
    ``train.fsdp``, a ``mixed_precision`` other than ``"bf16"`` / None, a non-boolean
    ``enabled`` or ``reshard_after_forward`` (or False: see :data:`FSDP_DEFAULTS`), float16
    autocast (`amp_dtype`: its gradient scaler would skip steps on some processes and not on
    others; use bfloat16), and the DDP-only settings ``train.ddp.fp16_compression`` and
    ``find_unused_parameters``.
    """
    section = dict(train_cfg.get("fsdp") or {})
    unknown = sorted(set(section) - set(FSDP_DEFAULTS))
    if unknown:
        raise ToolError(f"unknown key(s) train.fsdp.{', train.fsdp.'.join(unknown)} (known: "
                        f"{', '.join(FSDP_DEFAULTS)})")
    for key in ("enabled", "reshard_after_forward"):
        if key in section and not isinstance(section[key], bool):
            raise ToolError(f"train.fsdp.{key} must be True or False, got {section[key]!r}")
    if not section.get("enabled", False):
        return None
    if section.get("reshard_after_forward") is False:
        raise ToolError("train.fsdp.reshard_after_forward=False does not apply: the reversible "
                        "engine releases each block's parameters right after its F and G and "
                        "gathers them again for the backward")
    mp = section.get("mixed_precision")
    if isinstance(mp, str) and mp.lower() in ("none", "null", "fp32", "float32"):
        mp = None
    if mp is not None and mp not in _MIXED_PRECISION:
        raise ToolError(f"train.fsdp.mixed_precision must be 'bf16' or None, got {mp!r}")
    if amp_dtype == torch.float16:
        raise ToolError("train.amp with float16 does not apply with train.fsdp.enabled=True (its "
                        "gradient scaler is per process); use bfloat16 autocast or "
                        "train.fsdp.mixed_precision=bf16")
    ddp = train_cfg.get("ddp") or {}
    for key, instead in (("fp16_compression", "the reduction dtype is set by "
                                              "train.fsdp.mixed_precision"),
                         ("find_unused_parameters", "FSDP2 needs no search for unused "
                                                    "parameters")):
        if ddp.get(key):
            raise ToolError(f"train.ddp.{key}=True does not apply with train.fsdp.enabled=True "
                            f"(DDP only: {instead})")
    kwargs = {"reshard_after_forward": bool(section.get("reshard_after_forward", True))}
    if mp is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_MIXED_PRECISION[mp],
                                                   reduce_dtype=torch.float32)
    return kwargs


def _one_process_group() -> None:
    """FSDP2 needs a process group; detectron2's ``launch`` makes none for one process (which
    can resume a sharded checkpoint written by several)."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    comm.create_local_process_group(1)


def _broadcast_from_first(model: nn.Module) -> None:
    """Every process's copy of `model` made equal to the first process's, as DDP does when it
    wraps a model: each process builds its model under its own seed, and FSDP2 would otherwise
    keep each process's own shard of a different initialisation."""
    if comm.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def shard_for_training(model: nn.Module, fsdp_kwargs: Dict[str, Any], device) -> nn.Module:
    """`model` (on `device`) sharded by :func:`revvit_d2.shard_model` with `fsdp_kwargs` over
    all processes (in place; returned), starting from the first process's weights (as DDP
    does). Build the optimizer afterwards. A model that cannot be
    sharded is one ToolError line. In a single process without a process group, one is made
    first. The mesh is on `device`'s type: FSDP2's default is the GPU whenever there is one,
    which would move a CPU run's model there."""
    _one_process_group()
    _broadcast_from_first(model)
    mesh = init_device_mesh(torch.device(device).type, (comm.get_world_size(),))
    try:
        shard_model(model, mesh=mesh, **fsdp_kwargs)
    except UserError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        raise ToolError(f"cannot shard the model (train.fsdp): {one_line(e)}") from None
    groups = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
    logger.info("FSDP2: %d parameter groups sharded over %d process(es) (%s)", groups,
                comm.get_world_size(), ", ".join(f"{k}={v}" for k, v in fsdp_kwargs.items()))
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages `model` (:func:`shard_for_training` made it the root)."""
    return isinstance(model, FSDPModule)


def unsharded_copy(sharded: nn.Module, fresh: nn.Module) -> nn.Module:
    """`fresh` (an unsharded model of the same architecture) with the full weights of
    `sharded`. A collective: call it on every process."""
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    fresh.load_state_dict(state)
    return fresh


_NOTHING = object()


def _split(tree):
    """``(tensors, rest)`` of a nested dict: its tensor leaves and its other leaves, each in the
    nesting of `tree` (lists are leaves); a missing half is ``_NOTHING``."""
    if isinstance(tree, torch.Tensor):
        return tree, _NOTHING
    if not isinstance(tree, dict):
        return _NOTHING, tree
    tensors, rest = {}, {}
    for key, value in tree.items():
        t, r = _split(value)
        if t is not _NOTHING:
            tensors[key] = t
        if r is not _NOTHING:
            rest[key] = r
    return (tensors if tensors or not rest else _NOTHING), (rest if rest else _NOTHING)


def _merge(tensors, rest):
    if rest is _NOTHING:
        return tensors
    if tensors is _NOTHING or not isinstance(rest, dict):
        return rest
    out = dict(tensors)
    for key, value in rest.items():
        out[key] = _merge(tensors.get(key, _NOTHING), value)
    return out


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


class _MainProcessFiles:
    """The ``path_manager`` through which detectron2's ``PeriodicCheckpointer`` deletes
    checkpoints beyond ``max_to_keep``: a sharded one is a directory; the main process removes
    it (every process runs the hook)."""

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def rm(path: str) -> None:
        if comm.is_main_process():
            _remove(path)


class ShardedCheckpointer:
    """Saves and loads sharded checkpoints of a model sharded by :func:`shard_for_training`
    and its optimizer (layout: the module docstring), with the state of `checkpointables`
    (e.g. ``trainer=``, ``seed=``: objects with ``state_dict`` / ``load_state_dict``).

    Every process calls :meth:`save` and :meth:`load` (``saves_on_all_processes``:
    :func:`~revvit_d2.training.training_hooks` registers the periodic checkpointer on every
    process). Loading works with any number of processes (DCP reshards the tensors); a
    trainer's per-process data position is only restored with the same number. The state file
    is read as data only and the DCP metadata with a restricted unpickler
    (:class:`~revvit_d2.utils.sharded_checkpoint.SafeShardedReader`) unless
    `allow_unsafe_pickle`. The interface is what detectron2's ``PeriodicCheckpointer`` and
    :func:`~revvit_d2.training.resume_from_checkpoint` use of a ``Checkpointer``.
    """

    saves_on_all_processes = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, save_dir: str,
                 allow_unsafe_pickle: bool = False, **checkpointables):
        self.model, self.optimizer = model, optimizer
        self.save_dir = save_dir
        self.allow_unsafe_pickle = bool(allow_unsafe_pickle)
        self.checkpointables = checkpointables
        self.path_manager = _MainProcessFiles()

    # -- save -----------------------------------------------------------------------------
    def _tensors_and_rest(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return _split({"model": model_sd, "optimizer": optim_sd})

    def save(self, name: str, **kwargs) -> None:
        final = os.path.join(self.save_dir, name)
        tmp = os.path.join(self.save_dir, TMP_PREFIX + name)
        if comm.is_main_process():
            _remove(tmp)  # of a save of the same name that was killed
            os.makedirs(tmp)
        comm.synchronize()
        tensors, rest = self._tensors_and_rest()
        dcp.save(tensors, checkpoint_id=tmp)
        if comm.is_main_process():
            state = {"optimizer": {} if rest is _NOTHING else rest.get("optimizer", {})}
            for key, obj in self.checkpointables.items():
                state[key] = obj.state_dict()
            # detectron2's trainers put the optimizer's state_dict in theirs: it is in the
            # tensors above, by parameter name.
            if isinstance(state.get("trainer"), dict):
                state["trainer"].pop("optimizer", None)
            state.update(kwargs)
            atomic_torch_save(state, os.path.join(tmp, SHARDED_STATE_FILE))
            logger.info("Saving sharded checkpoint to %s", final)
            old = os.path.join(self.save_dir, TMP_PREFIX + "old_" + name)
            if os.path.exists(final):  # e.g. model_final of an earlier run in this folder
                os.replace(final, old)
            os.replace(tmp, final)
            with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
                f.write(name)
            for entry in os.listdir(self.save_dir):  # left by saves that were killed
                if entry.startswith(TMP_PREFIX):
                    _remove(os.path.join(self.save_dir, entry))
        comm.synchronize()

    def get_checkpoint_file(self) -> str:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not os.path.isfile(tag):
            return ""
        with open(tag) as f:
            return os.path.join(self.save_dir, f.read().strip())

    def has_checkpoint(self) -> bool:
        return os.path.isfile(os.path.join(self.save_dir, "last_checkpoint"))

    # -- load -----------------------------------------------------------------------------
    def load(self, path: str, checkpointables=None) -> Dict[str, Any]:
        """Model, optimizer and the `checkpointables` (default: all) from sharded checkpoint
        `path`; returns its state file's dict. Any mismatch is one ToolError line."""
        if not is_sharded_checkpoint(path):
            raise ToolError(f"{path} is not a sharded checkpoint (no {METADATA_FILE}); a "
                            f"checkpoint file is resumed with train.fsdp.enabled=False")
        state = read_checked(os.path.join(path, SHARDED_STATE_FILE), require=("iteration",),
                             allow_unsafe_pickle=self.allow_unsafe_pickle)
        reader = SafeShardedReader(path, self.allow_unsafe_pickle)
        tensors, _ = self._tensors_and_rest()
        saved = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
        ours = {f"model.{k}" for k in tensors["model"]}
        if saved != ours:
            raise ToolError(f"sharded checkpoint {path} does not fit the model: missing "
                            f"{sorted(ours - saved)[:8]}, unexpected {sorted(saved - ours)[:8]}")
        try:
            dcp.load(tensors, storage_reader=reader)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ToolError(f"cannot load sharded checkpoint {path}: {one_line(e)}") from None
        full = _merge(tensors, {"optimizer": state.get("optimizer", {})})
        set_state_dict(self.model, self.optimizer, model_state_dict=full["model"],
                       optim_state_dict=full["optimizer"])
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key not in state:
                logger.warning("%s holds no %r state", path, key)
                continue
            value = state[key]
            if key == "trainer" and isinstance(value, dict):  # see save()
                value = dict(value, optimizer=self.optimizer.state_dict())
            self.checkpointables[key].load_state_dict(value)
        logger.info("loaded sharded checkpoint %s (%d processes now)", path,
                    comm.get_world_size())
        return state
