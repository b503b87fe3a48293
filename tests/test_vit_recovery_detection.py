"""Plain ViT detectors and MAE weights into Rev-ViT detectors through ``train.init_checkpoint``
(the RevvitCheckpointer that tools/train_net.py uses): the MAE config, a whole ViTDet detector
(backbone converted, pyramid and heads by name), and benchmarks/vit_recovery_detection.py."""
import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
timm = pytest.importorskip("timm")
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from revvit_d2.checkpoint import convert_state_dict  # noqa: E402
from revvit_d2.d2.checkpoint import RevvitCheckpointer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "configs" / "COCO"
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4)


def _perturb(model, seed=0):
    """Random, non-trivial weights (zero-initialised biases would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _mae_file(path):
    """An MAE pre-training file as released: the encoder (class token, no head) plus decoder."""
    torch.manual_seed(0)
    vit = _perturb(VisionTransformer(**TINY, num_classes=0, class_token=True))
    sd = dict(vit.state_dict())
    sd.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 48),
               "decoder_pos_embed": torch.zeros(1, 17, 32),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
               "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(192, 32)})
    torch.save({"model": sd}, path)
    return sd


def test_mae_config_converts_an_mae_file_through_init_checkpoint(tmp_path, caplog):
    cfg = LazyConfig.load(str(COCO / "mask_rcnn_revvit_b_mae_100ep.py"))
    assert cfg.train.init_checkpoint == "mae_pretrain_vit_base.pth"
    assert cfg.model.backbone.net.fuse == "avg_prenorm"  # Re^2TAL: MAE's final norm unchanged
    # the config's model at a reduced size (windows and global blocks kept)
    cfg.model.backbone.net.update(TINY, window_size=2, global_block_indexes=(1, 3))
    cfg.model.backbone.square_pad = 64
    model = instantiate(cfg.model)
    sd = _mae_file(tmp_path / "mae_pretrain_vit_base.pth")
    cfg.train.init_checkpoint = str(tmp_path / "mae_pretrain_vit_base.pth")
    with caplog.at_level(logging.INFO):
        RevvitCheckpointer(model).load(cfg.train.init_checkpoint, checkpointables=[])
    net = model.backbone.net
    assert torch.equal(net.blocks[3].F.attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(net.blocks[0].G.mlp.fc2.bias, sd["blocks.0.mlp.fc2.bias"])
    assert torch.equal(net.norm.weight, sd["norm.weight"])  # width C: not duplicated
    assert torch.equal(net.pos_embed, sd["pos_embed"][:, 1:])  # class-token row dropped
    log = caplog.text
    for dropped in ("mask_token", "decoder_embed.weight", "decoder_pred.weight", "cls_token"):
        assert f"dropped {dropped}:" in log
    assert "(mae format): loaded 53/53 backbone tensors" in log


def _synthetic(name, **net):
    cfg = LazyConfig.load(str(COCO / name))
    for key, value in net.items():
        setattr(cfg.model.backbone.net, key, value)
    torch.manual_seed(1)
    return _perturb(instantiate(cfg.model), seed=2)


@pytest.fixture(scope="module")
def vitdet_detector(tmp_path_factory):
    """A plain ViT Mask R-CNN (the demo with detectron2's ViT) saved as a detector checkpoint."""
    plain = _synthetic("mask_rcnn_vit_synthetic.py")
    path = tmp_path_factory.mktemp("vitdet") / "model_final.pth"
    torch.save({"model": plain.state_dict(), "iteration": 7}, path)
    return path, plain.state_dict()


def test_vitdet_detector_loads_whole_into_the_rev_vit_detector(vitdet_detector, caplog):
    path, plain = vitdet_detector
    rev = _synthetic("mask_rcnn_revvit_synthetic.py", stem=None, fuse="avg_prenorm")
    with caplog.at_level(logging.INFO):
        RevvitCheckpointer(rev).load(str(path), checkpointables=[])
    got = rev.state_dict()
    backbone = convert_state_dict(
        {k[len("backbone.net."):]: v for k, v in plain.items() if k.startswith("backbone.net.")},
        "timm", model=rev.backbone.net)
    used = 0
    for key, value in got.items():
        if key.startswith("backbone.net."):
            expected = backbone[key[len("backbone.net."):]]
        else:  # pyramid, RPN, ROI heads: the same names and shapes in both detectors
            expected = plain[key]
        assert torch.equal(value, expected), key
        used += 1
    # every tensor of the plain detector went somewhere: its ViT tensors into the Rev-ViT
    # (norm.* is the one tensor pair new by design: ViTDet has no final norm)
    heads = [k for k in plain if not k.startswith("backbone.net.")]
    assert used == len(heads) + len(backbone)
    assert len(backbone) == len([k for k in plain if k.startswith("backbone.net.")]) + 2
    assert torch.equal(rev.backbone.net.norm.weight, torch.ones(128))
    assert "passed on by name" in caplog.text
    assert "Some model parameters or buffers are not found" not in caplog.text


def test_vitdet_detector_into_the_concat_fusion_skips_only_the_pyramid_inputs(vitdet_detector,
                                                                              caplog):
    """With the official fusion ("concat", 2C channels) the pyramid's first layers have another
    shape: detectron2 skips them with a warning; everything else loads."""
    path, plain = vitdet_detector
    rev = _synthetic("mask_rcnn_revvit_synthetic.py", stem=None)
    with caplog.at_level(logging.INFO):
        RevvitCheckpointer(rev).load(str(path), checkpointables=[])
    got = rev.state_dict()
    skipped = [k for k in plain if not k.startswith("backbone.net.")
               and not torch.equal(got[k], plain[k])]
    assert skipped and all(k.startswith("backbone.simfp_") for k in skipped), skipped
    assert "incompatible shapes" in caplog.text or "shape" in caplog.text
    assert torch.equal(got["roi_heads.box_predictor.cls_score.weight"],
                       plain["roi_heads.box_predictor.cls_score.weight"])


def test_plain_vit_detector_loads_its_own_checkpoint(vitdet_detector):
    """A 'vitdet' file into a model without a reversible backbone (--eval-only / --resume of the
    plain config) loads as it is instead of being converted."""
    path, plain = vitdet_detector
    model = _synthetic("mask_rcnn_vit_synthetic.py")
    RevvitCheckpointer(model).load(str(path), checkpointables=[])
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())


def test_recovery_benchmark_smoke_writes_well_formed_json(tmp_path):
    """Four tools/train_net.py processes at 2 iterations on 8 + 4 generated images (about 40 s
    of CPU time)."""
    spec = importlib.util.spec_from_file_location(
        "vit_recovery_detection", ROOT / "benchmarks" / "vit_recovery_detection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res"
    bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    doc = json.loads(out.with_suffix(".json").read_text(),  # strict JSON: no NaN / Infinity
                     parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert [r["model"] for r in doc["rows"]] == list(bench.ROWS) and doc["complete"]
    for row in doc["rows"]:
        for key in ("box_AP", "box_AP50", "mask_AP"):
            v = row[key]
            assert v is None or (math.isfinite(v) and 0 <= v <= 100), row
    assert doc["settings"]["plain_iters"] == 2 and doc["machine"]["cpu_count"]
    assert "| converted + fine-tuned reversibly | 4 |" in out.with_suffix(".md").read_text()
