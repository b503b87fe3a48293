"""The reversible engine shared by every revvit model.

Reversible Vision Transformers, Mangalam et al., CVPR 2022 (https://arxiv.org/abs/2302.04869).

A reversible block holds two sub-functions, F (attention) and G (MLP), and maps two streams
(X1, X2) to (Y1, Y2)::

        X1 ─────────────(+)──────────────── Y1 ──────────────────┐
                         ▲                  │                    │
                         │ DP(F(.))         ▼ DP(G(.))           │
        X2 ──────────────┴──────────────── (+) ─────────────── Y2

    forward:  Y1 = X1 + DP(F(X2))        Y2 = X2 + DP(G(Y1))
    inverse:  X2 = Y2 - DP(G(Y1))        X1 = Y1 - DP(F(X2))

``RevBackProp`` runs a stack of such blocks without recording a graph, keeps only the last
block's two streams, and during backward rebuilds every block's inputs from its outputs while it
back-propagates through a locally recomputed F and G. Activation memory therefore does not grow
with depth.

Differences from the official SlowFast / mmpretrain engines (same arithmetic, other bookkeeping):

* Randomness is replayed by capturing and restoring RNG *state* (as ``torch.utils.checkpoint``
  does), never by re-seeding the global generator, and the backward leaves the global RNG
  exactly as it found it. The drop-path mask, which the official code shares between the F and
  G branch of a block, is stored (B numbers per block) instead of being re-drawn.
* Parameter gradients are returned through autograd (the parameters are inputs of the Function)
  instead of being accumulated into ``.grad`` by nested ``backward()`` calls, so gradient hooks,
  ``torch.autograd.grad`` and DDP's bucketed all-reduce see every gradient exactly once.
* The autocast state of the forward is restored for the recomputation.
* Blocks sharded with FSDP2 (:func:`~revvit_d2.modeling.sharding.shard_model`) are gathered
  around their F and G, released after them, the next one prefetched; their gradients are
  reduce-scattered into the sharded parameters block by block (:mod:`.gathering`).

The replay of a sub-block (RNG, autocast, mask) lives in :mod:`.replay`; the settings of a run
(reversible or plain backward, PaReprop schedule, re-anchoring, finiteness checks) arrive as one
:class:`~revvit_d2.modeling.options.EngineOptions`.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from .gathering import BlockGather, ShardedParamGrads, released_on_error
from .options import EngineOptions
from .parallel import parallel_backward
from .replay import (ParamGrads, RNGState, add_grad, apply_mask, autocast_state, backprop,
                     drop_path_mask, module_uses_rng, recompute_f, recompute_g)

__all__ = ["ReversibleBlock", "RevBackProp", "reversible_stack", "drop_path_mask",
           "compile_subblocks"]


class ReversibleBlock(nn.Module):
    """Two-stream reversible block ``Y1 = X1 + DP(F(X2)), Y2 = X2 + DP(G(Y1))``.

    Args:
        F (nn.Module): called as ``F(x, thw)``; ``thw`` is the (T, H, W) token grid of x.
            Must map (B, N, C) to (B, N, C).
        G (nn.Module): called as ``G(x)``, (B, N, C) to (B, N, C).
        drop_path_rate (float): stochastic depth rate. One per-sample mask is drawn per forward
            and applied to both branches, as in the official implementation.
    """

    def __init__(self, F: nn.Module, G: nn.Module, drop_path_rate: float = 0.0):
        super().__init__()
        self.F = F
        self.G = G
        self.drop_path_rate = float(drop_path_rate)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, thw: Sequence[int]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        mask = drop_path_mask(x1, self.drop_path_rate, self.training)
        y1 = x1 + apply_mask(self.F(x2, thw), mask)
        y2 = x2 + apply_mask(self.G(y1), mask)
        return y1, y2


def compile_subblocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the F and G of every :class:`ReversibleBlock` inside ``model``, in place.

    Only the sub-functions are compiled, never the engine: the reversible backward is an
    autograd Function whose backward calls ``torch.autograd.grad`` on locally recomputed graphs,
    which Dynamo cannot trace (it would break the graph around the whole stack). F and G are
    compiled with ``nn.Module.compile``, which keeps parameter names and the module tree as
    they are, so checkpoints, ``named_parameters`` and the engine's
    ``torch.func.functional_call`` on detached parameter aliases work unchanged. Dynamo treats
    the parameters as graph inputs, so the aliases and every block of the same shape reuse one
    compiled graph; one graph is built per (grad mode, autocast, training flag, shapes) seen:
    the forward runs F and G without grad, the backward recomputes them with grad.

    All blocks share one code object per sub-block class, so Dynamo's per-code recompile limit
    (default 8) is shared by every stage of a multi-stage model (Rev-MViT: 4 widths times those
    modes); past it Dynamo silently falls back to eager. The process-wide limits are therefore
    raised to 8 graphs per compiled sub-block (they only cap, they allocate nothing).

    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="aot_eager"``, ``mode=...``).
    Returns ``model``.
    """
    import torch._dynamo

    count = 0
    for m in model.modules():
        if isinstance(m, ReversibleBlock):
            m.F.compile(**compile_kwargs)
            m.G.compile(**compile_kwargs)
            count += 1
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * count)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * count)
    return model


def _check_finite(t: torch.Tensor, index: int, names: Optional[Sequence[str]]):
    if not torch.isfinite(t).all():
        name = names[index] if names is not None else f"block {index}"
        raise FloatingPointError(f"non-finite values in the output of {name} (first such block)")


class _Record:
    """What the forward keeps per block: drop-path mask and RNG snapshots (no activations)."""

    __slots__ = ("mask", "rng_f", "rng_g")

    def __init__(self, mask, rng_f, rng_g):
        self.mask = mask
        self.rng_f = rng_f
        self.rng_g = rng_g

    def samples(self, rows: slice) -> "_Record":
        """The record of some samples of the batch (no RNG: chunking refuses dropout)."""
        return _Record(self.mask[rows] if self.mask is not None else None, None, None)


class _RunSpec:
    """One reversible run: its blocks, token grid, trainable parameters, block names, options,
    and the gatherer of its FSDP-sharded blocks (None when no block is sharded)."""

    __slots__ = ("blocks", "thw", "params", "names", "options", "gather")

    def __init__(self, blocks, thw, params, names, options: EngineOptions, before=None,
                 after=None):
        self.blocks = blocks
        self.thw = thw
        self.params = params  # of a sharded block: its sharded parameters (DTensors)
        self.names = names
        self.options = options
        # before / after: the neighbouring runs' blocks, prefetched across the boundary
        self.gather = BlockGather.of(blocks, before, after)


class RevBackProp(torch.autograd.Function):
    """Memory-saving forward/backward over a run of :class:`ReversibleBlock`.

    Call through :func:`reversible_stack`. Inputs: the two streams, a ``_RunSpec`` with the
    blocks and settings, then the parameters that require grad (so that their gradients flow
    back through autograd). Outputs: the two final streams.
    """

    @staticmethod
    def forward(ctx, x1, x2, spec, *params):
        if spec.options.rev_backward_chunk:
            _refuse_dropout(spec)
        records: List[_Record] = []
        gather = spec.gather
        with released_on_error(gather):  # an error leaves no block gathered
            for i, blk in enumerate(spec.blocks):
                if gather is not None:  # F and G of a sharded block need its full parameters
                    gather.acquire(i, prefetch=i + 1)
                mask = drop_path_mask(x1, blk.drop_path_rate, blk.training)
                rng_f = RNGState(x1.device) if module_uses_rng(blk.F) else None
                x1 = x1 + apply_mask(blk.F(x2, spec.thw), mask)
                rng_g = RNGState(x1.device) if module_uses_rng(blk.G) else None
                x2 = x2 + apply_mask(blk.G(x1), mask)
                if gather is not None:
                    gather.release(i)
                if spec.options.check_finite:
                    _check_finite(x1, i, spec.names)
                    _check_finite(x2, i, spec.names)
                records.append(_Record(mask, rng_f, rng_g))
        ctx.spec = spec
        ctx.records = records
        ctx.autocast = autocast_state(x1.device.type)
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = (t.detach() for t in ctx.saved_tensors)
        if ctx.spec.gather is None:
            grads = ParamGrads(ctx.spec.params)
        else:
            grads = ShardedParamGrads(ctx.spec.params, ctx.spec.gather)
        schedule = parallel_backward if ctx.spec.options.parallel_backward else sequential_backward
        chunk = ctx.spec.options.rev_backward_chunk
        with released_on_error(ctx.spec.gather):
            if chunk <= 0 or chunk >= y1.shape[0]:
                dx1, dx2 = schedule(ctx.spec, ctx.records, ctx.autocast, y1, y2, dy1, dy2, grads)
            else:
                dx1, dx2 = _chunked(schedule, chunk, ctx.spec, ctx.records, ctx.autocast,
                                    y1, y2, dy1, dy2, grads)
        ctx.records = None
        return (dx1, dx2, None) + tuple(grads.grads)


def _chunked(schedule, chunk, spec, records, autocast, y1, y2, dy1, dy2, grads: ParamGrads):
    """The whole backward of the run, ``chunk`` samples at a time (backward micro-chunks).

    F and G act on every sample independently, so the samples' input gradients are separable
    and the parameter gradients are sums over samples; the working set (one block's graphs,
    rebuilt inputs, their gradients) is that of one chunk. Only the input gradients of the
    batch are allocated whole."""
    dx1, dx2 = torch.empty_like(y1), torch.empty_like(y2)
    for start in range(0, y1.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = [rec.samples(rows) for rec in records]
        c1, c2 = schedule(spec, part, autocast, y1[rows], y2[rows], dy1[rows], dy2[rows], grads)
        dx1[rows] = c1
        dx2[rows] = c2
    return dx1, dx2


def _refuse_dropout(spec):
    for i, blk in enumerate(spec.blocks):
        if module_uses_rng(blk.F) or module_uses_rng(blk.G):
            name = spec.names[i] if spec.names is not None else f"block {i}"
            raise ValueError(
                f"rev_backward_chunk={spec.options.rev_backward_chunk} cannot replay the dropout "
                f"active in {name} per chunk; set the model's dropout_rate to 0 or "
                f"rev_backward_chunk=0")


def sequential_backward(spec, records, autocast, y1, y2, dy1, dy2, grads: ParamGrads):
    """Walk the blocks backwards: rebuild each block's inputs from its outputs while
    back-propagating through the recomputed G, then F (one recomputation of each per block;
    at most one sub-block's graph alive at a time). A sharded block is gathered for its
    recomputation and released after its gradients; the next one's gather starts meanwhile."""
    gather = spec.gather
    for i in range(len(spec.blocks) - 1, -1, -1):
        blk, rec = spec.blocks[i], records[i]
        if gather is not None:
            gather.acquire(i, prefetch=i - 1)
        g_branch, x2 = recompute_g(blk, rec, autocast, y1, y2)
        dy1 = add_grad(dy1, backprop(g_branch, dy2, grads))  # dY1 total = dY1 + dG/dY1^T dY2
        del g_branch
        f_branch, x1 = recompute_f(blk, rec, autocast, spec.thw, x2, y1)
        dx2 = add_grad(dy2, backprop(f_branch, dy1, grads))
        del f_branch
        if gather is not None:
            gather.release(i)
        y1, y2, dy2 = x1, x2, dx2  # the rebuilt inputs are the previous block's outputs
    return dy1, dy2


def _trainable_params(blocks) -> List[nn.Parameter]:
    params, seen = [], set()
    for blk in blocks:
        for p in blk.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def reversible_stack(
    blocks: Sequence[ReversibleBlock],
    x1: torch.Tensor,
    x2: torch.Tensor,
    thw: Sequence[int],
    options: Optional[EngineOptions] = None,
    names: Optional[Sequence[str]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a sequence of reversible blocks on the streams (x1, x2).

    The memory-saving backward is used when ``options.use_rev_backprop`` is True and a graph is
    being recorded (grad mode on, and the input or some parameter requires grad). Otherwise
    (inference under ``torch.no_grad()``, or ``use_rev_backprop=False``) it is a plain loop over
    the blocks: same arithmetic, same random draws, ordinary autograd. With
    ``options.stored_blocks = k`` the last k blocks of ``blocks`` run under ordinary autograd
    after the reversible run of the others (a model translates its model-wide ``k`` into the
    share of each of its runs).

    Args:
        blocks: the run of blocks.
        x1, x2 (Tensor): the two input streams, (B, N, C) each.
        thw: token grid (T, H, W) passed to every ``F``.
        options (EngineOptions): the engine's settings (defaults: ``EngineOptions()``).
        names: block names used in the ``check_finite`` message.
    """
    options = options if options is not None else EngineOptions()
    thw = tuple(int(s) for s in thw)
    blocks = list(blocks)
    names = list(names) if names is not None else None
    done = 0  # blocks already run through the reversible engine
    if options.use_rev_backprop and torch.is_grad_enabled():
        n_rev = len(blocks) - min(options.stored_blocks, len(blocks))
        params = _trainable_params(blocks[:n_rev])
        if n_rev and (params or x1.requires_grad or x2.requires_grad):
            x1, x2 = _reversible_runs(blocks[:n_rev], x1, x2, thw, params, options,
                                      names[:n_rev] if names is not None else None)
            done = n_rev
    # Plain autograd: the stored blocks of the hybrid, use_rev_backprop=False, or no graph.
    checkpointing = (options.act_checkpoint and not options.use_rev_backprop
                     and torch.is_grad_enabled())
    for i in range(done, len(blocks)):
        if checkpointing:
            x1, x2 = torch.utils.checkpoint.checkpoint(blocks[i], x1, x2, thw,
                                                       use_reentrant=False)
        else:
            x1, x2 = blocks[i](x1, x2, thw)
        if options.check_finite:
            _check_finite(x1, i, names)
            _check_finite(x2, i, names)
    return x1, x2


def _reversible_runs(blocks, x1, x2, thw, params, options, names):
    """One :class:`RevBackProp` per chunk of ``rev_anchor_every`` blocks (all blocks if 0)."""
    step = options.rev_anchor_every if options.rev_anchor_every > 0 else len(blocks)
    for start in range(0, len(blocks), step):
        chunk = blocks[start:start + step]
        in_chunk = {id(q) for b in chunk for q in b.parameters()}
        chunk_params = [p for p in params if id(p) in in_chunk]
        after = blocks[start + step] if start + step < len(blocks) else None
        # the previous run's backward runs (and uses a prefetch) only if its output needs grad
        before = blocks[start - 1] if start > 0 and (x1.requires_grad or x2.requires_grad) else None
        spec = _RunSpec(chunk, thw, chunk_params,
                        names[start:start + step] if names is not None else None, options,
                        before, after)
        x1, x2 = RevBackProp.apply(x1, x2, spec, *chunk_params)
    return x1, x2
