"""Sharded (FSDP2) training of reversible models: :func:`shard_model`.

``shard_model(model)`` applies PyTorch's ``fully_shard`` to every reversible block, to every
Rev-MViT stage transition, then to the whole model (the stem, position embeddings, norms and
head form the root's group). Parameters, gradients and optimizer state are then split across
the processes; the reversible engine gathers each block's parameters for its F and G (in the
forward and again for the recomputation of the backward) and reduce-scatters their gradients
block by block (:mod:`.gathering`). See docs/fsdp.md.
"""
import inspect
from typing import Dict, List, Optional

import torch.distributed as dist
from torch import nn

from .gathering import FSDPModule, set_reduce_dtype
from .rev_mvit import StageTransitionBlock
from .reversible import ReversibleBlock

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch built without distributed support
    fully_shard = None

__all__ = ["shard_model"]


def shard_model(model: nn.Module, mesh=None, **fully_shard_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2 so that its reversible engine trains it; returns ``model``.

    ``fully_shard`` is applied, bottom-up, to each :class:`~.reversible.ReversibleBlock`
    (one all-gather / reduce-scatter group per block), to each Rev-MViT stage transition (run
    through its own ``forward``, so FSDP2's hooks gather it), and to ``model`` itself. Works for
    any module containing reversible blocks: ``RevViT``, ``RevMViT`` (image and video), the
    video classifiers of ``revvit_video`` and the Detectron2 backbones or whole detectors.

    Args:
        model (nn.Module): the model, on its device, not sharded yet; a reversible block's
            parameters must belong to that block only.
        mesh (DeviceMesh, optional): the data-parallel mesh (1-D: FSDP, 2-D: HSDP); default
            FSDP2's: every process of the default group, on the accelerator if there is one
            (pass ``init_device_mesh("cpu", (world,))`` to train on CPUs of a GPU machine).
        **fully_shard_kwargs: the other keyword arguments of ``fully_shard``, applied to every
            group: ``mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32)``, ``shard_placement_fn``, ``ignored_params`` (not
            reduced, as in FSDP2). ``reshard_after_forward`` may only be None or True (the engine
            releases every block right after its F and G); a ``CPUOffloadPolicy`` and
            ``dp_mesh_dims`` are refused.

    Raises:
        ValueError: one line naming what cannot be sharded or which setting does not apply.
    """
    if fully_shard is None:  # pragma: no cover
        raise RuntimeError("shard_model needs a torch built with torch.distributed")
    _check_kwargs(fully_shard_kwargs)
    _check_model(model)
    if mesh is None and not dist.is_initialized():
        raise ValueError("shard_model needs torch.distributed.init_process_group() first, or a "
                         "mesh")
    policy = fully_shard_kwargs.get("mp_policy")
    reduce_dtype = policy.reduce_dtype if policy is not None else None
    kwargs = dict(fully_shard_kwargs, mesh=mesh)
    for m in model.modules():
        if isinstance(m, ReversibleBlock):
            fully_shard(m, **kwargs)
            set_reduce_dtype(m, reduce_dtype)
        elif isinstance(m, StageTransitionBlock):
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _check_kwargs(kwargs: Dict) -> None:
    accepted = [n for n in inspect.signature(fully_shard).parameters if n not in ("module",
                                                                                   "mesh")]
    for name in kwargs:
        if name not in accepted:
            raise ValueError(f"shard_model: fully_shard takes no argument {name!r} (it takes "
                             f"mesh, {', '.join(accepted)})")
    reshard = kwargs.get("reshard_after_forward")
    if reshard is not None and reshard is not True:
        raise ValueError(
            f"shard_model: reshard_after_forward={reshard!r} cannot apply: the reversible engine "
            f"releases each block's parameters right after its F and G and gathers them again "
            f"for the backward; use None or True")
    offload = kwargs.get("offload_policy")
    if offload is not None and type(offload).__name__ != "OffloadPolicy":
        raise ValueError(f"shard_model: offload_policy={type(offload).__name__}() is not "
                         f"supported by the reversible engine (its gradients are made on the "
                         f"compute device)")
    if kwargs.get("dp_mesh_dims") is not None:
        raise ValueError("shard_model: dp_mesh_dims (parameters already DTensors on an SPMD "
                         "mesh) is not supported; pass a data-parallel mesh")


def _check_model(model: nn.Module) -> None:
    """Refuse what cannot be sharded: an FSDP module inside, no reversible block, a parameter
    of a block or transition that appears elsewhere too."""
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            raise ValueError(f"shard_model: the model is already sharded ("
                             f"{name or type(m).__name__} is an FSDP module)")
    units = {}  # module name -> reversible block or stage transition
    for name, m in model.named_modules():
        if isinstance(m, (ReversibleBlock, StageTransitionBlock)):
            units[name] = m
    blocks = [n for n, m in units.items() if isinstance(m, ReversibleBlock)]
    if not blocks:
        raise ValueError(f"shard_model: {type(model).__name__} contains no ReversibleBlock "
                         f"(nothing for the reversible engine to shard)")
    owners: Dict[int, List[str]] = {}  # id(parameter) -> the names it appears under
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for names in owners.values():
        if len(names) < 2:
            continue
        unit_of = [_unit(n, units) for n in names]
        if len(set(unit_of)) > 1 and any(u is not None for u in unit_of):
            raise ValueError(f"shard_model: parameter {names[0]} is shared with {names[1]}; a "
                             f"sharded block's parameters must belong to that block only")


def _unit(param_name: str, units: Dict[str, nn.Module]) -> Optional[str]:
    """The block or transition whose sub-tree holds ``param_name`` (None: the root's group)."""
    best = None
    for name in units:
        if param_name.startswith(name + ".") and (best is None or len(name) > len(best)):
            best = name
    return best
