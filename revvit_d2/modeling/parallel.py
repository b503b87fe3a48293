"""The parallel (PaReprop) schedule of the reversible backward.

PaReprop (Zhu & Mangalam, 2023), with no extra work: the recomputation of block i-1 *with* its
graph (G(Y1) and F(X2) on parameter aliases, which also rebuilds the block's inputs) runs while
block i's gradients are computed from the graphs built one step earlier. Every F and G is
evaluated once, as in the sequential backward (:func:`~.reversible.sequential_backward`);
memory holds one block's graphs more.

What overlaps and what cannot: block i-1's recomputation needs only block i's rebuilt inputs;
its gradient step needs dY of block i, and within a block dY1 must include the G branch's
gradient before F is back-propagated, so the gradient steps stay in order.

Autograd runs each backward op on the stream its forward op ran on, so a graph built on a side
stream is back-propagated there: the two streams (the caller's and one side stream per device,
reused across calls) swap roles every block. Block i is recomputed and back-propagated on one
stream while block i-1 is recomputed on the other; events order the hand-overs (rebuilt inputs,
dY) and ``record_stream`` keeps each handed-over tensor's memory until the receiving stream is
done with it. On a CPU, and on CUDA when the blocks are sharded with FSDP2 (docs/fsdp.md), the
same schedule runs in order.
"""
from typing import Dict

import torch

from .replay import ParamGrads, add_grad, backprop, recompute_f, recompute_g

__all__ = ["parallel_backward", "side_stream"]


class _Recomputed:
    """Block i recomputed: its inputs (X1, X2) and the graphs of G(Y1) and F(X2)."""

    __slots__ = ("g_branch", "f_branch", "x1", "x2", "stream", "done")

    def __init__(self, g_branch, f_branch, x1, x2, stream, done):
        self.g_branch, self.f_branch, self.x1, self.x2 = g_branch, f_branch, x1, x2
        self.stream, self.done = stream, done


def parallel_backward(spec, records, autocast, y1, y2, dy1, dy2, grads: ParamGrads):
    """(dX1, dX2) of a run from its outputs (y1, y2) and their gradients; adds the parameter
    gradients to ``grads``. Same signature and result as the sequential schedule."""
    blocks = spec.blocks
    n = len(blocks)
    gather = spec.gather
    # With sharded blocks the schedule runs in order on the caller's stream: FSDP2 frees a
    # block's gathered parameters on the stream that releases it, which must be the stream that
    # used them; the overlap is then the next block's all-gather (prefetch).
    cuda = y1.device.type == "cuda" and gather is None
    main = torch.cuda.current_stream(y1.device) if cuda else None
    streams = (main, side_stream(y1.device)) if main is not None else (None, None)
    accumulators = (grads, ParamGrads(spec.params) if main is not None else grads)

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
    if gather is not None:
        gather.acquire(n - 1, prefetch=n - 2)
    nxt = recompute(n - 1, y1, y2, start)
    ready = start  # the event after which dY of the current block is ready
    for i in range(n - 1, -1, -1):
        cur = nxt
        if i > 0:  # overlap: recompute block i-1 while block i's gradients are computed
            if gather is not None:  # at most 3 blocks gathered: i, i-1 and i-2 (prefetch)
                gather.acquire(i - 1, prefetch=i - 2)
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
        if gather is not None:
            gather.release(i)
    if main is not None:
        _join(main, streams[1], accumulators, (dy1, dy2))
    return dy1, dy2


def _recompute_block(spec, records, autocast, i, y1, y2):
    blk, rec = spec.blocks[i], records[i]
    g_branch, x2 = recompute_g(blk, rec, autocast, y1, y2)
    f_branch, x1 = recompute_f(blk, rec, autocast, spec.thw, x2, y1)
    return g_branch, f_branch, x1, x2


def _gradient_step(cur: _Recomputed, dy1, dy2, grads: ParamGrads):
    """(dX1, dX2) of a recomputed block from (dY1, dY2): G first, then F with the total dY1."""
    dy1 = add_grad(dy1, backprop(cur.g_branch, dy2, grads))
    cur.g_branch = None
    dx2 = add_grad(dy2, backprop(cur.f_branch, dy1, grads))
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


_SIDE_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The parallel backward's side stream of a CUDA device: one per device, made once and
    reused by every backward call and anchor chunk (each new stream would get its own
    allocator pool)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
