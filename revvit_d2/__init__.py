"""revvit_d2: Reversible Vision Transformers (Rev-ViT, Rev-MViT) for downstream vision.

The core (``revvit_d2.modeling``) is plain torch; the checkpoint converters, the official
config readers and ``create_model`` build on it and never import detectron2; the Detectron2
wrapping lives in ``revvit_d2.d2``. See docs/architecture.md for the layers.
"""
from .checkpoint import (
    CheckpointMismatchError,
    convert_mmpretrain_state_dict,
    convert_slowfast_state_dict,
    convert_state_dict,
    load_pretrained,
)
from .factory import create_model
from .modeling import (EngineOptions, RevMViT, RevViT, get_pretrained_cfg, list_models,
                       shard_model)
from .official import build_from_mmpretrain_cfg, build_from_slowfast_cfg
from .utils.io import UnsafeCheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "EngineOptions",
    "RevMViT",
    "RevViT",
    "UnsafeCheckpointError",
    "build_from_mmpretrain_cfg",
    "build_from_slowfast_cfg",
    "convert_mmpretrain_state_dict",
    "convert_slowfast_state_dict",
    "convert_state_dict",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "load_pretrained",
    "shard_model",
]
