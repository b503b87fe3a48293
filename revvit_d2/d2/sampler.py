"""A detection training loader that can start at any iteration and repeat itself exactly.

detectron2's ``TrainingSampler`` restarts its infinite shuffle from the beginning when a job
resumes, and augmentations draw from the global RNGs of whichever worker maps the image, so a
resumed run sees other images than the uninterrupted one would have. Here:

* the sample stream is a function of the seed: epoch ``e`` is ``randperm(N)`` from a generator
  seeded with ``(seed, e)``; position ``p`` of the stream (``e * N + i``) is dealt to rank
  ``p % world_size``, as ``TrainingSampler`` shards;
* each rank groups its share into batches by aspect ratio (``w > h`` or not, detectron2's
  ``AspectRatioGroupedDataset`` rule) on the image sizes of the dataset dicts, before any image
  is read, so batch ``j`` of a rank is known without mapping batches ``0..j-1``;
* batch ``j`` is mapped by data-loader worker ``j % num_workers`` (the order in which
  ``DataLoader`` collects batches from its workers), each sample under RNGs seeded from
  ``(seed, p)`` (:func:`~revvit_d2.d2.determinism.seeded_rng`); a sample the mapper rejects
  (returns None: unreadable file) is replaced by a seeded random other one of its group.

``build_resumable_train_loader(..., start_iter=k)`` therefore yields, from its first batch,
exactly batch ``k`` of the uninterrupted run, for any number of workers. Starting at ``k``
only walks the index stream (no image is read).
"""
import itertools
import logging
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper
from torch.utils.data import IterableDataset, get_worker_info

from ..utils.seeding import derive_seed, seeded_rng

__all__ = ["ResumableTrainingStream", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)

Key = Tuple[int, int]  # (dataset index, position in the sample stream)


class ResumableTrainingStream(IterableDataset):
    """Mapped training samples of this rank, batch after batch, from batch `start_iter`.

    Args:
        dataset: list of dataset dicts (or a map-style dataset).
        mapper: dataset dict -> model input, or None to reject the sample.
        batch_size: images per batch on this rank.
        seed: seed of the order, the grouping and the augmentations.
        start_iter: first batch to yield.
        aspect_ratio_grouping: batch images with ``w > h`` and the others separately (needs
            ``width`` / ``height`` in the dicts; otherwise no grouping).
        shuffle: a new random order each epoch (else the dataset order).
        rank, world_size: default: this process in ``detectron2.utils.comm``.
        max_tries: rejected samples in a row before giving up.
    """

    def __init__(self, dataset, mapper, batch_size: int, *, seed: int, start_iter: int = 0,
                 aspect_ratio_grouping: bool = True, shuffle: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 max_tries: int = 100):
        self.groups = _aspect_groups(dataset) if aspect_ratio_grouping else None
        if aspect_ratio_grouping and self.groups is None:
            logger.warning("dataset dicts without width/height: no aspect-ratio grouping")
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        self.dataset = dataset
        if len(self.dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.mapper = PicklableWrapper(mapper)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_iter = int(start_iter)
        self.shuffle = bool(shuffle)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        self.max_tries = int(max_tries)

    def _stream(self) -> Iterator[Key]:
        n = len(self.dataset)
        for epoch in itertools.count():
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = range(n)
            yield from zip(order, range(epoch * n, (epoch + 1) * n))

    def batch_keys(self) -> Iterator[List[Key]]:
        """This rank's batches of keys, from batch 0 on (cheap: no image is read)."""
        mine = itertools.islice(self._stream(), self.rank, None, self.world_size)
        if self.groups is None:
            while True:
                yield list(itertools.islice(mine, self.batch_size))
        buckets: Tuple[List[Key], List[Key]] = ([], [])
        for key in mine:
            bucket = buckets[self.groups[key[0]]]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def __getitem__(self, key: Key):
        index, position = key
        for attempt in range(self.max_tries):
            with seeded_rng(derive_seed(self.seed, position, attempt)):
                out = self.mapper(self.dataset[index])
                if out is not None:
                    return out
                # Another image of the same aspect-ratio group, drawn from the seeded RNG.
                if self.groups is None:
                    index = random.randrange(len(self.dataset))
                else:
                    index = random.choice(np.flatnonzero(self.groups == self.groups[index]))
        raise RuntimeError(f"the mapper rejected {self.max_tries} training samples in a row")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = itertools.islice(self.batch_keys(), self.start_iter, None)
        for j, keys in enumerate(batches):
            if j % workers == worker:
                for key in keys:
                    yield self[key]


def _aspect_groups(dataset) -> Optional[np.ndarray]:
    if not isinstance(dataset, Sequence) or not all("width" in d and "height" in d
                                                    for d in dataset):
        return None
    return np.asarray([0 if d["width"] > d["height"] else 1 for d in dataset], dtype=np.uint8)


def build_resumable_train_loader(dataset, *, mapper, total_batch_size: int, seed: int,
                                 start_iter: int = 0, aspect_ratio_grouping: bool = True,
                                 num_workers: int = 0, collate_fn=None, **kwargs):
    """``build_detection_train_loader`` with the same arguments (no ``sampler``) plus `seed`
    and `start_iter`, over a :class:`ResumableTrainingStream`."""
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(f"total_batch_size {total_batch_size} is not a positive multiple of "
                         f"the {world} processes")
    stream = ResumableTrainingStream(dataset, mapper, total_batch_size // world, seed=seed,
                                     start_iter=start_iter,
                                     aspect_ratio_grouping=aspect_ratio_grouping)
    return build_detection_train_loader(stream, mapper=None, total_batch_size=total_batch_size,
                                        aspect_ratio_grouping=False, num_workers=num_workers,
                                        collate_fn=collate_fn,
                                        seed=derive_seed(seed, comm.get_rank()), **kwargs)
