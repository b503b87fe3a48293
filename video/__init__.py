"""revvit_video: the PyTorchVideo wrapping of the reversible video transformers.

Installed from the folder ``video/`` under the import name ``revvit_video`` (see setup.py), so
that it cannot shadow another package called ``video``::

    from revvit_video import create_rev_mvit, rev_mvit_b_16x4
    model = rev_mvit_b_16x4(checkpoint="REV_MVIT_B_16x4.pyth")   # official weights, strict load

Modules:

* :mod:`revvit_video.models`: ``create_rev_mvit``, ``create_rev_vit_video`` (pytorchvideo-style
  builders: revvit_d2 ``RevMViT`` trunk + pytorchvideo head) and the ``RevVideoNet`` class;
* :mod:`revvit_video.hub`: ``rev_mvit_b_16x4``, ``rev_mvit_video_test``,
  ``load_video_checkpoint``;
* :mod:`revvit_video.data`, :mod:`revvit_video.datasets`, :mod:`revvit_video.transforms`:
  Kinetics through ``pytorchvideo.data`` with PyAV, the official sampling, counted skipping of
  bad videos (the built-in synthetic clips: :mod:`revvit_d2.data.synthetic.kinetics`);
* :mod:`revvit_video.compat`: the ``torchvision.transforms.functional_tensor`` alias that
  ``pytorchvideo.transforms`` needs on current torchvision;
* :mod:`revvit_video.engine`: multi-view aggregation, trainer and checkpointing used by
  tools/run_video.py (imports detectron2; not imported here).
"""
from .hub import load_video_checkpoint, rev_mvit_b_16x4, rev_mvit_video_test
from .models import RevVideoNet, create_rev_mvit, create_rev_vit_video

__all__ = [
    "RevVideoNet",
    "create_rev_mvit",
    "create_rev_vit_video",
    "load_video_checkpoint",
    "rev_mvit_b_16x4",
    "rev_mvit_video_test",
]
