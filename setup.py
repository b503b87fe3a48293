#!/usr/bin/env python
"""revvit: Reversible Vision Transformers (Rev-ViT, Rev-MViT) for Detectron2 and PyTorchVideo.

Two importable packages:

* ``revvit_d2`` (folder ``revvit_d2/``): the reversible engine, the models, checkpoint conversion
  and the Detectron2 wrapping.
* ``revvit_video`` (folder ``video/``): the PyTorchVideo wrapping. The folder is called ``video``
  as the project layout asks, but it is installed under the import name ``revvit_video`` so it
  cannot clash with any other package called ``video``.

``tools/`` and ``configs/`` are deliberately not packages.
"""
from setuptools import setup

setup(
    name="revvit",
    version="0.1.0",
    description="Reversible Vision Transformers for Detectron2 and PyTorchVideo",
    python_requires=">=3.9",
    packages=[
        "revvit_d2",
        "revvit_d2.modeling",
        "revvit_d2.data",
        "revvit_d2.data.synthetic",
        "revvit_d2.d2",
        "revvit_d2.training",
        "revvit_d2.utils",
        "revvit_video",
    ],
    package_dir={"revvit_video": "video"},
    install_requires=[
        "torch>=2.6",  # torch.serialization.safe_globals (weights-only loading)
        "torchvision>=0.21",
        "fvcore>=0.1.5.post20221221",
        "pycocotools>=2.0.7",
        "av>=12",
        "tqdm>=4",  # progress bars (tools/check_dataset.py)
        "pytorchvideo>=0.1.5",
        # detectron2 is not on PyPI under its own name; see README ("Installing by hand").
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "matplotlib"]},
)
