"""Checkpoint conversion and strict loading, including the full-size official key layouts."""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import revvit_d2
from revvit_d2.checkpoint import CheckpointMismatchError, detect_format

from _helpers import load_oracle, official_key_shapes


def _model_shapes(name, **kw):
    with torch.device("meta"):
        model = revvit_d2.create_model(name, **kw)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key_file,name", [
    ("official_keys_REV_VIT_S.txt", "rev_vit_s"),
    ("official_keys_REV_VIT_B.txt", "rev_vit_b"),
    ("official_keys_REV_MVIT_B.txt", "rev_mvit_b"),
    ("official_keys_REV_MVIT_B_16x4.txt", "rev_mvit_b_16x4"),
])
def test_full_size_slowfast_layout_maps_exactly(key_file, name):
    converted = revvit_d2.convert_slowfast_state_dict(official_key_shapes(key_file))
    assert {k: tuple(v.shape) for k, v in converted.items()} == _model_shapes(name)


@pytest.mark.parametrize("key_file,name", [
    ("mmpretrain_keys_revvit_small.txt", "rev_vit_s"),
    ("mmpretrain_keys_revvit_base.txt", "rev_vit_b"),
])
def test_full_size_mmpretrain_layout_maps_exactly(key_file, name):
    converted = revvit_d2.convert_mmpretrain_state_dict(official_key_shapes(key_file))
    assert {k: tuple(v.shape) for k, v in converted.items()} == _model_shapes(name)


def test_wrappers_and_ddp_prefix_are_understood():
    data = load_oracle("slowfast_revvit_tiny.pt")
    sd = data["state_dict"]
    ref = revvit_d2.convert_slowfast_state_dict(sd)
    for wrapped in ({"model_state": sd, "epoch": 3}, {"module." + k: v for k, v in sd.items()}):
        assert detect_format(wrapped) == "slowfast"
        out = revvit_d2.convert_state_dict(wrapped)
        assert out.keys() == ref.keys()
    mm = load_oracle("mmpretrain_revvit_tiny.pt")["state_dict"]
    assert detect_format({"state_dict": mm, "meta": {}}) == "mmpretrain"


def test_converters_map_gradient_dicts_like_weights():
    data = load_oracle("slowfast_revvit_tiny.pt")
    g = revvit_d2.convert_slowfast_state_dict(data["grads"])
    w = revvit_d2.convert_slowfast_state_dict(data["state_dict"])
    assert g.keys() == w.keys()
    q = data["grads"]["rev_backbone.layers.1.F.attn.q.weight"]
    v = data["grads"]["rev_backbone.layers.1.F.attn.v.weight"]
    qkv = g["blocks.1.F.attn.qkv.weight"]
    assert torch.equal(qkv[: q.shape[0]], q) and torch.equal(qkv[-v.shape[0]:], v)


def test_incomplete_qkv_is_a_clear_error():
    sd = dict(load_oracle("slowfast_revvit_tiny.pt")["state_dict"])
    del sd["rev_backbone.layers.2.F.attn.k.weight"]
    with pytest.raises(KeyError, match=r"blocks\.2\.F\.attn\..*\['q', 'v'\]"):
        revvit_d2.convert_slowfast_state_dict(sd)


def test_mmpretrain_2022_format_with_cls_token_row_loads_and_matches():
    data = load_oracle("mmpretrain_revvit_tiny.pt")
    sd = OrderedDict(data["state_dict"])
    pos = sd["backbone.pos_embed"]
    sd["backbone.pos_embed"] = torch.cat([torch.randn(1, 1, pos.shape[-1]), pos], dim=1)
    sd["backbone.cls_token"] = torch.zeros(1, 1, pos.shape[-1])
    model = revvit_d2.build_from_mmpretrain_cfg(data["model_config"])
    revvit_d2.load_pretrained(model, {"state_dict": sd, "meta": {}})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data["input"]), data["logits_eval"], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_another_model_is_rejected_with_keys_listed():
    small = revvit_d2.create_model("rev_vit_test", depth=2, embed_dim=32)
    model = revvit_d2.create_model("rev_vit_test")
    with pytest.raises(CheckpointMismatchError) as err:
        revvit_d2.load_pretrained(model, small.state_dict())
    msg = str(err.value)
    assert "missing keys (24): blocks.2." in msg
    assert "shape mismatches" in msg and "pos_embed checkpoint (1, 16, 32) vs model (1, 16, 64)" in msg


def test_missing_and_unexpected_keys_are_reported_exactly():
    model = revvit_d2.create_model("rev_vit_test")
    sd = dict(model.state_dict())
    del sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        revvit_d2.load_pretrained(model, sd)
    assert err.value.missing == ["norm.weight"] and err.value.unexpected == ["extra.thing"]


def test_new_head_with_ignore_prefixes():
    data = load_oracle("slowfast_revvit_tiny.pt")
    model = revvit_d2.create_model("rev_vit_test", num_classes=3)
    report = revvit_d2.load_pretrained(model, data["state_dict"], ignore_prefixes=("head.",))
    assert report["ignored"] == ["head.bias", "head.weight"]
    assert not report["missing"] and not report["unexpected"]


def test_pos_embed_is_resized_for_another_input_size():
    data = load_oracle("slowfast_revvit_tiny.pt")
    model = revvit_d2.create_model("rev_vit_test", img_size=96)
    revvit_d2.load_pretrained(model, data["state_dict"])
    assert model.pos_embed.shape == (1, 36, 64)
    # the resized table, read back at the original 4x4 grid, reproduces the original one closely
    # (bicubic down/up is not exact, but it must be the same embedding, not a fresh init)
    back = revvit_d2.modeling.resize_pos_embed(model.pos_embed.detach(), (6, 6), (4, 4))
    ref = data["state_dict"]["pos_embed"]
    cos = torch.nn.functional.cosine_similarity(back.flatten(), ref.flatten(), 0)
    assert cos > 0.9
    model.eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_convert_checkpoint_cli(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "REV_TINY.pyth"
    torch.save({"model_state": load_oracle("slowfast_revvit_tiny.pt")["state_dict"]}, src)
    out = tmp_path / "converted.pth"
    proc = subprocess.run(
        [sys.executable, str(root / "tools" / "convert_checkpoint.py"), str(src), str(out),
         "--model", "rev_vit_test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rev_backbone.layers.0.F.attn.{q,k,v}.weight -> blocks.0.F.attn.qkv.weight" in proc.stdout
    model = revvit_d2.create_model("rev_vit_test", checkpoint=str(out))
    assert model.head.weight.shape == (10, 128)
    bad = subprocess.run(
        [sys.executable, str(root / "tools" / "convert_checkpoint.py"), str(src), str(out),
         "--model", "rev_vit_s"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "does not match" in bad.stderr
