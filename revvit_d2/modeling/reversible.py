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

__all__ = ["ReversibleBlock", "RevBackProp", "reversible_stack", "drop_path_mask"]


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


class _RunSpec:
    __slots__ = ("blocks", "thw", "params", "check_finite", "names")

    def __init__(self, blocks, thw, params, check_finite, names):
        self.blocks = blocks
        self.thw = thw
        self.params = params
        self.check_finite = check_finite
        self.names = names


def reversible_stack(
    blocks: Sequence[ReversibleBlock],
    x1: torch.Tensor,
    x2: torch.Tensor,
    thw: Sequence[int],
    use_rev_backprop: bool = True,
    check_finite: bool = False,
    names: Optional[Sequence[str]] = None,
    act_checkpoint: bool = False,
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
            spec = _RunSpec(list(blocks), thw, params, check_finite, names)
            return RevBackProp.apply(x1, x2, spec, *params)
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
