"""Data without detectron2 or pytorchvideo (see docs/architecture.md).

* :mod:`.generated`: the write-once protocol of generated dataset folders;
* :mod:`.synthetic`: the built-in synthetic datasets (COCO shapes, ImageNet folder, Kinetics
  clips);
* :mod:`.imagefolder`: the official ImageNet eval preprocessing and a corruption-tolerant
  ``ImageFolder``.

The Detectron2 parts (dataset registration, the bad-input tolerant ``DatasetMapper``, the
resumable training stream) live in :mod:`revvit_d2.d2`; the Kinetics loaders in
:mod:`revvit_video.data`.
"""
