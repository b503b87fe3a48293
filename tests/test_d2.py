"""Detectron2 wrapping: backbone contract, configs, checkpoints, the yacs path."""
import glob
import logging
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.fpn import FPN
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

import revvit_d2
from revvit_d2.d2 import HybridStem, RevMViTBackbone, RevViTBackbone, RevvitCheckpointer
from revvit_d2.utils.io import read_checkpoint

from _d2_helpers import (TINY_MVIT, TINY_VIT, fake_batch, hybrid_stem, tiny_fpn, tiny_sfp,
                         tiny_sfp_hybrid)
from _helpers import load_oracle

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make", [tiny_sfp, tiny_sfp_hybrid, tiny_fpn,
                                  lambda: RevViTBackbone(**TINY_VIT),
                                  lambda: RevMViTBackbone(**TINY_MVIT)])
@pytest.mark.parametrize("hw", [(64, 64), (97, 130), (33, 250)])
def test_output_shape_matches_outputs_at_odd_sizes(make, hw):
    backbone = make()
    images = ImageList.from_tensors([torch.randn(3, *hw), torch.randn(3, 40, 50)],
                                    backbone.size_divisibility,
                                    padding_constraints=backbone.padding_constraints)
    H, W = images.tensor.shape[-2:]
    assert H % backbone.size_divisibility == 0 and W % backbone.size_divisibility == 0
    assert H >= hw[0] and W >= hw[1] and H - hw[0] < backbone.size_divisibility
    out = backbone(images.tensor)
    shapes = backbone.output_shape()
    assert list(out) == list(shapes)
    for name, t in out.items():
        spec = shapes[name]
        assert t.shape[1] == spec.channels, name
        # p6 (LastLevelMaxPool, stride 64) rounds up when the padding is only to 32
        assert (t.shape[-2], t.shape[-1]) == (-(-H // spec.stride), -(-W // spec.stride)), name


def test_padding_constraints_use_the_correct_key():
    sfp = tiny_sfp()
    assert sfp.padding_constraints["size_divisibility"] == 32
    assert sfp.size_divisibility == 32
    assert "size_divisiblity" not in sfp.padding_constraints


@pytest.mark.parametrize("make", [tiny_sfp, tiny_sfp_hybrid, tiny_fpn])
def test_every_parameter_gets_a_gradient_and_freezing_works(make):
    free = make()
    sum(v.mean() for v in free(torch.randn(2, 3, 64, 96)).values()).backward()
    missing = [n for n, p in free.named_parameters() if p.grad is None]
    # LastLevelMaxPool has no parameters; p6 only pools p5
    assert missing == [], missing
    frozen = make(freeze_patch_embed=True, freeze_blocks=2)
    sum(v.mean() for v in frozen(torch.randn(2, 3, 64, 96)).values()).backward()
    for n, p in frozen.named_parameters():
        frozen_part = ".patch_embed." in n or ".pos_embed" in n or ".blocks.0." in n or \
            ".blocks.1." in n
        assert (p.grad is None) == frozen_part, n


def test_rev_mvit_backbone_gives_each_returned_level_its_own_norm():
    """The per-level norms live in the backbone (not the core model), under the state-dict
    names RevvitCheckpointer expects (``out_norms.<level>.``, after the trunk); the
    classifier's final norm and head are gone."""
    bb = RevMViTBackbone(**dict(TINY_MVIT, out_features=("scale2", "scale4"))).eval()
    keys = list(bb.state_dict())
    norms = ["out_norms.scale2.weight", "out_norms.scale2.bias", "out_norms.scale4.weight",
             "out_norms.scale4.bias"]
    assert keys[-4:] == norms and not any(k.startswith(("norm.", "head.")) for k in keys)
    torch.testing.assert_close(bb.out_norms.scale2.bias, torch.full((32,), 0.02))  # official init
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb(x)
        assert list(out) == ["scale2", "scale4"]
        bb.out_norms.scale4.bias.add_(1.0)  # a learned affine norm, fuse "concat" = identity
        torch.testing.assert_close(bb(x)["scale4"], out["scale4"] + 1.0)
        torch.testing.assert_close(bb(x)["scale2"], out["scale2"])
    with pytest.raises(ValueError, match="unknown out_features"):
        RevMViTBackbone(**dict(TINY_MVIT, out_features=("scale9",)))


def test_hybrid_stem_replaces_the_patch_projection():
    net = RevViTBackbone(stem=hybrid_stem(), **TINY_VIT)
    assert isinstance(net.patch_embed.proj, HybridStem)
    assert net.patch_embed.proj.stride == net.patch_size == 16
    x = torch.randn(1, 3, 64, 96)
    assert net(x)["last_feat"].shape == (1, 2 * TINY_VIT["embed_dim"], 4, 6)
    for bad in (dict(stage_channels=(32, 64)), dict(out_channels=32)):  # stride 8 / width 32
        kw = dict(out_channels=TINY_VIT["embed_dim"], stem_channels=32,
                  stage_channels=(32, 64, 96), blocks_per_stage=1)
        kw.update(bad)
        with pytest.raises(ValueError, match="stride == patch_size"):
            RevViTBackbone(stem=HybridStem(**kw), **TINY_VIT)
    with pytest.raises(ValueError, match="must change the width"):
        HybridStem(out_channels=64, stage_channels=(64, 64))


CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "COCO" / "*.py")))  # full size: test_configs.py

TINY_OVERRIDES = {
    "revvit": [f"model.backbone.net.{k}={v}" for k, v in TINY_VIT.items()] + [
        "model.backbone.net.window_size=2", "model.backbone.net.global_block_indexes=[1,3]",
        "model.backbone.square_pad=0"],
    "vit": ["model.backbone.net.img_size=64", "model.backbone.net.pretrain_img_size=64",
            "model.backbone.net.embed_dim=64", "model.backbone.net.depth=4",
            "model.backbone.net.num_heads=2", "model.backbone.net.window_size=2",
            "model.backbone.net.window_block_indexes=[0,2]", "model.backbone.square_pad=0"],
    "revmvit": ["model.backbone.bottom_up.input_size=[64,64]",
                "model.backbone.bottom_up.embed_dim=16", "model.backbone.bottom_up.depth=7",
                "model.backbone.bottom_up.dim_mul=[[1,2.0],[3,2.0],[5,2.0]]",
                "model.backbone.bottom_up.head_mul=[[1,2.0],[3,2.0],[5,2.0]]",
                "model.backbone.bottom_up.pool_q_stride=[[1,1,2,2],[3,1,2,2],[5,1,2,2]]",
                "model.backbone.bottom_up.transition_layers=[1,3,5]"],
}
HEAD_OVERRIDES = ["model.roi_heads.batch_size_per_image=32",
                  "model.proposal_generator.batch_size_per_image=32",
                  "model.proposal_generator.post_nms_topk=[50,50]",
                  "model.proposal_generator.pre_nms_topk=[100,100]"]


def _family(path):
    name = Path(path).name
    for fam in ("revmvit", "revvit", "vit"):
        if f"_{fam}_" in name:
            return fam
    raise AssertionError(f"unknown config family: {name}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
def test_config_loads_and_trains_one_step(path):
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, TINY_OVERRIDES[_family(path)] + HEAD_OVERRIDES)
    for part in ("model", "optimizer", "train", "dataloader", "lr_multiplier"):
        assert part in cfg, part
    model = instantiate(cfg.model)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    num_classes = cfg.model.roi_heads.num_classes
    with EventStorage(0):
        losses = model(fake_batch(num_classes))
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()


@pytest.mark.parametrize("name,family", [
    ("slowfast_revvit_tiny.pt", "revvit"),
    ("mmpretrain_revvit_tiny.pt", "revvit"),
    ("slowfast_revmvit_tiny_image.pt", "revmvit"),
])
def test_init_checkpoint_from_official_files_loads_every_backbone_key(name, family, tmp_path,
                                                                       caplog):
    data = load_oracle(name)
    if family == "revvit":
        backbone = tiny_sfp(depth=4)
        core = backbone.net
    else:
        bottom_up = RevMViTBackbone(**dict(TINY_MVIT, depth=5, transition_layers=(1, 3),
                                           dim_mul=((1, 2.0), (3, 2.0)),
                                           head_mul=((1, 2.0), (3, 2.0)),
                                           pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2)),
                                           pool_kvq_kernel=(1, 3, 3),
                                           pool_kv_stride_adaptive=(1, 4, 4),
                                           pre_q_fusion="concat_linear_2",
                                           out_features=("scale2", "scale3", "scale4")))
        backbone = FPN(bottom_up=bottom_up, in_features=["scale2", "scale3", "scale4"],
                       out_channels=32)
        core = bottom_up
    path = tmp_path / ("ckpt.pyth" if name.startswith("slowfast") else "ckpt.pth")
    wrapper = "model_state" if name.startswith("slowfast") else "state_dict"
    torch.save({wrapper: data["state_dict"]}, path)
    model = torch.nn.Module()
    model.backbone = backbone
    with caplog.at_level(logging.INFO):
        RevvitCheckpointer(model).load(str(path))
    expected = revvit_d2.convert_state_dict({wrapper: data["state_dict"]})
    own = core.state_dict()
    loaded = [k for k in own if k in expected]
    # every backbone tensor of the core model comes from the checkpoint, except the per-level
    # norms that only the detector has
    assert sorted(set(own) - set(loaded)) == sorted(k for k in own if k.startswith("out_norms."))
    for k in loaded:
        assert torch.equal(own[k], expected[k]), k
    assert f"loaded {len(loaded)}/{len(own)} backbone tensors" in caplog.text
    assert "checkpoint tensors the backbone does not use: head.bias, head.weight" in caplog.text


def test_init_checkpoint_into_a_hybrid_stem_loads_every_other_key(tmp_path, caplog):
    data = load_oracle("slowfast_revvit_tiny.pt")
    path = tmp_path / "ckpt.pyth"
    torch.save({"model_state": data["state_dict"]}, path)
    model = torch.nn.Module()
    model.backbone = tiny_sfp_hybrid(depth=4)
    stem_before = {k: v.clone() for k, v in model.backbone.net.patch_embed.state_dict().items()}
    with caplog.at_level(logging.INFO):
        RevvitCheckpointer(model).load(str(path))
    expected = revvit_d2.convert_state_dict({"model_state": data["state_dict"]})
    own = model.backbone.net.state_dict()
    loaded = [k for k in own if k in expected]
    assert sorted(set(own) - set(loaded)) == sorted(k for k in own if k.startswith("patch_embed."))
    for k in loaded:
        assert torch.equal(own[k], expected[k]), k
    for k, v in model.backbone.net.patch_embed.state_dict().items():
        assert torch.equal(v, stem_before[k]), k  # the stem keeps its own init
    assert "checkpoint tensors the backbone does not use: head.bias, head.weight, " \
        "patch_embed.proj.bias, patch_embed.proj.weight" in caplog.text
    assert "backbone tensors not in the checkpoint (kept at init): patch_embed.proj.proj.bias" \
        in caplog.text


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = revvit_d2.create_model("rev_mvit_test")
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    model = torch.nn.Module()
    model.backbone = tiny_sfp()
    with pytest.raises(revvit_d2.CheckpointMismatchError, match="shape mismatches"):
        RevvitCheckpointer(model).load(str(path))


def test_checkpointer_saves_atomically(tmp_path, monkeypatch):
    model = torch.nn.Module()
    model.backbone = tiny_sfp()
    ckpt = RevvitCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000009")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"

    def crash(*a, **k):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000019")
    assert not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "model_0000009.pth")["model"]  # data only


@pytest.mark.parametrize("builder,variant,hybrid", [
    ("build_revvit_sfp_backbone", "rev_vit_test", False),
    ("build_revvit_sfp_backbone", "rev_vit_test", True),
    ("build_revmvit_fpn_backbone", "rev_mvit_test", False)])
def test_yacs_path_builds_registered_backbones(builder, variant, hybrid):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from revvit_d2.d2 import add_revvit_config

    cfg = add_revvit_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = builder
    cfg.MODEL.REVVIT.VARIANT = variant
    cfg.MODEL.REVVIT.IMG_SIZE = 64
    cfg.MODEL.REVVIT.OUT_FEATURES = ["scale2", "scale3", "scale4"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.REVVIT.HYBRID_STEM.ENABLED = hybrid
    cfg.MODEL.REVVIT.HYBRID_STEM.STAGE_CHANNELS = [32, 64, 96]
    cfg.MODEL.REVVIT.HYBRID_STEM.STEM_CHANNELS = 32
    backbone = build_backbone(cfg)
    assert isinstance(backbone.bottom_up.patch_embed.proj if variant == "rev_mvit_test"
                      else backbone.net.patch_embed.proj, HybridStem) == hybrid
    out = backbone(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[1] for k, v in out.items()} == {k: 32 for k in backbone.output_shape()}
