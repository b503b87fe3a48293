"""Training and multi-view testing pieces used by tools/run_video.py, built on detectron2's
engine (``SimpleTrainer``, hooks, ``EventStorage``, ``Checkpointer``).

* :func:`aggregate_views` / :class:`MultiViewAccumulator`: the video-level prediction is the
  mean of the softmax over the video's views (clips x crops); views are grouped by their
  ``video_index``, whichever process or batch they came from.
* :func:`evaluate_multiview`: one pass of a :class:`~revvit_video.data.VideoTestLoader` per
  process, gathered on the main process; top-1 / top-5 over the videos that got at least one
  view, and the count of videos that got none (unreadable files).
* :class:`VideoTrainer`: detectron2's ``SimpleTrainer`` with a classification step: clips to the
  device, ``torch.autocast`` on CUDA (float16 with a ``GradScaler``, or bfloat16), cross-entropy
  with label smoothing, optional gradient clipping, throughput metrics. Its state (saved in
  checkpoints) includes the position of the training data stream, for an exact resume.
* :class:`AtomicCheckpointer`: detectron2/fvcore ``Checkpointer`` whose files (and the
  ``last_checkpoint`` tag) are written to a temporary name and moved into place with
  ``os.replace``, so an interrupted save never leaves a truncated checkpoint behind; loading our
  own checkpoints is strict.
* :class:`VideoMetricPrinter`: the periodic progress line (iteration, epoch, loss, lr, clips/s,
  ETA, skipped videos).
"""
import datetime
import logging
import time
from collections import defaultdict
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

from detectron2.checkpoint import Checkpointer
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

from revvit_d2.d2.checkpoint import AtomicSaveMixin

logger = logging.getLogger(__name__)

__all__ = [
    "aggregate_views",
    "topk_correct",
    "MultiViewAccumulator",
    "evaluate_multiview",
    "VideoTrainer",
    "AtomicCheckpointer",
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


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether each label is among the k highest scores (k capped at K)."""
    k = min(int(k), probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


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
class VideoTrainer(SimpleTrainer):
    """``SimpleTrainer`` for clip classification.

    The data loader yields batches of :func:`~revvit_video.data.collate_video_batch`. A step:
    move the clips to `device`, forward under ``torch.autocast`` when `amp_dtype` is set and the
    device is CUDA (the reversible backward recomputes under the same autocast state), loss =
    cross-entropy with label smoothing in float32, backward (scaled by a ``GradScaler`` for
    float16), optional L2 gradient clipping, optimizer step.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        device: where the model lives.
        amp_dtype: None (float32), ``torch.float16`` or ``torch.bfloat16`` (CUDA only).
        label_smoothing: of the cross-entropy.
        clip_grad_l2norm: max gradient norm, or None.
        world_size: processes, for the all-process clips/s.
    """

    def __init__(self, model, data_loader, optimizer, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None, label_smoothing: float = 0.0,
                 clip_grad_l2norm: Optional[float] = None, world_size: int = 1):
        super().__init__(model, data_loader, optimizer)
        self.device = device
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.label_smoothing = float(label_smoothing)
        self.clip_grad_l2norm = clip_grad_l2norm
        self.world_size = int(world_size)
        self.grad_scaler = None
        self._data_states = None  # every process's data position after the last step
        if self.amp_dtype == torch.float16:
            self.grad_scaler = torch.amp.GradScaler("cuda")

    def run_step(self):
        assert self.model.training, "[VideoTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        batch = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        videos = batch["video"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)

        with _autocast(self.device, self.amp_dtype):
            logits = self.model(videos)  # (B, K)
        loss = nnf.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()
        self.after_backward()
        if self.clip_grad_l2norm:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_grad_l2norm))

        self._write_metrics({"loss_cls": loss.detach()}, data_time)
        storage = get_event_storage()
        if comm.is_main_process():
            top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
            storage.put_scalar("train_top1", 100.0 * float(top1))
            storage.put_scalar("clips", videos.shape[0] * self.world_size, smoothing_hint=False)
            skipped = getattr(self.data_loader, "skipped", None)
            if skipped is not None:
                storage.put_scalar("skipped_videos", len(skipped.paths), smoothing_hint=False)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if hasattr(self.data_loader, "state_dict"):
            # Where each process's data stream stands (they skip different unreadable videos);
            # the main process saves all of them. Every process runs every step: safe to gather.
            self._data_states = comm.all_gather(self.data_loader.state_dict())

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        if self._data_states is not None:
            ret["data"] = {"per_rank": self._data_states}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        states = state_dict.get("data", {}).get("per_rank", [])
        if hasattr(self.data_loader, "load_state_dict") and states:
            if len(states) == comm.get_world_size():
                self.data_loader.load_state_dict(states[comm.get_rank()])
            else:
                logger.warning("the checkpoint's data position is for %d processes, not %d: "
                               "not used", len(states), comm.get_world_size())


class AtomicCheckpointer(AtomicSaveMixin, Checkpointer):
    """detectron2's (fvcore's) ``Checkpointer`` with atomic writes and strict loading.

    fvcore writes ``model_XXXX.pth`` and the ``last_checkpoint`` tag in place, so a job killed
    while saving leaves a truncated file that ``--resume`` then tries to load. Here both go to a
    temporary file in the same folder, are flushed and fsync'ed, and are moved into place with
    ``os.replace`` (atomic on POSIX). Loading a checkpoint of this model is strict: a missing or
    unexpected key raises instead of being logged and ignored.
    """

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise RuntimeError(f"checkpoint does not match the model: missing "
                               f"{incompatible.missing_keys[:8]}, unexpected "
                               f"{incompatible.unexpected_keys[:8]}")
        return incompatible


class VideoMetricPrinter(EventWriter):
    """One progress line per call (used with detectron2's ``PeriodicWriter``)::

        iter 40/120  epoch 3.3/10  loss 0.912  train top-1 68.8  lr 1.00e-03  52.1 clips/s
        (0.307 s/it, data 0.112 s)  eta 0:00:24  skipped 0
    """

    def __init__(self, max_iter: int, iters_per_epoch: int, window_size: int = 20):
        self.max_iter = int(max_iter)
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.window = int(window_size)
        self.logger = logging.getLogger("revvit_video.train")

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
        loss = self._median(storage, "total_loss")
        top1 = self._median(storage, "train_top1")
        t = self._median(storage, "time")
        data_t = self._median(storage, "data_time")
        clips = self._median(storage, "clips")
        lr = storage.latest().get("lr", (None,))[0]
        skipped = storage.latest().get("skipped_videos", (0,))[0]
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
            if clips:
                parts.append(f"{clips / t:.1f} clips/s")
            parts.append(f"({t:.3f} s/it" + (f", data {data_t:.3f} s)" if data_t is not None
                                             else ")"))
            eta = datetime.timedelta(seconds=int(t * (self.max_iter - it - 1)))
            parts.append(f"eta {eta}")
        parts.append(f"skipped {int(skipped)}")
        self.logger.info("  ".join(parts))

