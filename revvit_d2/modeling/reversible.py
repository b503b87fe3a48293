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

The replay of a sub-block (RNG, autocast, mask) lives in :mod:`.replay`; the settings of a run
(reversible or plain backward, PaReprop schedule, re-anchoring, finiteness checks) arrive as one
:class:`~revvit_d2.modeling.options.EngineOptions`.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from .options import EngineOptions
from .replay import (RNGState, apply_mask, autocast_state, drop_path_mask, module_uses_rng,
                     recompute_with_graph)

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


class _RunSpec:
    """One reversible run: its blocks, token grid, trainable parameters, block names, options."""

    __slots__ = ("blocks", "thw", "params", "names", "options")

    def __init__(self, blocks, thw, params, names, options: EngineOptions):
        self.blocks = blocks
        self.thw = thw
        self.params = params
        self.names = names
        self.options = options


class _ParamGrads:
    """Sums the gradients of a run's parameters (a parameter may appear in several blocks)."""

    def __init__(self, params):
        self.index = {id(p): i for i, p in enumerate(params)}
        self.grads: List[Optional[torch.Tensor]] = [None] * len(params)

    def add(self, params, grads):
        for p, g in zip(params, grads):
            if g is not None:
                k = self.index[id(p)]
                self.grads[k] = g if self.grads[k] is None else self.grads[k] + g


class RevBackProp(torch.autograd.Function):
    """Memory-saving forward/backward over a run of :class:`ReversibleBlock`.

    Call through :func:`reversible_stack`. Inputs: the two streams, a ``_RunSpec`` with the
    blocks and settings, then the parameters that require grad (so that their gradients flow
    back through autograd). Outputs: the two final streams.
    """

    @staticmethod
    def forward(ctx, x1, x2, spec, *params):
        records: List[_Record] = []
        for i, blk in enumerate(spec.blocks):
            mask = drop_path_mask(x1, blk.drop_path_rate, blk.training)
            rng_f = RNGState(x1.device) if module_uses_rng(blk.F) else None
            x1 = x1 + apply_mask(blk.F(x2, spec.thw), mask)
            rng_g = RNGState(x1.device) if module_uses_rng(blk.G) else None
            x2 = x2 + apply_mask(blk.G(x1), mask)
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
        grads = _ParamGrads(ctx.spec.params)
        schedule = _parallel_backward if ctx.spec.options.parallel_backward else _sequential_backward
        dx1, dx2 = schedule(ctx.spec, ctx.records, ctx.autocast, y1, y2, dy1, dy2, grads)
        ctx.records = None
        return (dx1, dx2, None) + tuple(grads.grads)


class _Branch:
    """One recomputed sub-block with its small graph: ``out = DP(H(input))`` on parameter
    aliases; back-propagating through it gives the input's and the parameters' gradients."""

    __slots__ = ("out", "input", "leaves", "aliases")

    def __init__(self, out, input, leaves, aliases):
        self.out, self.input, self.leaves, self.aliases = out, input, leaves, aliases


def _recompute_g(blk, rec, autocast, y1, y2):
    """(G branch with its graph, X2 = Y2 - DP(G(Y1)))."""
    y1 = y1.detach().requires_grad_(True)
    out, leaves, aliases = recompute_with_graph(blk.G, rec.rng_g, rec.mask, autocast, y1)
    with torch.no_grad():
        x2 = y2 - out
    return _Branch(out, y1, leaves, aliases), x2


def _recompute_f(blk, rec, autocast, thw, x2, y1):
    """(F branch with its graph, X1 = Y1 - DP(F(X2)))."""
    x2 = x2.detach().requires_grad_(True)
    out, leaves, aliases = recompute_with_graph(blk.F, rec.rng_f, rec.mask, autocast, x2, thw)
    with torch.no_grad():
        x1 = y1.detach() - out
    return _Branch(out, x2, leaves, aliases), x1


def _backprop(branch: _Branch, dout, grads: _ParamGrads) -> Optional[torch.Tensor]:
    """Back-propagate ``dout`` through a recomputed branch; adds the parameter gradients to
    ``grads`` and returns the gradient of the branch input (None if it does not depend on it)."""
    g = torch.autograd.grad(branch.out, [branch.input] + branch.aliases, dout, allow_unused=True)
    grads.add(branch.leaves, g[1:])
    return g[0]


def _plus(a, b):
    if b is None:
        return a
    with torch.no_grad():
        return a + b


def _sequential_backward(spec, records, autocast, y1, y2, dy1, dy2, grads: _ParamGrads):
    """Walk the blocks backwards: rebuild each block's inputs from its outputs while
    back-propagating through the recomputed G, then F (one recomputation of each per block;
    at most one sub-block's graph alive at a time)."""
    for blk, rec in zip(reversed(spec.blocks), reversed(records)):
        g_branch, x2 = _recompute_g(blk, rec, autocast, y1, y2)
        dy1 = _plus(dy1, _backprop(g_branch, dy2, grads))  # dY1 total = dY1 + dG/dY1^T dY2
        del g_branch
        f_branch, x1 = _recompute_f(blk, rec, autocast, spec.thw, x2, y1)
        dx2 = _plus(dy2, _backprop(f_branch, dy1, grads))
        del f_branch
        y1, y2, dy2 = x1, x2, dx2  # the rebuilt inputs are the previous block's outputs
    return dy1, dy2


class _Recomputed:
    """Block i recomputed: its inputs (X1, X2) and the graphs of G(Y1) and F(X2)."""

    __slots__ = ("g_branch", "f_branch", "x1", "x2", "stream", "done")

    def __init__(self, g_branch, f_branch, x1, x2, stream, done):
        self.g_branch, self.f_branch, self.x1, self.x2 = g_branch, f_branch, x1, x2
        self.stream, self.done = stream, done


def _parallel_backward(spec, records, autocast, y1, y2, dy1, dy2, grads: _ParamGrads):
    """PaReprop schedule (Zhu & Mangalam, 2023), with no extra work: the recomputation of
    block i-1 *with* its graph (G(Y1) and F(X2) on parameter aliases, which also rebuilds the
    block's inputs) runs while block i's gradients are computed from the graphs built one step
    earlier. Every F and G is evaluated once, as in the sequential backward; memory holds one
    block's graphs more.

    What overlaps and what cannot: block i-1's recomputation needs only block i's rebuilt
    inputs; its gradient step needs dY of block i, and within a block dY1 must include the G
    branch's gradient before F is back-propagated, so the gradient steps stay in order.

    Autograd runs each backward op on the stream its forward op ran on, so a graph built on a
    side stream is back-propagated there: the two streams (the caller's and one side stream per
    device, reused across calls) swap roles every block. Block i is recomputed and
    back-propagated on one stream while block i-1 is recomputed on the other; events order the
    hand-overs (rebuilt inputs, dY) and ``record_stream`` keeps each handed-over tensor's memory
    until the receiving stream is done with it. On a CPU the same schedule runs in order.
    """
    blocks = spec.blocks
    n = len(blocks)
    main = torch.cuda.current_stream(y1.device) if y1.device.type == "cuda" else None
    streams = (main, _side_stream(y1.device)) if main is not None else (None, None)
    accumulators = (grads, _ParamGrads(spec.params) if main is not None else grads)

    def recompute(i, a1, a2, after):
        """Block i's graphs and inputs from its outputs (a1, a2), on its stream."""
        stream = streams[(n - 1 - i) % 2]
        if stream is None:
            return _Recomputed(*_recompute_block(spec, records, autocast, i, a1, a2), None, None)
        stream.wait_event(after)
        for t in (a1, a2):
            t.record_stream(stream)
        with torch.cuda.stream(stream):
            parts = _recompute_block(spec, records, autocast, i, a1, a2)
            done = stream.record_event()
        return _Recomputed(*parts, stream, done)

    start = main.record_event() if main is not None else None
    nxt = recompute(n - 1, y1, y2, start)
    ready = start  # the event after which dY of the current block is ready
    for i in range(n - 1, -1, -1):
        cur = nxt
        if i > 0:  # overlap: recompute block i-1 while block i's gradients are computed
            nxt = recompute(i - 1, cur.x1, cur.x2, cur.done)
        acc = accumulators[(n - 1 - i) % 2]
        if cur.stream is None:
            dy1, dy2 = _gradient_step(cur, dy1, dy2, acc)
        else:
            cur.stream.wait_event(ready)
            for t in (dy1, dy2):
                t.record_stream(cur.stream)
            with torch.cuda.stream(cur.stream):
                dy1, dy2 = _gradient_step(cur, dy1, dy2, acc)
                ready = cur.stream.record_event()
        del cur
    if main is not None:
        _join(main, streams[1], accumulators, (dy1, dy2))
    return dy1, dy2


def _recompute_block(spec, records, autocast, i, y1, y2):
    blk, rec = spec.blocks[i], records[i]
    g_branch, x2 = _recompute_g(blk, rec, autocast, y1, y2)
    f_branch, x1 = _recompute_f(blk, rec, autocast, spec.thw, x2, y1)
    return g_branch, f_branch, x1, x2


def _gradient_step(cur: _Recomputed, dy1, dy2, grads: _ParamGrads):
    """(dX1, dX2) of a recomputed block from (dY1, dY2): G first, then F with the total dY1."""
    dy1 = _plus(dy1, _backprop(cur.g_branch, dy2, grads))
    cur.g_branch = None
    dx2 = _plus(dy2, _backprop(cur.f_branch, dy1, grads))
    cur.f_branch = None
    return dy1, dx2


def _join(main, side, accumulators, outputs):
    """Back on the caller's stream: wait for the side stream, keep its tensors alive for the
    caller's stream, and add the side stream's parameter gradients to the caller's."""
    main.wait_stream(side)
    grads, side_grads = accumulators
    for t in outputs:
        t.record_stream(main)
    for k, g in enumerate(side_grads.grads):
        if g is not None:
            g.record_stream(main)
            grads.grads[k] = g if grads.grads[k] is None else grads.grads[k] + g


_SIDE_STREAMS = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The parallel backward's side stream of a CUDA device: one per device, made once and
    reused by every backward call and anchor chunk (each new stream would get its own
    allocator pool)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


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
    the blocks: same arithmetic, same random draws, ordinary autograd.

    Args:
        blocks: the run of blocks.
        x1, x2 (Tensor): the two input streams, (B, N, C) each.
        thw: token grid (T, H, W) passed to every ``F``.
        options (EngineOptions): the engine's settings (defaults: ``EngineOptions()``).
        names: block names used in the ``check_finite`` message.
    """
    options = options if options is not None else EngineOptions()
    thw = tuple(int(s) for s in thw)
    if options.use_rev_backprop and torch.is_grad_enabled():
        params = _trainable_params(blocks)
        if params or x1.requires_grad or x2.requires_grad:
            return _reversible_runs(list(blocks), x1, x2, thw, params, options, names)
    checkpointing = options.act_checkpoint and torch.is_grad_enabled()
    for i, blk in enumerate(blocks):
        if checkpointing:
            x1, x2 = torch.utils.checkpoint.checkpoint(blk, x1, x2, thw, use_reentrant=False)
        else:
            x1, x2 = blk(x1, x2, thw)
        if options.check_finite:
            _check_finite(x1, i, names)
            _check_finite(x2, i, names)
    return x1, x2


def _reversible_runs(blocks, x1, x2, thw, params, options, names):
    """One :class:`RevBackProp` per chunk of ``rev_anchor_every`` blocks (all blocks if 0)."""
    names = list(names) if names is not None else None
    step = options.rev_anchor_every if options.rev_anchor_every > 0 else len(blocks)
    for start in range(0, len(blocks), step):
        chunk = blocks[start:start + step]
        in_chunk = {id(q) for b in chunk for q in b.parameters()}
        chunk_params = [p for p in params if id(p) in in_chunk]
        spec = _RunSpec(chunk, thw, chunk_params,
                        names[start:start + step] if names is not None else None, options)
        x1, x2 = RevBackProp.apply(x1, x2, spec, *chunk_params)
    return x1, x2
