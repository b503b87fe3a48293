"""Image classification on detectron2's engine (tools/train_imagenet.py): the loss step, the
trainer with gradient clipping, the progress line and a distributed top-1 / top-5 evaluation.

* :class:`ImageClassificationLoss`: a classifier as detectron2's trainers call a model (batch
  -> loss dict): timm's ``Mixup`` on the batch and timm's ``SoftTargetCrossEntropy`` on the
  mixed targets (the official recipes' ``soft_cross_entropy``), or cross-entropy with label
  smoothing without Mixup; training accuracy, image counts and the unreadable images skipped.
* :class:`ClassifierTrainer` / :class:`ClassifierAMPTrainer`: detectron2's ``SimpleTrainer`` /
  ``AMPTrainer`` plus optional L2 gradient clipping (after unscaling under AMP), which the
  LazyConfig path of detectron2 lacks.
* :class:`ClassificationMetricPrinter`: ``iter 40/120  epoch 3.3/10  loss 0.912  lr ...``.
* :func:`classification_loss`, :func:`record_training_step`: the loss of one step (hard labels
  or soft targets) and what it records in the event storage, shared with the clip loss.
* :func:`topk_correct`, :func:`evaluate_classifier`: single-crop top-1 / top-5 over a loader of
  ``{"images", "targets", "skipped"}`` batches, summed over the processes.

The video trainer (``revvit_video.engine``) builds on the loss step, the trainer, the printer
and :func:`topk_correct`, adding the data position of its loader.
"""
import datetime
import logging
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as nnf
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage
from timm.loss import SoftTargetCrossEntropy
from torch import nn

__all__ = [
    "ImageClassificationLoss",
    "ClassifierTrainer",
    "ClassifierAMPTrainer",
    "ClassificationMetricPrinter",
    "classification_loss",
    "record_training_step",
    "topk_correct",
    "evaluate_classifier",
]

logger = logging.getLogger(__name__)
_SOFT_CE = SoftTargetCrossEntropy()  # stateless


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether each label is among the k highest scores (k capped at K)."""
    k = min(int(k), logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """The float32 loss of ``(B, K)`` logits: cross-entropy with `label_smoothing` against
    ``(B,)`` class indices, or timm's ``SoftTargetCrossEntropy`` against ``(B, K)`` soft targets
    (Mixup / CutMix; they carry their own smoothing, `label_smoothing` is not applied again)."""
    if targets.dim() == 2 and targets.is_floating_point():
        return _SOFT_CE(logits.float(), targets.float())
    return nnf.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def record_training_step(logits: torch.Tensor, labels: torch.Tensor, unit: str,
                         batch_size: int) -> None:
    """On the main process, in detectron2's event storage: ``train_top1`` (the batch's accuracy
    against the ``(B,)`` `labels`, in %) and `unit` (the samples of the step over all
    processes, for samples/s: ``images``, ``clips``)."""
    if comm.is_main_process():
        storage = get_event_storage()
        top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
        storage.put_scalar("train_top1", 100.0 * float(top1))
        storage.put_scalar(unit, batch_size * comm.get_world_size(), smoothing_hint=False)


class ImageClassificationLoss(nn.Module):
    """``batch -> {"loss_cls": loss}`` for detectron2's trainers.

    Args:
        net: the classifier ``(B, 3, H, W) -> (B, K)`` (or its DDP wrapper).
        device: where the images go.
        mixup: a timm ``Mixup`` (soft targets, ``SoftTargetCrossEntropy``) or None (hard
            labels, cross-entropy with `label_smoothing`).
        label_smoothing: used without `mixup` only (``Mixup`` smooths its own targets).

    :attr:`skipped` (``{path: reason}``) collects the unreadable images that the batches of
    this process reported (``batch["skipped"]``).
    """

    def __init__(self, net: nn.Module, device: torch.device, mixup=None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.net = net
        self.device = device
        self.mixup = mixup
        self.label_smoothing = float(label_smoothing)
        self.skipped: Dict[str, str] = {}

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        for s in batch.get("skipped", ()):
            if s.path not in self.skipped:
                logger.warning("skipping unreadable training image %s (%s: %s)", s.path,
                               s.reason, s.error)
                self.skipped[s.path] = s.reason
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["targets"].to(self.device, non_blocking=True)
        targets = labels
        if self.mixup is not None:  # soft targets; draws from the reseeded global RNGs
            images, targets = self.mixup(images, labels)
        logits = self.net(images)
        loss = classification_loss(logits, targets, self.label_smoothing)
        record_training_step(logits, labels, "images", images.shape[0])  # top-1 of mixed images
        if comm.is_main_process():
            get_event_storage().put_scalar("skipped_images", len(self.skipped),
                                           smoothing_hint=False)
        return {"loss_cls": loss}


class ClassifierTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with optional L2 gradient clipping in
    ``after_backward`` (``SOLVER.CLIP_GRAD_L2NORM`` of the official recipes); under AMP the
    gradients are unscaled first. Everything else (step, metrics, state) is detectron2's: the
    training stream restarts at any iteration by itself, so no data position is saved.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        clip_grad_l2norm: max gradient norm, or None.
        **kwargs: for the detectron2 trainer (``AMPTrainer``: ``precision``, ``grad_scaler``).
    """

    def __init__(self, model, data_loader, optimizer, clip_grad_l2norm: Optional[float] = None,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_grad_l2norm = clip_grad_l2norm

    def after_backward(self):
        super().after_backward()
        if self.clip_grad_l2norm:
            if isinstance(self, AMPTrainer):
                self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_grad_l2norm))


class ClassifierAMPTrainer(ClassifierTrainer, AMPTrainer):
    """:class:`ClassifierTrainer` on detectron2's ``AMPTrainer`` (CUDA autocast; the reversible
    backward recomputes under the forward's autocast state)."""


class ClassificationMetricPrinter(EventWriter):
    """One progress line per call (with detectron2's ``PeriodicWriter``)::

        iter 40/120  epoch 3.3/10.0  loss 1.912  train top-1 38.8  lr 1.00e-03  52.1 images/s
        (0.307 s/it, data 0.112 s)  eta 0:00:24  skipped 0

    Args:
        max_iter, iters_per_epoch: of the run.
        window_size: iterations of the medians.
        unit: the event-storage scalar counting the samples of a step, and the rate's unit
            (``images``; the video trainer's ``clips``).
        skipped_key: the scalar counting the unreadable samples skipped so far.
        logger_name: where the lines go.
    """

    def __init__(self, max_iter: int, iters_per_epoch: int, window_size: int = 20,
                 unit: str = "images", skipped_key: str = "skipped_images",
                 logger_name: str = "revvit_d2.train_imagenet"):
        self.max_iter = int(max_iter)
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.window = int(window_size)
        self.unit = unit
        self.skipped_key = skipped_key
        self.logger = logging.getLogger(logger_name)

    def _median(self, storage, name) -> Optional[float]:
        try:
            h = storage.history(name)
        except KeyError:
            return None
        return h.median(storage.count_samples(name, self.window))

    def write(self):
        storage = get_event_storage()
        it = storage.iter
        if it >= self.max_iter:
            return
        loss, top1 = self._median(storage, "total_loss"), self._median(storage, "train_top1")
        t, data_t = self._median(storage, "time"), self._median(storage, "data_time")
        samples = self._median(storage, self.unit)
        lr = storage.latest().get("lr", (None,))[0]
        skipped = storage.latest().get(self.skipped_key, (0,))[0]
        parts = [f"iter {it + 1}/{self.max_iter}",
                 f"epoch {(it + 1) / self.iters_per_epoch:.1f}/"
                 f"{self.max_iter / self.iters_per_epoch:.1f}"]
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if top1 is not None:
            parts.append(f"train top-1 {top1:.1f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if t:
            if samples:
                parts.append(f"{samples / t:.1f} {self.unit}/s")
            parts.append(f"({t:.3f} s/it" + (f", data {data_t:.3f} s)" if data_t is not None
                                             else ")"))
            parts.append(f"eta {datetime.timedelta(seconds=int(t * (self.max_iter - it - 1)))}")
        parts.append(f"skipped {int(skipped)}")
        self.logger.info("  ".join(parts))


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    enabled = dtype is not None and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float16, enabled=enabled)


def evaluate_classifier(model: nn.Module, loader, device: torch.device,
                        amp_dtype: Optional[torch.dtype] = None, log_period: int = 20) -> Dict:
    """Top-1 / top-5 of `model` over this process's `loader` (batches ``{"images", "targets",
    "skipped"}``, e.g. :func:`revvit_d2.data.imagefolder.build_eval_loader` over this rank's
    share), summed over all processes. Returns ``top1``, ``top5`` (percent), ``images``,
    ``skipped`` (``{path: reason}``, all processes), ``seconds`` and ``images_per_s`` on every
    process. The model is left in its previous mode."""
    was_training = model.training
    model.eval()
    hits = torch.zeros(3, dtype=torch.long)  # top-1, top-5, images
    skipped: Dict[str, str] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            for s in batch["skipped"]:
                skipped.setdefault(s.path, s.reason)
            if batch["images"] is None:
                continue
            images = batch["images"].to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(images).float().cpu()
            labels = batch["targets"]
            hits += torch.stack([topk_correct(logits, labels, 1).sum(),
                                 topk_correct(logits, labels, 5).sum(),
                                 torch.tensor(len(labels))])
            if log_period and (i + 1) % log_period == 0 and comm.is_main_process():
                logger.info("eval: batch %d/%d  images %d", i + 1, len(loader), int(hits[2]))
    seconds = time.perf_counter() - start
    model.train(was_training)
    parts = comm.all_gather({"hits": hits.tolist(), "skipped": skipped, "seconds": seconds})
    top1, top5, n = (sum(p["hits"][j] for p in parts) for j in range(3))
    merged: Dict[str, str] = {}
    for p in parts:
        for k, v in p["skipped"].items():
            merged.setdefault(k, v)
    seconds = max(p["seconds"] for p in parts)
    return dict(top1=100.0 * top1 / max(n, 1), top5=100.0 * top5 / max(n, 1), images=n,
                skipped=merged, seconds=seconds, images_per_s=n / max(seconds, 1e-9))
