"""FLOP and parameter counting with fvcore.

fvcore has no handle for ``aten::scaled_dot_product_attention``; without one it silently skips
the two attention matmuls. :func:`count_flops` adds a handle counting them as fvcore counts a
matmul (one multiply-add = one flop), so the totals equal the official models' (which compute
attention with explicit matmuls).
"""
from typing import Any, Tuple

import torch
from torch import nn

__all__ = ["count_flops", "count_parameters", "sdpa_flop_jit"]


def sdpa_flop_jit(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    n_q, d_qk = q[-2], q[-1]
    n_k, d_v = k[-2], v[-1]
    return batch * n_q * n_k * (d_qk + d_v)  # q @ k^T and attn @ v


def count_flops(model: nn.Module, inputs: Tuple[Any, ...]) -> int:
    """Total fvcore FLOPs of ``model(*inputs)`` in eval mode (batch as given)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
