"""The reversible engine's side of FSDP2: gathering a sharded block's parameters around the
engine's own calls of its F and G, and turning the gradients of the gathered (full) parameters
into gradients of the sharded ones.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a module's parameters in hooks around its
``forward``. The reversible engine never calls a block's ``forward``: it calls ``blk.F`` and
``blk.G`` directly, in its forward and again in its backward to recompute them. Without help, F
and G would run on the sharded parameters (DTensors) and fail. :class:`BlockGather` gathers a
block with the public ``FSDPModule.unshard()`` before its F and G, releases it with
``reshard()`` right after, and starts the all-gather of the next block
(``unshard(async_op=True)``) while the current one computes. :class:`ShardedParamGrads` maps each
full gradient to its sharded parameter and reduce-scatters it at once (``DTensor`` with a
``Partial("avg")`` placement redistributed to the parameter's placements: FSDP2's averaging
reduce-scatter through the public DTensor API), so that full gradients exist for one branch at a
time. Blocks that are not FSDP modules pass through untouched. See docs/fsdp.md.
"""
import contextlib
import weakref
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .replay import ParamGrads

try:  # torch built without distributed support: nothing can be sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = Partial = None

__all__ = ["is_sharded", "set_reduce_dtype", "BlockGather", "ShardedParamGrads",
           "to_sharded_grad", "released_on_error"]

# Block -> the mixed-precision reduce dtype it was sharded with (shard_model records it; FSDP2
# keeps it in private state). Weak keys: the entry goes with the module.
_REDUCE_DTYPES: "weakref.WeakKeyDictionary[nn.Module, Optional[torch.dtype]]" = (
    weakref.WeakKeyDictionary())
# Block -> handle of its all-gather in flight. Shared by the runs: the last block of one
# ``rev_anchor_every`` chunk prefetches the first of the next (and the backward, the other way).
_PENDING: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def is_sharded(module: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``module`` itself."""
    return FSDPModule is not None and isinstance(module, FSDPModule)


def set_reduce_dtype(module: nn.Module, dtype: Optional[torch.dtype]) -> None:
    """Record the ``MixedPrecisionPolicy.reduce_dtype`` a block was sharded with (None: reduce
    in the gradient's own dtype, as FSDP2 does without one)."""
    _REDUCE_DTYPES[module] = dtype


def to_sharded_grad(grad: torch.Tensor, param: torch.Tensor,
                    reduce_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The full gradient ``grad`` (this process's, of the gathered parameter) as the averaged,
    sharded gradient of the sharded parameter ``param`` (a DTensor): FSDP2's reduce-scatter."""
    if reduce_dtype is not None:
        grad = grad.to(reduce_dtype)
    mesh = param.device_mesh
    full = DTensor.from_local(grad, mesh, [Partial("avg")] * mesh.ndim, run_check=False)
    return full.redistribute(mesh, param.placements).to(param.dtype)


class BlockGather:
    """Gathers and releases the sharded blocks of one reversible run, one block ahead.

    Built from the run's blocks while they are sharded (it records each sharded block's
    parameters by name, the ones autograd sees). ``acquire(i, prefetch=j)`` makes block i's
    full parameters available (waiting for its prefetch if one is pending) and starts the
    all-gather of block j; j = -1 and j = len(blocks) are the blocks ``before`` and ``after``
    the run (the neighbouring runs of a re-anchored stack), if given. ``release(i)`` frees
    block i's full parameters. ``sharded_of`` maps a full parameter of a gathered block to its
    sharded parameter.
    """

    def __init__(self, blocks: Sequence[nn.Module], before: Optional[nn.Module] = None,
                 after: Optional[nn.Module] = None):
        self.blocks = list(blocks)
        self.before = before if before is not None and is_sharded(before) else None
        self.after = after if after is not None and is_sharded(after) else None
        self.sharded: List[Optional[Dict[str, torch.Tensor]]] = []
        for blk in self.blocks:
            if is_sharded(blk):
                params = dict(blk.named_parameters())
                # (a parameter in fully_shard's ignored_params stays a plain tensor)
                if params and not any(isinstance(p, DTensor) for p in params.values()):
                    raise RuntimeError(
                        f"a sharded {type(blk).__name__} enters the reversible run gathered "
                        f"(an unshard() without reshard()?): its parameters must be sharded")
                self.sharded.append(params)
            else:
                self.sharded.append(None)
        self._full_to_sharded: Dict[int, torch.Tensor] = {}
        self._owned_ids: Dict[int, List[int]] = {}

    @classmethod
    def of(cls, blocks: Sequence[nn.Module], before: Optional[nn.Module] = None,
           after: Optional[nn.Module] = None) -> Optional["BlockGather"]:
        """A gatherer for ``blocks``, or None when none of them is sharded."""
        if any(is_sharded(b) for b in blocks):
            return cls(blocks, before, after)
        return None

    def _sharded_block(self, j: int) -> Optional[nn.Module]:
        if j == -1:
            return self.before
        if j == len(self.blocks):
            return self.after
        if 0 <= j < len(self.blocks) and self.sharded[j] is not None:
            return self.blocks[j]
        return None

    def acquire(self, i: int, prefetch: Optional[int] = None) -> None:
        if self.sharded[i] is not None:
            blk = self.blocks[i]
            handle = _PENDING.pop(blk, None)
            if handle is not None:
                handle.wait()
            # A no-op after the wait, unless FSDP2 dropped the prefetch meanwhile (its end of
            # backward discards an all-gather nobody waited for): then it gathers now.
            blk.unshard()
            ids = []
            for name, full in self.blocks[i].named_parameters():
                self._full_to_sharded[id(full)] = self.sharded[i][name]
                ids.append(id(full))
            self._owned_ids[i] = ids
        target = self._sharded_block(prefetch) if prefetch is not None else None
        if target is not None and target not in _PENDING:
            _PENDING[target] = target.unshard(async_op=True)

    def release(self, i: int) -> None:
        if self.sharded[i] is not None:
            for k in self._owned_ids.pop(i, ()):
                self._full_to_sharded.pop(k, None)
            self.blocks[i].reshard()

    def abort(self) -> None:
        """After an error inside the run: finish the all-gathers in flight and release every
        block, so that the blocks are sharded again for the next step."""
        self._full_to_sharded.clear()
        self._owned_ids.clear()
        mine = [b for b, named in zip(self.blocks, self.sharded) if named is not None]
        for blk in mine + [b for b in (self.before, self.after) if b is not None]:
            handle = _PENDING.pop(blk, None)
            if handle is not None:
                handle.wait()
            blk.reshard()

    def sharded_of(self, param: torch.Tensor) -> torch.Tensor:
        """The sharded parameter of a gathered block's full parameter; ``param`` itself when it
        belongs to a block that is not sharded."""
        return self._full_to_sharded.get(id(param), param)


@contextlib.contextmanager
def released_on_error(gather: Optional[BlockGather]):
    """Context of a run's forward or backward: on an exception, :meth:`BlockGather.abort`."""
    try:
        yield
    except BaseException:
        if gather is not None:
            gather.abort()
        raise


class ShardedParamGrads(ParamGrads):
    """:class:`~.replay.ParamGrads` of a run whose ``params`` are the sharded parameters: each
    full gradient handed in is reduce-scattered into its sharded parameter's gradient at once."""

    def __init__(self, params, gather: BlockGather):
        super().__init__(params)
        self.gather = gather
        self._reduce = {}  # id(sharded param) -> reduce dtype
        for blk, named in zip(gather.blocks, gather.sharded):
            if named is not None:
                for p in named.values():
                    self._reduce[id(p)] = _REDUCE_DTYPES.get(blk)

    def add(self, params, grads):
        sharded, reduced = [], []
        for p, g in zip(params, grads):
            sp = self.gather.sharded_of(p)
            if g is not None and sp is not p and DTensor is not None and isinstance(sp, DTensor):
                g = to_sharded_grad(g, sp, self._reduce.get(id(sp)))
            sharded.append(sp)
            reduced.append(g)
        super().add(sharded, reduced)
