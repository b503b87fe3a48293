"""Worker for tests/test_ddp.py: one training step of the reversible backbone and of the Rev-ViT
detector under DistributedDataParallel (gloo, CPU), started through detectron2's launch
(``launch_on("cpu", ...)``: the processes see no GPU). Rank 0 saves the gradients. Importable
by spawned processes (tests/ is on sys.path)."""
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

import revvit_d2

GLOBAL_BATCH = 4


def classifier_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,),
                                                                           generator=g)


def classifier_grads(model, images, labels):
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    core = model.module if hasattr(model, "module") else model
    return {n: p.grad.clone() for n, p in core.named_parameters()}


def build_classifier():
    torch.manual_seed(0)
    return revvit_d2.create_model("rev_vit_test", depth=6)


def build_detector():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(__import__("pathlib").Path(__file__).resolve().parents[1] /
                              "configs/COCO/mask_rcnn_revvit_synthetic.py"))
    # Deterministic sampling: take every anchor and every proposal, so that the losses do not
    # depend on which process draws which random subset.
    cfg = LazyConfig.apply_overrides(cfg, [
        "model.proposal_generator.batch_size_per_image=1000000",
        "model.roi_heads.batch_size_per_image=1000000",
        "model.backbone.net.depth=4", "model.backbone.net.embed_dim=64",
        "model.backbone.net.num_heads=2",
    ])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def detector_batch():
    from _d2_helpers import fake_batch

    # the same two images on every rank: per-rank and global normalisers then agree
    torch.manual_seed(123)
    return fake_batch(6, size=(96, 128))


def detector_grads(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    core = model.module if hasattr(model, "module") else model
    return {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}


def ddp_main(out_path):
    assert torch.distributed.get_backend() == "gloo" and not torch.cuda.is_available()
    rank, world = comm.get_rank(), comm.get_world_size()
    per = GLOBAL_BATCH // world
    images, labels = classifier_batch()
    model = DistributedDataParallel(build_classifier())
    cls = classifier_grads(model, images[rank * per:(rank + 1) * per],
                           labels[rank * per:(rank + 1) * per])
    det_model = DistributedDataParallel(build_detector())
    det = detector_grads(det_model, detector_batch())
    if rank == 0:
        torch.save({"classifier": cls, "detector": det, "world": world}, out_path)
    comm.synchronize()
