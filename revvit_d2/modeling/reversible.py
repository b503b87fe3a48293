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
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.func
import torch.utils.checkpoint
from torch import nn

__all__ = ["ReversibleBlock", "RevBackProp", "reversible_stack", "drop_path_mask",
           "compile_subblocks"]


def drop_path_mask(x: torch.Tensor, drop_prob: float, training: bool) -> Optional[torch.Tensor]:
    """Per-sample stochastic-depth mask, already divided by the keep probability.

    Returns None when drop path is inactive. The mask has shape (B, 1, ..., 1) and is drawn
    exactly as the official ``drop_path`` does: ``floor(keep + U[0, 1))``.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = keep + torch.rand(shape, dtype=x.dtype, device=x.device)
    mask.floor_()
    return mask.div_(keep)


def _apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask


class _RNGState:
    """Snapshot of the CPU generator and, for CUDA tensors, the current device's generator."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def fork(self):
        """Context in which the generators are set to this snapshot; restored on exit."""
        devices = [self.device] if self.cuda is not None else []
        return _ForkedRNG(self, devices)


class _ForkedRNG:
    def __init__(self, state: _RNGState, devices):
        self.state = state
        self.ctx = torch.random.fork_rng(devices=devices, enabled=True)

    def __enter__(self):
        self.ctx.__enter__()
        torch.set_rng_state(self.state.cpu)
        if self.state.cuda is not None:
            torch.cuda.set_rng_state(self.state.cuda, self.state.device)

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _module_uses_rng(module: nn.Module) -> bool:
    """True when `module` draws random numbers in its current mode (active dropout)."""
    if not module.training:
        return False
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if getattr(m, "uses_rng", False):
            return True
    return False


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
        y1 = x1 + _apply_mask(self.F(x2, thw), mask)
        y2 = x2 + _apply_mask(self.G(y1), mask)
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
            rng_f = _RNGState(x1.device) if _module_uses_rng(blk.F) else None
            x1 = x1 + _apply_mask(blk.F(x2, spec.thw), mask)
            rng_g = _RNGState(x1.device) if _module_uses_rng(blk.G) else None
            x2 = x2 + _apply_mask(blk.G(x1), mask)
            if spec.check_finite:
                _check_finite(x1, i, spec.names)
                _check_finite(x2, i, spec.names)
            records.append(_Record(mask, rng_f, rng_g))
        ctx.spec = spec
        ctx.records = records
        ctx.autocast = _autocast_state(x1.device.type)
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        if ctx.spec.parallel:
            return _parallel_backward(ctx, dy1, dy2)
        spec = ctx.spec
        y1, y2 = ctx.saved_tensors
        y1, y2 = y1.detach(), y2.detach()
        param_index = {id(p): i for i, p in enumerate(spec.params)}
        param_grads: List[Optional[torch.Tensor]] = [None] * len(spec.params)

        def accumulate(params, grads):
            for p, g in zip(params, grads):
                if g is None:
                    continue
                k = param_index[id(p)]
                param_grads[k] = g if param_grads[k] is None else param_grads[k] + g

        device_type, autocast_enabled, autocast_dtype = ctx.autocast

        def recompute(module, rng, mask, *args):
            # Run `module` on detached aliases of its trainable parameters, so the local graph
            # never reaches the real leaves: their hooks fire once, when autograd receives the
            # gradients this Function returns.
            names, leaves = [], []
            for name, p in module.named_parameters():
                if p.requires_grad:
                    names.append(name)
                    leaves.append(p)
            aliases = [p.detach().requires_grad_(True) for p in leaves]
            with torch.enable_grad(), _maybe_fork(rng), torch.autocast(
                device_type, dtype=autocast_dtype, enabled=autocast_enabled
            ):
                out = torch.func.functional_call(module, dict(zip(names, aliases)), args)
                out = _apply_mask(out, mask)
            return out, leaves, aliases

        for blk, rec in zip(reversed(spec.blocks), reversed(ctx.records)):
            # G branch: recompute DP(G(Y1)) and back-propagate dY2 through it.
            y1 = y1.requires_grad_(True)
            g_out, leaves, aliases = recompute(blk.G, rec.rng_g, rec.mask, y1)
            grads = torch.autograd.grad(g_out, [y1] + aliases, dy2, allow_unused=True)
            accumulate(leaves, grads[1:])
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 + grads[0] if grads[0] is not None else dy1
            del g_out, grads

            # F branch: recompute DP(F(X2)) and back-propagate the total dY1 through it.
            x2 = x2.detach().requires_grad_(True)
            f_out, leaves, aliases = recompute(blk.F, rec.rng_f, rec.mask, x2, spec.thw)
            grads = torch.autograd.grad(f_out, [x2] + aliases, dy1, allow_unused=True)
            accumulate(leaves, grads[1:])
            with torch.no_grad():
                x1 = y1.detach() - f_out
                dx2 = dy2 + grads[0] if grads[0] is not None else dy2
            del f_out, grads

            # The rebuilt inputs are the previous block's outputs.
            y1, y2 = x1.detach(), x2.detach()
            dy2 = dx2
        ctx.records = None
        return (dy1, dy2, None) + tuple(param_grads)


def _autocast_state(device_type: str):
    if device_type not in ("cuda", "cpu"):
        return device_type, False, None
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return device_type, enabled, dtype


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _maybe_fork(rng: Optional[_RNGState]):
    return rng.fork() if rng is not None else _NullContext()


def _trainable(module):
    """(names, parameters) of the parameters of `module` that require grad."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _run_recorded(module, rng, mask, autocast_state, *args):
    """Call `module` with the forward's RNG state and autocast state, then apply the mask."""
    device_type, enabled, dtype = autocast_state
    with _maybe_fork(rng), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return _apply_mask(module(*args), mask)


def _parallel_backward(ctx, dy1, dy2):
    """PaReprop schedule (Zhu & Mangalam, 2023): while the main stream computes block i's
    gradients from its (already rebuilt) inputs, a side stream inverts block i-1, so the
    inversion's cost hides behind the gradient work. Events order the two streams. On a CPU
    the same schedule runs sequentially (useful only to test it).

    Compared with the sequential backward it computes F and G once more per block (the
    inversion has no graph; the gradient step re-runs the block forward with one), trading
    FLOPs for overlap.
    """
    spec = ctx.spec
    y1, y2 = (t.detach() for t in ctx.saved_tensors)
    autocast_state = ctx.autocast
    records = ctx.records
    blocks = spec.blocks
    device = y1.device
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    side = torch.cuda.Stream(device) if cuda else None

    param_index = {id(p): i for i, p in enumerate(spec.params)}
    param_grads: List[Optional[torch.Tensor]] = [None] * len(spec.params)

    def invert(i, a1, a2):
        """Inputs of block i from its outputs (no graph), on the side stream."""
        blk, rec = blocks[i], records[i]
        with torch.no_grad():
            x2 = a2 - _run_recorded(blk.G, rec.rng_g, rec.mask, autocast_state, a1)
            x1 = a1 - _run_recorded(blk.F, rec.rng_f, rec.mask, autocast_state, x2, spec.thw)
        return x1, x2

    def launch_inversion(i, a1, a2):
        if not cuda:
            return invert(i, a1, a2), None
        side.wait_stream(main)  # a1, a2 and everything before are ready on the main stream
        with torch.cuda.stream(side):
            out = invert(i, a1, a2)
            event = torch.cuda.Event()
            event.record(side)
        for t in out:
            t.record_stream(main)  # used on the main stream later: keep the memory alive
        return out, event

    inputs, event = launch_inversion(len(blocks) - 1, y1, y2)
    for i in range(len(blocks) - 1, -1, -1):
        if event is not None:
            main.wait_event(event)
        x1, x2 = inputs
        if i > 0:  # overlap: invert block i-1 while block i's gradients are computed
            inputs, event = launch_inversion(i - 1, x1, x2)
        blk, rec = blocks[i], records[i]
        names_f, leaves_f = _trainable(blk.F)
        names_g, leaves_g = _trainable(blk.G)
        alias_f = [p.detach().requires_grad_(True) for p in leaves_f]
        alias_g = [p.detach().requires_grad_(True) for p in leaves_g]
        with torch.enable_grad():
            a1 = x1.detach().requires_grad_(True)
            a2 = x2.detach().requires_grad_(True)
            f_mod = lambda *args: torch.func.functional_call(  # noqa: E731
                blk.F, dict(zip(names_f, alias_f)), args)
            g_mod = lambda *args: torch.func.functional_call(  # noqa: E731
                blk.G, dict(zip(names_g, alias_g)), args)
            b1 = a1 + _run_recorded(f_mod, rec.rng_f, rec.mask, autocast_state, a2, spec.thw)
            b2 = a2 + _run_recorded(g_mod, rec.rng_g, rec.mask, autocast_state, b1)
        grads = torch.autograd.grad((b1, b2), [a1, a2] + alias_f + alias_g, (dy1, dy2),
                                    allow_unused=True)
        for p, g in zip(list(leaves_f) + list(leaves_g), grads[2:]):
            if g is not None:
                k = param_index[id(p)]
                param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
        dy1 = grads[0] if grads[0] is not None else torch.zeros_like(x1)
        dy2 = grads[1] if grads[1] is not None else torch.zeros_like(x2)
        del b1, b2, grads
    ctx.records = None
    return (dy1, dy2, None) + tuple(param_grads)


class _RunSpec:
    __slots__ = ("blocks", "thw", "params", "check_finite", "names", "parallel")

    def __init__(self, blocks, thw, params, check_finite, names, parallel=False):
        self.blocks = blocks
        self.thw = thw
        self.params = params
        self.check_finite = check_finite
        self.names = names
        self.parallel = parallel


def reversible_stack(
    blocks: Sequence[ReversibleBlock],
    x1: torch.Tensor,
    x2: torch.Tensor,
    thw: Sequence[int],
    use_rev_backprop: bool = True,
    check_finite: bool = False,
    names: Optional[Sequence[str]] = None,
    act_checkpoint: bool = False,
    parallel_backward: bool = False,
    anchor_every: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a sequence of reversible blocks on the streams (x1, x2).

    The memory-saving backward is used when ``use_rev_backprop`` is True and a graph is being
    recorded (grad mode on, and the input or some parameter requires grad). Otherwise (inference
    under ``torch.no_grad()``, or ``use_rev_backprop=False``) it is a plain loop over the blocks:
    same arithmetic, same random draws, ordinary autograd.

    Args:
        blocks: the run of blocks.
        x1, x2 (Tensor): the two input streams, (B, N, C) each.
        thw: token grid (T, H, W) passed to every ``F``.
        use_rev_backprop (bool): use the reversible backward.
        check_finite (bool): raise FloatingPointError naming the first block whose output is not
            finite (costs a device sync per block).
        names: block names used in that message.
        act_checkpoint (bool): with ``use_rev_backprop=False``, wrap each block in
            ``torch.utils.checkpoint`` (the usual activation-checkpointing baseline).
        parallel_backward (bool): PaReprop schedule for the reversible backward: on CUDA the
            inversion of block i-1 runs on a second stream while block i's gradients are
            computed. Off by default (and pointless on a CPU, where it runs sequentially).
        anchor_every (int): if > 0, store the two streams every this many blocks (each chunk
            is its own reversible run), so inversion error cannot accumulate over more than k
            blocks; costs one pair of streams per chunk.
    """
    thw = tuple(int(s) for s in thw)
    params = []
    if use_rev_backprop and torch.is_grad_enabled():
        seen = set()
        for blk in blocks:
            for p in blk.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if params or x1.requires_grad or x2.requires_grad:
            blocks, names = list(blocks), list(names) if names is not None else None
            step = anchor_every if anchor_every > 0 else len(blocks)
            for start in range(0, len(blocks), step):
                chunk = blocks[start:start + step]
                in_chunk = {id(q) for b in chunk for q in b.parameters()}
                chunk_params = [p for p in params if id(p) in in_chunk]
                spec = _RunSpec(chunk, thw, chunk_params, check_finite,
                                names[start:start + step] if names is not None else None,
                                parallel_backward)
                x1, x2 = RevBackProp.apply(x1, x2, spec, *chunk_params)
            return x1, x2
    checkpointing = act_checkpoint and torch.is_grad_enabled()
    for i, blk in enumerate(blocks):
        if checkpointing:
            x1, x2 = torch.utils.checkpoint.checkpoint(blk, x1, x2, thw, use_reentrant=False)
        else:
            x1, x2 = blk(x1, x2, thw)
        if check_finite:
            _check_finite(x1, i, names)
            _check_finite(x2, i, names)
    return x1, x2
