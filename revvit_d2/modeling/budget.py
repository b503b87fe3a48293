"""Choosing the memory-budget hybrid's ``stored_blocks`` from a memory budget per image.

The estimate is made without running the model: its forward runs on fake inputs (torch's
``FakeTensorMode``: shapes, dtypes and kernel choices of the model's device, nothing allocated
or computed) while :func:`torch.autograd.graph.saved_tensors_hooks` adds up what autograd saves
for the backward. Two batch sizes are traced and subtracted, so the parameters (which autograd
also saves) cancel and what remains is the activation memory of one image. Tracing on the
model's own device matters: attention saves its N x N weights on the meta device's reference
path but only a log-sum-exp row with the fused kernels of the CPU and CUDA.

For ``k`` stored blocks the training peak is estimated as::

    peak(k) = max(saved(k), saved(0) + block)      0 <= k < depth
    peak(depth) = saved(depth)                     (plain autograd)

``saved(k)``: what the forward saves with k stored blocks (the stored blocks' activations, the
two streams the reversible engine keeps, and the layers outside the reversible stack);
``block``: the largest working set of one reversible block during its recomputation (its
saved tensors), which exists only after the stored blocks' activations were freed. Temporary
buffers of single operations are not counted; ``benchmarks/hybrid_tradeoff.py`` compares the
estimate with measured memory.
"""
import contextlib
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["saved_bytes_per_image", "estimate_stored_blocks_memory", "choose_stored_blocks"]


def count_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward during ``model(x)`` (a tensor saved by several
    operations counted once); ``x`` may be real or fake."""
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def _saved_bytes(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> int:
    """:func:`count_saved_bytes` of one training forward on fake inputs of the model's device."""
    device = next(model.parameters()).device
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.zeros(tuple(input_shape), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return count_saved_bytes(model, x)


def saved_bytes_per_image(model: nn.Module, input_shape: Sequence[int],
                          dtype: torch.dtype = torch.float32) -> int:
    """Activation bytes per image that autograd saves in one training forward of ``model``.

    ``input_shape``: one image, without the batch dimension (e.g. ``(3, 224, 224)``).
    ``dtype``: float32, or bfloat16 / float16 for a training step under that autocast.
    """
    with _training(model):
        return _per_image(model, input_shape, dtype)


def estimate_stored_blocks_memory(model: nn.Module, input_shape: Sequence[int],
                                  dtype: torch.dtype = torch.float32,
                                  batch_size: Optional[int] = None) -> List[int]:
    """Estimated peak activation bytes per image for ``stored_blocks`` = 0 .. depth (index k).

    ``model`` is a :class:`~revvit_d2.modeling.base.RevModelBase` (Rev-ViT, Rev-MViT); its
    settings are restored on return. With the model's ``rev_backward_chunk = m`` and a
    ``batch_size`` B > m, one block's working set is that of m images, shared by the B images
    of the batch (the block term is scaled by m / B).
    """
    depth = len(model.reversible_blocks())
    engine = model.engine
    saved = []
    with _training(model):
        try:
            for k in range(depth + 1):
                model.engine = engine.replace(stored_blocks=k, use_rev_backprop=True,
                                              act_checkpoint=False)
                saved.append(_per_image(model, input_shape, dtype))
        finally:
            model.engine = engine
    block = max(saved[k + 1] - saved[k] for k in range(depth)) if depth else 0
    chunk = engine.rev_backward_chunk
    if chunk and batch_size and batch_size > chunk:
        block = block * chunk // batch_size
    return [max(saved[k], saved[0] + block) for k in range(depth)] + [saved[depth]]


def choose_stored_blocks(model: nn.Module, budget_mib: float, input_shape: Sequence[int],
                         dtype: torch.dtype = torch.float32,
                         batch_size: Optional[int] = None) -> int:
    """The largest ``stored_blocks`` whose estimated activation memory per image fits
    ``budget_mib`` (MiB per image): the fastest hybrid that fits. Raises ValueError when even
    the fully reversible model (k = 0) does not fit.

    Example::

        model = revvit_d2.create_model("rev_vit_b")
        model.stored_blocks = choose_stored_blocks(model, 40, (3, 224, 224))
    """
    peaks = estimate_stored_blocks_memory(model, input_shape, dtype, batch_size)
    budget = budget_mib * 2**20
    fitting = [k for k, b in enumerate(peaks) if b <= budget]
    if not fitting:
        raise ValueError(f"a budget of {budget_mib:g} MiB per image is below the fully "
                         f"reversible model's estimated {peaks[0] / 2**20:.2f} MiB per image")
    return max(fitting)


def _per_image(model, input_shape, dtype) -> int:
    one = _saved_bytes(model, (1,) + tuple(input_shape), dtype)
    two = _saved_bytes(model, (2,) + tuple(input_shape), dtype)
    return two - one


@contextlib.contextmanager
def _training(model: nn.Module):
    """The model in training mode (drop path and dropout active), its mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
