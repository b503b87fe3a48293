"""Training and multi-view testing pieces used by tools/run_video.py, built on detectron2's
engine (``SimpleTrainer``, hooks, ``EventStorage``, ``Checkpointer``).

* :func:`aggregate_views` / :class:`MultiViewAccumulator`: the video-level prediction is the
  mean of the softmax over the video's views (clips x crops); views are grouped by their
  ``video_index``, whichever process or batch they came from.
* :func:`evaluate_multiview`: one pass of a :class:`~revvit_video.data.VideoTestLoader` per
  process, gathered on the main process; top-1 / top-5 over the videos that got at least one
  view, and the count of videos that got none (unreadable files).
* :class:`ClipClassificationLoss`: a clip classifier as detectron2's trainers call a model
  (batch -> loss dict): clips to the device, cross-entropy with label smoothing, accuracy and
  clip-count metrics.
* :class:`VideoTrainer` / :class:`VideoAMPTrainer`: detectron2's ``SimpleTrainer`` /
  ``AMPTrainer`` plus gradient clipping and the position of every process's training data
  stream in the checkpoints, for an exact resume.
* :class:`VideoMetricPrinter`: the periodic progress line (iteration, epoch, loss, lr, clips/s,
  ETA, skipped videos).
"""
import logging
import time
from collections import defaultdict
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from detectron2.engine import AMPTrainer
from detectron2.utils import comm

from revvit_d2.training.classification import (
    ClassificationMetricPrinter,
    ClassifierTrainer,
    classification_loss,
    record_training_step,
    topk_correct,
)


logger = logging.getLogger(__name__)

__all__ = [
    "aggregate_views",
    "topk_correct",
    "MultiViewAccumulator",
    "evaluate_multiview",
    "ClipClassificationLoss",
    "VideoTrainer",
    "VideoAMPTrainer",
    "VideoMetricPrinter",
]


# --------------------------------------------------------------------------------------------
# Multi-view aggregation
# --------------------------------------------------------------------------------------------
def aggregate_views(video_index: torch.Tensor, logits: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of the softmax over the views of each video.

    Args:
        video_index: (V,) video of each view.
        logits: (V, K) pre-softmax scores of each view.

    Returns:
        ``(videos, probs, counts)``: the sorted distinct video indices (N,), their mean
        probabilities (N, K) and their number of views (N,).
    """
    videos, inverse = torch.unique(video_index, sorted=True, return_inverse=True)
    probs = logits.float().softmax(dim=-1)
    sums = torch.zeros(len(videos), probs.shape[1], dtype=probs.dtype).index_add_(0, inverse, probs)
    counts = torch.bincount(inverse, minlength=len(videos))
    return videos, sums / counts[:, None].to(sums.dtype), counts


class MultiViewAccumulator:
    """Per-video running sum of view softmaxes (memory: videos x classes, not views)."""

    def __init__(self):
        self.sums: Dict[int, torch.Tensor] = {}
        self.counts: Dict[int, int] = defaultdict(int)
        self.labels: Dict[int, int] = {}

    def add(self, video_index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        videos, probs, counts = aggregate_views(video_index.cpu(), logits.detach().cpu())
        first = {}
        for v, lab in zip(video_index.tolist(), labels.tolist()):
            first.setdefault(v, lab)
        for v, p, c in zip(videos.tolist(), probs, counts.tolist()):
            total = p * c
            self.sums[v] = self.sums[v] + total if v in self.sums else total
            self.counts[v] += c
            if self.labels.setdefault(v, first[v]) != first[v]:
                raise ValueError(f"video {v} has views with labels {self.labels[v]} and {first[v]}")

    def merge(self, other: "MultiViewAccumulator"):
        for v, s in other.sums.items():
            self.sums[v] = self.sums[v] + s if v in self.sums else s
            self.counts[v] += other.counts[v]
            self.labels.setdefault(v, other.labels[v])

    def state(self):
        return {"sums": self.sums, "counts": dict(self.counts), "labels": self.labels}

    @classmethod
    def from_state(cls, state) -> "MultiViewAccumulator":
        acc = cls()
        acc.sums, acc.labels = dict(state["sums"]), dict(state["labels"])
        acc.counts.update(state["counts"])
        return acc

    def compute(self, expected_views: Optional[int] = None) -> Dict[str, float]:
        """``top1``, ``top5`` (percent of videos), ``videos``, ``views`` and ``incomplete``
        (videos with fewer than `expected_views` views)."""
        videos = sorted(self.sums)
        if not videos:
            return dict(top1=0.0, top5=0.0, videos=0, views=0, incomplete=0)
        probs = torch.stack([self.sums[v] / self.counts[v] for v in videos])
        labels = torch.as_tensor([self.labels[v] for v in videos])
        n = len(videos)
        incomplete = sum(1 for v in videos if expected_views and self.counts[v] < expected_views)
        return dict(top1=100.0 * float(topk_correct(probs, labels, 1).sum()) / n,
                    top5=100.0 * float(topk_correct(probs, labels, 5).sum()) / n,
                    videos=n, views=int(sum(self.counts.values())), incomplete=incomplete)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    enabled = dtype is not None and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float16, enabled=enabled)


def evaluate_multiview(model: nn.Module, loader, device: torch.device,
                       amp_dtype: Optional[torch.dtype] = None,
                       log_period: int = 20) -> Dict[str, Any]:
    """Multi-view test of `model` on a :class:`~revvit_video.data.VideoTestLoader`.

    Every process runs its share of the videos; the per-video sums are gathered on the main
    process, which returns ``top1``, ``top5``, ``videos`` (evaluated), ``skipped`` (videos of
    the list without any view: unreadable), ``incomplete`` (fewer views than
    ``loader.views_per_video``), ``views``, ``seconds`` and ``clips_per_s``; other processes
    return ``{}``. The model is left in eval mode.
    """
    was_training = model.training
    model.eval()
    acc = MultiViewAccumulator()
    views = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if batch["video"] is None:
                continue
            x = batch["video"].to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
            acc.add(batch["video_index"], logits.float(), batch["label"])
            views += x.shape[0]
            now = time.perf_counter()
            if log_period and (i + 1) % log_period == 0 and comm.is_main_process():
                logger.info("test: batch %d  views %d  videos %d  %.1f clips/s", i + 1, views,
                            len(acc.sums), views / max(now - start, 1e-9))
    seconds = time.perf_counter() - start
    model.train(was_training)
    parts = comm.gather({"acc": acc.state(), "views": views, "seconds": seconds,
                         "skipped": sorted(loader.skipped.paths)})
    if not comm.is_main_process():
        return {}
    total = MultiViewAccumulator()
    for p in parts:
        total.merge(MultiViewAccumulator.from_state(p["acc"]))
    res = total.compute(loader.views_per_video)
    seconds = max(p["seconds"] for p in parts)
    unreadable = sorted({s for p in parts for s in p["skipped"]})
    res.update(skipped=loader.num_videos - res["videos"], seconds=seconds,
               clips_per_s=res["views"] / max(seconds, 1e-9), unreadable_files=len(unreadable))
    return res


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class ClipClassificationLoss(nn.Module):
    """A clip classifier as detectron2's trainers expect a model: ``batch -> {"loss_cls": loss}``.

    The batch is one of :func:`~revvit_video.data.collate_video_batch`: the clips go to `device`,
    the loss is cross-entropy with label smoothing in float32, or, when the labels are ``(B, K)``
    soft targets (Mixup/CutMix, already smoothed), the soft-target cross-entropy (timm's
    ``SoftTargetCrossEntropy``; `label_smoothing` is not applied again). Like detectron2's box
    heads it records its training accuracy (``train_top1``, against the dominant class of soft
    targets) and the clips of the step over all processes (``clips``, for clips/s) in the event
    storage.

    Args:
        net: the classifier, ``(B, 3, T, H, W) -> (B, K)`` (or its DDP wrapper).
        device: where the clips go.
        label_smoothing: of the cross-entropy.
    """

    def __init__(self, net: nn.Module, device: torch.device, label_smoothing: float = 0.0):
        super().__init__()
        self.net = net
        self.device = device
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        videos = batch["video"].to(self.device, non_blocking=True)
        targets = batch["label"].to(self.device, non_blocking=True)
        logits = self.net(videos)  # (B, K)
        loss = classification_loss(logits, targets, self.label_smoothing)
        # soft targets: the accuracy is against their dominant class
        labels = targets.argmax(dim=1) if targets.dim() == 2 else targets
        record_training_step(logits, labels, "clips", videos.shape[0])
        return {"loss_cls": loss}


class VideoTrainer(ClassifierTrainer):
    """detectron2's ``SimpleTrainer`` (or ``AMPTrainer``: :class:`VideoAMPTrainer`) with what a
    resumable video stream needs and detectron2 has no place for.

    What differs, and why:

    * optional L2 gradient clipping (:class:`revvit_d2.training.classification.ClassifierTrainer`):
      the LazyConfig path of detectron2 has no clipping of its own;
    * after each step, every process's data position is gathered (the processes skip
      different unreadable videos) and saved in the trainer state, so ``--resume`` restarts
      each stream where it stood: a checkpointer runs on the main process only and cannot
      gather at save time;
    * the count of unreadable videos skipped so far goes to the event storage.

    The step itself (forward, backward, metrics, optimizer step) is detectron2's: the model is
    a :class:`ClipClassificationLoss`.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        clip_grad_l2norm: max gradient norm, or None.
        **kwargs: for the detectron2 trainer (``AMPTrainer``: ``precision``, ``grad_scaler``).
    """

    def __init__(self, model, data_loader, optimizer, clip_grad_l2norm: Optional[float] = None,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, clip_grad_l2norm, **kwargs)
        self._data_states = None  # every process's data position after the last step

    def run_step(self):
        super().run_step()
        skipped = getattr(self.data_loader, "skipped", None)
        if skipped is not None and comm.is_main_process():
            self.storage.put_scalar("skipped_videos", len(skipped.paths), smoothing_hint=False)
        if hasattr(self.data_loader, "state_dict"):
            # Every process runs every step: safe to gather here.
            self._data_states = comm.all_gather(self.data_loader.state_dict())

    def state_dict(self):
        ret = super().state_dict()
        if self._data_states is not None:
            ret["data"] = {"per_rank": self._data_states}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        states = state_dict.get("data", {}).get("per_rank", [])
        if hasattr(self.data_loader, "load_state_dict") and states:
            if len(states) == comm.get_world_size():
                self.data_loader.load_state_dict(states[comm.get_rank()])
            else:
                logger.warning("the checkpoint's data position is for %d processes, not %d: "
                               "not used", len(states), comm.get_world_size())


class VideoAMPTrainer(VideoTrainer, AMPTrainer):
    """:class:`VideoTrainer` on detectron2's ``AMPTrainer`` (CUDA autocast; the reversible
    backward recomputes under the forward's autocast state)."""


class VideoMetricPrinter(ClassificationMetricPrinter):
    """One progress line per call (used with detectron2's ``PeriodicWriter``)::

        iter 40/120  epoch 3.3/10  loss 0.912  train top-1 68.8  lr 1.00e-03  52.1 clips/s
        (0.307 s/it, data 0.112 s)  eta 0:00:24  skipped 0
    """

    def __init__(self, max_iter: int, iters_per_epoch: int, window_size: int = 20):
        super().__init__(max_iter, iters_per_epoch, window_size, unit="clips",
                         skipped_key="skipped_videos", logger_name="revvit_video.train")
