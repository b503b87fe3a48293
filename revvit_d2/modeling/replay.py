"""Replaying a sub-block's forward exactly: RNG state, autocast state and drop-path mask; and
the steps every backward schedule of the engine is made of (recompute a branch with its small
graph, back-propagate through it, sum parameter gradients).

The reversible backward recomputes F and G from rebuilt inputs. To get the forward's numbers it
restores the random-number state captured before each call (as ``torch.utils.checkpoint`` does,
never re-seeding the global generator) and the forward's autocast state, and multiplies by the
stored drop-path mask.
"""
import contextlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.func
from torch import nn

__all__ = ["RNGState", "module_uses_rng", "drop_path_mask", "apply_mask", "autocast_state",
           "replay", "recompute_with_graph", "ParamGrads", "Branch", "recompute_g", "recompute_f",
           "backprop", "add_grad"]

AutocastState = Tuple[str, bool, Optional[torch.dtype]]


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


def apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask


class RNGState:
    """Snapshot of the CPU generator and, for CUDA tensors, the current device's generator."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def fork(self):
        """Context in which the generators are set to this snapshot; restored on exit."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def module_uses_rng(module: nn.Module) -> bool:
    """True when `module` draws random numbers in its current mode (active dropout)."""
    if not module.training:
        return False
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if getattr(m, "uses_rng", False):
            return True
    return False


def autocast_state(device_type: str) -> AutocastState:
    """(device type, enabled, dtype) of the autocast in effect, to be restored by :func:`replay`."""
    if device_type not in ("cuda", "cpu"):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def replay(fn: Callable, rng: Optional[RNGState], mask: Optional[torch.Tensor],
           autocast: AutocastState, *args) -> torch.Tensor:
    """``fn(*args) * mask`` under the forward's RNG snapshot and autocast state."""
    device_type, enabled, dtype = autocast
    fork = rng.fork() if rng is not None else contextlib.nullcontext()
    with fork, torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return apply_mask(fn(*args), mask)


def recompute_with_graph(module: nn.Module, rng: Optional[RNGState],
                         mask: Optional[torch.Tensor], autocast: AutocastState,
                         *args) -> Tuple[torch.Tensor, List[nn.Parameter], List[torch.Tensor]]:
    """:func:`replay` of `module` with a graph, on detached aliases of its trainable parameters.

    The local graph never reaches the real parameters, so their hooks fire once, when autograd
    receives the gradients the engine returns. Returns (output, parameters, their aliases): the
    gradients with respect to the aliases are the parameters' gradients.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    leaves = [p for _, p in named]
    aliases = [p.detach().requires_grad_(True) for p in leaves]
    params = dict(zip((n for n, _ in named), aliases))

    def call(*a):
        return torch.func.functional_call(module, params, a)

    with torch.enable_grad():
        out = replay(call, rng, mask, autocast, *args)
    return out, leaves, aliases



class ParamGrads:
    """Sums the gradients of a run's parameters (a parameter may appear in several blocks)."""

    def __init__(self, params):
        self.index = {id(p): i for i, p in enumerate(params)}
        self.grads: List[Optional[torch.Tensor]] = [None] * len(params)

    def add(self, params, grads):
        for p, g in zip(params, grads):
            if g is not None:
                k = self.index[id(p)]
                self.grads[k] = g if self.grads[k] is None else self.grads[k] + g


class Branch:
    """One recomputed sub-block with its small graph: ``out = DP(H(input))`` on parameter
    aliases; back-propagating through it gives the input's and the parameters' gradients."""

    __slots__ = ("out", "input", "leaves", "aliases")

    def __init__(self, out, input, leaves, aliases):
        self.out, self.input, self.leaves, self.aliases = out, input, leaves, aliases


def recompute_g(blk, rec, autocast, y1, y2) -> Tuple[Branch, torch.Tensor]:
    """(G branch with its graph, X2 = Y2 - DP(G(Y1))) of a reversible block."""
    y1 = y1.detach().requires_grad_(True)
    out, leaves, aliases = recompute_with_graph(blk.G, rec.rng_g, rec.mask, autocast, y1)
    with torch.no_grad():
        x2 = y2 - out
    return Branch(out, y1, leaves, aliases), x2


def recompute_f(blk, rec, autocast, thw, x2, y1) -> Tuple[Branch, torch.Tensor]:
    """(F branch with its graph, X1 = Y1 - DP(F(X2))) of a reversible block."""
    x2 = x2.detach().requires_grad_(True)
    out, leaves, aliases = recompute_with_graph(blk.F, rec.rng_f, rec.mask, autocast, x2, thw)
    with torch.no_grad():
        x1 = y1.detach() - out
    return Branch(out, x2, leaves, aliases), x1


def backprop(branch: Branch, dout, grads: ParamGrads) -> Optional[torch.Tensor]:
    """Back-propagate ``dout`` through a recomputed branch; adds the parameter gradients to
    ``grads`` and returns the gradient of the branch input (None if it does not depend on it)."""
    g = torch.autograd.grad(branch.out, [branch.input] + branch.aliases, dout, allow_unused=True)
    grads.add(branch.leaves, g[1:])
    return g[0]


def add_grad(a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``a + b`` outside any graph; ``a`` when ``b`` is None (a branch that ignores its input)."""
    if b is None:
        return a
    with torch.no_grad():
        return a + b
