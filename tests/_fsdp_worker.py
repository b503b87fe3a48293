"""Worker for tests/test_fsdp.py: sharded (FSDP2, gloo, CPU) training of tiny reversible models.

One spawn per world size runs every case of ``CASES`` in one process group (start-up dominates
on a busy 2-core machine); rank 0 saves, per case, the gradients of every parameter after
``full_tensor()`` (or the weights after some optimizer steps) and what the engine gathered. The
single-process reference (:func:`reference`) sees the same global batch, each "rank" its slice
with that rank's seed, and averages the gradients as FSDP does. Importable by spawned processes
(tests/ is on sys.path).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh

import revvit_d2
from revvit_d2.modeling import ReversibleBlock, build_model

GLOBAL_BATCH = 4
_REGULARIZED = dict(drop_path_rate=0.2, dropout_rate=0.1)

# name -> (variant, model kwargs, optimizer or None, steps, mixed precision)
CASES = {
    "vit": ("rev_vit_test", dict(_REGULARIZED, depth=3, embed_dim=32), None, 1, False),
    "vit_parallel_anchor": ("rev_vit_test", dict(_REGULARIZED, depth=4, embed_dim=32,
                                                   parallel_backward=True, rev_anchor_every=2),
                            None, 1, False),
    "mvit": ("rev_mvit_test", dict(_REGULARIZED), None, 1, False),
    "mvit_parallel": ("rev_mvit_test", dict(_REGULARIZED, parallel_backward=True), None, 1,
                      False),
    "mvit_video_anchor": ("rev_mvit_video_test", dict(_REGULARIZED, rev_anchor_every=1), None,
                          1, False),
    "vit_chunk": ("rev_vit_test", dict(depth=2, embed_dim=32, drop_path_rate=0.2,
                                       rev_backward_chunk=1), None, 1, False),
    "vit_plain": ("rev_vit_test", dict(_REGULARIZED, depth=3, embed_dim=32,
                                       use_rev_backprop=False), None, 1, False),
    "vit_act_checkpoint": ("rev_vit_test", dict(_REGULARIZED, depth=3, embed_dim=32,
                                                 use_rev_backprop=False, act_checkpoint=True),
                           None, 1, False),
    "vit_stored": ("rev_vit_test", dict(_REGULARIZED, depth=3, embed_dim=32, stored_blocks=1),
                   None, 1, False),
    "vit_sgd": ("rev_vit_test", dict(_REGULARIZED, depth=2, embed_dim=32), "sgd", 3, False),
    "mvit_adamw": ("rev_mvit_test", dict(_REGULARIZED, parallel_backward=True), "adamw", 3,
                   False),
    "vit_bf16": ("rev_vit_test", dict(depth=3, embed_dim=32), None, 1, True),
    # F and G compiled (torch.compile, inductor): no dropout, the compiled RNG is not eager's
    "vit_compiled": ("rev_vit_test", dict(depth=2, embed_dim=32, compile_blocks=True), None, 1,
                     False),
    # HSDP: a 2-D mesh (replicate x shard), 4 processes only
    "vit_hsdp": ("rev_vit_test", dict(_REGULARIZED, depth=2, embed_dim=32), None, 1, False),
    # the Detectron2 backbones: Rev-ViT with its stem and first block frozen (the first anchor
    # run needs no backward), Rev-MViT under an FPN
    "d2_vit": ("d2_vit", dict(_REGULARIZED, depth=3, embed_dim=32, freeze_patch_embed=True,
                              freeze_blocks=1, rev_anchor_every=1), None, 1, False),
    "d2_mvit_fpn": ("d2_mvit_fpn", dict(_REGULARIZED), None, 1, False),
}


def build(case):
    variant, kwargs = CASES[case][:2]
    torch.manual_seed(0)
    if variant == "d2_vit":
        from revvit_d2.d2.backbone import RevViTBackbone

        return RevViTBackbone(img_size=64, num_heads=2, **kwargs)
    if variant == "d2_mvit_fpn":
        from _d2_helpers import TINY_MVIT
        from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

        from revvit_d2.d2 import RevMViTBackbone

        bottom_up = RevMViTBackbone(**TINY_MVIT, **kwargs)
        return FPN(bottom_up=bottom_up, in_features=list(bottom_up.output_shape()),
                   out_channels=16, top_block=LastLevelMaxPool())
    return build_model(variant, **kwargs)


def global_batch(case):
    model = build(case)
    size = (3,) + tuple(model.input_size) if hasattr(model, "input_size") else (3, 64, 64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn((GLOBAL_BATCH,) + size, generator=g)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    return x, y


def logits_of(model, x):
    out = model(x)
    if isinstance(out, dict):  # a backbone's features: their first 10 numbers as logits
        out = torch.cat([v.flatten(1) for v in out.values()], 1)[:, :10]
    return out.float()


def loss_of(model, x, y, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return F.cross_entropy(logits_of(model, x), y)


def _optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # eps 1e-6: some gradients are zero up to rounding (a key bias does not change a softmax)
    # and the default 1e-8 would turn their rounding noise into full-size steps
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, eps=1e-6)


def _seed(step, rank):
    return 1000 + 10 * step + rank


def reference(case, world):
    """Single process: the gradients (one step) or the weights (several steps) that the sharded
    run must reproduce, and the inference logits after them."""
    _, _, opt_name, steps, _ = CASES[case]
    model = build(case).train()
    x, y = global_batch(case)
    b = GLOBAL_BATCH // world
    opt = _optimizer(opt_name, model) if opt_name else None
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for r in range(world):
            torch.manual_seed(_seed(step, r))
            (loss_of(model, x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]) / world).backward()
        if opt is not None:
            opt.step()
    out = {}
    if opt is not None:
        out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}
    with torch.no_grad():
        model.eval()
        out["eval_logits"] = logits_of(model, x[:2])
    return out


def _count_gathered(model, peak):
    """Hooks on every F and G: the largest number of blocks whose parameters are gathered (not
    DTensors) while one of them computes."""
    from torch.distributed.tensor import DTensor

    blocks = [m for m in model.modules() if isinstance(m, ReversibleBlock)]

    def hook(*_):
        gathered = sum(not isinstance(next(b.parameters()), DTensor) for b in blocks)
        peak[0] = max(peak[0], gathered)

    for blk in blocks:
        blk.F.register_forward_pre_hook(hook)
        blk.G.register_forward_pre_hook(hook)
    return blocks


def run_case(case, rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    _, _, opt_name, steps, mixed = CASES[case]
    model = build(case).train()
    kwargs = {}
    if mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    # an explicit CPU mesh: the default one is on the GPU when there is one
    if case == "vit_hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    revvit_d2.shard_model(model, mesh, **kwargs)
    peak = [0]
    blocks = _count_gathered(model, peak)
    x, y = global_batch(case)
    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    opt = _optimizer(opt_name, model) if opt_name else None
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(_seed(step, rank))
        loss_of(model, x[rows], y[rows], autocast=mixed).backward()
        if opt is not None:
            opt.step()
    left_gathered = sum(not isinstance(next(blk.parameters()), DTensor) for blk in blocks)
    out = {"peak": peak[0], "left_gathered": left_gathered, "blocks": len(blocks),
           "graphs": counters["stats"]["unique_graphs"],  # compiled so far in this process
           "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()
                                  if p.grad is not None})}
    if opt is not None:
        out["weights"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    else:
        out["grads"] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()
                        if p.grad is not None}
    with torch.no_grad():  # inference through the blocks' own forward (FSDP2's hooks)
        model.eval()
        out["eval_logits"] = logits_of(model, x[:2])
    return out


def _main(rank, world, port, out_path, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: run_case(case, rank, world) for case in cases}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # python _fsdp_worker.py RANK WORLD PORT OUT CASE,CASE,...
    _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
          sys.argv[5].split(","))
