"""Every file under configs/ loads, and its model builds at full size; a config that names an
official checkpoint builds exactly the weights that checkpoint holds.

The parameter list is the folder itself, so a new config is covered without touching this file.
Behaviour at small size is tested per family: a COCO training step (test_d2.py), the Kinetics
loaders, optimizer and schedule (test_video.py), the ImageNet eval settings
(test_eval_imagenet.py).
"""
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

import revvit_d2

from _helpers import KEYS_DIR, official_key_shapes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.py"))

# detectron2's own ViT calls .item() in its constructor, which the meta device cannot do: that
# model is built on the CPU (3 s), every other one on the meta device (no memory, no init time).
NEEDS_REAL_TENSORS = {"COCO/mask_rcnn_vit_b_100ep.py", "COCO/mask_rcnn_vit_synthetic.py"}

# What a detection trunk leaves out of an ImageNet checkpoint (classification head, final norm)
# and adds to it (Rev-MViT's per-scale output norms): the only differences allowed.
UNUSED_BY_DETECTION = ("head.", "norm.")
NEW_IN_DETECTION = ("out_norms.",)


def _name(path: Path) -> str:
    return path.relative_to(ROOT / "configs").as_posix()


def _official_checkpoint(cfg):
    """The official SlowFast file the config starts from or evaluates (e.g. "REV_VIT_B"), or
    None when it names none."""
    names = [cfg.get("train", {}).get("init_checkpoint"), cfg.get("eval", {}).get("checkpoint")]
    names = [Path(str(n)).name for n in names if n]
    official = [n[:-len(".pyth")] for n in names if n.endswith(".pyth")]
    assert len(official) <= 1, names
    return official[0] if official else None


def _trunk(model):
    """The reversible network of a model built from a config (a classifier is its own)."""
    if not hasattr(model, "backbone"):
        return model
    backbone = model.backbone
    return backbone.net if hasattr(backbone, "net") else backbone.bottom_up


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_loads_and_builds_at_full_size(path):
    cfg = LazyConfig.load(str(path))
    if "model" not in cfg:  # a fragment the experiment files import, e.g. the COCO loader
        assert path.parent.name == "common" and "dataloader" in cfg, sorted(cfg)
        return
    device = "cpu" if _name(path) in NEEDS_REAL_TENSORS else "meta"
    with torch.device(device):
        model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 10**5

    official = _official_checkpoint(cfg)
    if official is None:
        return
    # The checkpoint's layout is committed as tests/data/keys/official_keys_<NAME>.txt.
    assert (KEYS_DIR / f"official_keys_{official}.txt").is_file(), (
        f"{_name(path)} names {official}.pyth, whose key layout is not in tests/data/keys")
    expected = {k: tuple(v.shape) for k, v in revvit_d2.convert_slowfast_state_dict(
        official_key_shapes(f"official_keys_{official}.txt")).items()}
    trunk = _trunk(model)
    got = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    if trunk is not model:  # a detection backbone: the differences listed above, nothing else
        assert all(k.startswith(UNUSED_BY_DETECTION) for k in set(expected) - set(got))
        assert all(k.startswith(NEW_IN_DETECTION) for k in set(got) - set(expected))
        expected = {k: v for k, v in expected.items() if k in got}
        got = {k: v for k, v in got.items() if k in expected}
    assert got == expected
