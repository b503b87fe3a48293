"""Torch Hub entry points of revvit (``torch.hub.load(repo, name, ...)``), as timm and
pytorchvideo users expect::

    import torch
    model = torch.hub.load("/path/to/revvit", "rev_vit_b", source="local",
                           checkpoint="REV_VIT_B.pyth")              # official SlowFast file
    video = torch.hub.load("/path/to/revvit", "rev_mvit_b_16x4", source="local",
                           checkpoint="REV_MVIT_B_16x4.pyth")

Entry points: ``rev_vit_s``, ``rev_vit_b``, ``rev_vit_l``, ``rev_mvit_b`` (images) and
``rev_mvit_b_16x4`` (Kinetics-400 video). Weights cannot be downloaded: ``pretrained=True`` needs ``checkpoint=<local file>``, which is
loaded strictly and read as data only (``allow_unsafe_pickle=True`` executes code from the file:
only for files you trust). Image models accept every checkpoint :func:`revvit_d2.create_model`
does (official SlowFast / mmpretrain, revvit, plain ViT weights with ``rewire=``); the video
model those of :func:`revvit_video.rev_mvit_b_16x4`. Other keyword arguments replace the
variant's constructor arguments (``num_classes``, ``drop_path_rate``, engine options...).

The repository works from a plain clone: when the ``revvit_video`` package is not installed, its
folder ``video/`` is imported under that name.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

from revvit_d2.factory import check_pretrained_request as _check_pretrained_request
from revvit_d2.factory import create_model as _create_model

dependencies = ["torch", "torchvision", "fvcore"]

_ROOT = Path(__file__).resolve().parent


def _video_package():
    """``revvit_video``: the installed package, or this clone's ``video/`` folder under that
    name (a hub load puts only the repository root on ``sys.path``)."""
    if sys.modules.get("revvit_video") is not None:
        return sys.modules["revvit_video"]
    if importlib.util.find_spec("revvit_video") is not None:
        return importlib.import_module("revvit_video")
    spec = importlib.util.spec_from_file_location(
        "revvit_video", _ROOT / "video" / "__init__.py",
        submodule_search_locations=[str(_ROOT / "video")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["revvit_video"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["revvit_video"]
        raise
    return module


def _image_model(name: str, pretrained: bool, checkpoint, kwargs):
    _check_pretrained_request(name, pretrained, checkpoint)
    return _create_model(name, checkpoint=checkpoint, **kwargs)


def rev_vit_s(pretrained: bool = False, checkpoint=None, **kwargs):
    """Rev-ViT-S (ImageNet-1k, 224 px, 1000 classes; official 79.9 top-1, REV_VIT_S.pyth)."""
    return _image_model("rev_vit_s", pretrained, checkpoint, kwargs)


def rev_vit_b(pretrained: bool = False, checkpoint=None, **kwargs):
    """Rev-ViT-B (ImageNet-1k, 224 px, 1000 classes; official 81.8 top-1, REV_VIT_B.pyth)."""
    return _image_model("rev_vit_b", pretrained, checkpoint, kwargs)


def rev_vit_l(pretrained: bool = False, checkpoint=None, **kwargs):
    """Rev-ViT-L (the paper's large size; no official checkpoint was released)."""
    return _image_model("rev_vit_l", pretrained, checkpoint, kwargs)


def rev_mvit_b(pretrained: bool = False, checkpoint=None, **kwargs):
    """Rev-MViT-B (ImageNet-1k, 224 px, 1000 classes; official 82.9 top-1, REV_MVIT_B.pyth)."""
    return _image_model("rev_mvit_b", pretrained, checkpoint, kwargs)


def rev_mvit_b_16x4(pretrained: bool = False, checkpoint=None, **kwargs):
    """Rev-MViT-B 16x4 for Kinetics-400 (official 78.4 / 93.4 top-1 / top-5,
    REV_MVIT_B_16x4.pyth): :func:`revvit_video.rev_mvit_b_16x4`."""
    return _video_package().rev_mvit_b_16x4(pretrained=pretrained, checkpoint=checkpoint,
                                            **kwargs)
