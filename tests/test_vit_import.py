"""Plain ViT weights (timm / DeiT, MAE, detectron2 ViTDet) into Rev-ViT: strict conversion, the
two rewirings and their function, bad input as one line (revvit_d2.vit_import)."""
from functools import partial

import pytest
import torch
from torch import nn

import revvit_d2
from revvit_d2.checkpoint import CheckpointMismatchError, detect_format
from revvit_d2.vit_import import PlainViTMismatch, convert_plain_vit, set_dual_residual

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)


def _perturbed(model):
    """Random, non-trivial weights (timm zero-initialises some biases and the cls token)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _plain(**kw):
    torch.manual_seed(0)
    args = dict(TINY, num_classes=5, class_token=False, global_pool="avg", fc_norm=False)
    args.update(kw)
    return _perturbed(VisionTransformer(**args))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _re2tal_reference(plain, x):
    """The Re^2TAL recurrence z[k+1] = z[k-1] + f_k(z[k]) written out on the timm modules."""
    z = plain.patch_embed(x) + plain.pos_embed  # no class token: (B, N, C)
    prev, cur = z, z
    for blk in plain.blocks:
        for f in (lambda t: blk.attn(blk.norm1(t)), lambda t: blk.mlp(blk.norm2(t))):
            prev, cur = cur, prev + f(cur)
    tokens = plain.norm((prev + cur) / 2)
    return plain.head(tokens.mean(1))


def test_re2tal_computes_the_rewired_recurrence_and_dr2net_starts_at_the_plain_function():
    plain = _plain()
    x = torch.randn(2, 3, 32, 32)
    kw = dict(TINY, num_classes=5)
    with torch.no_grad():
        ref = plain(x)
        re2 = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), kw, rewire="re2tal").eval()
        assert torch.allclose(re2(x), _re2tal_reference(plain, x), atol=1e-5)
        assert _rel(re2(x), ref) > 1e-2  # a different function until fine-tuned
        dr2 = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), kw, rewire="dr2net", beta=1e-4)
        assert _rel(dr2.eval()(x), ref) < 1e-3
        # the end of a Dr2Net schedule (alpha 0, beta 1) is the plain reversible network again
        set_dual_residual(dr2, 0.0, 1.0)
        assert dr2.fuse.stream_scales is None and all(b.F.dual is None for b in dr2.blocks)


@pytest.mark.parametrize("rewire,beta", [("re2tal", 1.0), ("dr2net", 0.5)])
def test_converted_model_reversible_gradients_equal_plain_autograd(rewire, beta):
    plain = _plain()
    model = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), dict(TINY, num_classes=5,
                                                                     drop_path_rate=0.2),
                                           rewire=rewire, beta=beta).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for rev in (True, False):
        model.use_rev_backprop = rev
        model.zero_grad()
        torch.manual_seed(3)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-7, atol=1e-9), name


def test_deit_distilled_and_class_token_models_load_strictly_with_the_drops_listed():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    deit = VisionTransformerDistilled(**TINY, num_classes=5)
    sd = deit.state_dict()
    assert detect_format(sd) == "timm"
    _, report = convert_plain_vit(sd)
    assert {"cls_token", "dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.dropped)
    model = revvit_d2.create_model("rev_vit_test", checkpoint={"model": sd}, **TINY,
                                   num_classes=5)
    assert model.fuse.mode == "avg_prenorm"  # re2tal by default for plain ViT weights
    assert torch.equal(model.pos_embed, sd["pos_embed"][:, 2:])
    assert torch.equal(model.blocks[2].G.mlp.fc2.weight, sd["blocks.2.mlp.fc2.weight"])
    # other grid: the position embedding is resized
    model = revvit_d2.create_model("rev_vit_test", checkpoint=sd, **dict(TINY, img_size=48),
                                   num_classes=5)
    assert model.pos_embed.shape[1] == 36


def test_layer_scale_is_folded_and_qkv_without_bias_gets_zeros():
    plain = _plain(init_values=0.3, qkv_bias=False)
    x = torch.randn(1, 3, 32, 32)
    model = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), dict(TINY, num_classes=5),
                                           rewire="dr2net", beta=1e-4).eval()
    with torch.no_grad():
        assert _rel(model(x), plain(x)) < 1e-3


def test_full_size_vit_base_and_deit_key_layouts_map_exactly():
    """Real shapes of vit_base_patch16_224 / deit_base_distilled_patch16_224 (meta tensors: no
    numbers, nothing run), also into a 384 px model (position embedding resized)."""
    for name, kw in (("vit_base_patch16_224", {}), ("deit_base_distilled_patch16_224", {}),
                     ("vit_base_patch16_224", {"img_size": 384})):
        with torch.device("meta"):
            plain = timm.create_model(name, pretrained=False)
            model = revvit_d2.create_model("rev_vit_b", fuse="avg_prenorm", **kw)
            sd, report = convert_plain_vit(plain.state_dict(), model=model)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {
            k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert not report.new


def _mae_checkpoint():
    vit = _plain(class_token=True, global_pool="token", fc_norm=None, num_classes=0)
    sd = dict(vit.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.randn(32, 48)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["decoder_norm.weight"] = torch.ones(32)
    sd["decoder_pred.weight"] = torch.randn(192, 32)
    return {"model": sd}


def test_mae_pretraining_checkpoint_drops_the_decoder_and_gets_a_new_head():
    ckpt = _mae_checkpoint()
    assert detect_format(ckpt) == "mae"
    _, report = convert_plain_vit(ckpt["model"], model=revvit_d2.create_model(
        "rev_vit_test", fuse="avg_prenorm", **TINY, num_classes=7))
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.weight", "cls_token"} <= set(
        report.dropped)
    assert set(report.new) == {"head.weight", "head.bias"}
    model = revvit_d2.create_model("rev_vit_test", checkpoint=ckpt, **TINY, num_classes=7)
    assert torch.equal(model.norm.weight, ckpt["model"]["norm.weight"])


def _d2_vit(**kw):
    from detectron2.modeling.backbone.vit import ViT
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), window_size=4,
                window_block_indexes=(0, 2), pretrain_img_size=32, pretrain_use_cls_token=True)
    args.update(kw)
    return _perturbed(ViT(**args))


def test_detectron2_vitdet_backbone_converts_with_windows_and_matches_at_the_exact_start():
    pytest.importorskip("detectron2")
    net = _d2_vit()
    ckpt = {"model": {**{f"backbone.net.{k}": v for k, v in net.state_dict().items()},
                      "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 8)}}
    assert detect_format(ckpt) == "vitdet"
    model = revvit_d2.create_model(
        "rev_vit_test", checkpoint=ckpt, rewire="dr2net", beta=1e-4, img_size=64, patch_size=8,
        embed_dim=48, depth=4, num_heads=4, window_size=4, global_block_indexes=(1, 3),
        num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)["last_feat"]  # (1, C, 8, 8), no final norm in ViTDet
        ref = nn.functional.layer_norm(ref.permute(0, 2, 3, 1), (48,), eps=1e-6)
        out = model.forward_features(x)["last_feat"].permute(0, 2, 3, 1)
    assert _rel(out, ref) < 2e-3


@pytest.mark.parametrize("fuse", ["concat", "avg_prenorm"])
def test_vitdet_checkpoint_loads_through_the_detectron2_checkpointer(tmp_path, fuse):
    pytest.importorskip("detectron2")
    from revvit_d2.d2 import RevViTBackbone
    from revvit_d2.d2.checkpoint import RevvitCheckpointer
    net = _d2_vit()
    path = tmp_path / "vitdet.pth"
    torch.save({"model": {f"backbone.net.{k}": v for k, v in net.state_dict().items()}}, path)
    detector = nn.Module()
    detector.backbone = nn.Module()
    detector.backbone.net = RevViTBackbone(img_size=64, patch_size=8, embed_dim=48, depth=4,
                                           num_heads=4, window_size=4,
                                           global_block_indexes=(1, 3), fuse=fuse)
    RevvitCheckpointer(detector).load(str(path))
    core = detector.backbone.net
    assert torch.equal(core.blocks[3].F.attn.qkv.weight, net.blocks[3].attn.qkv.weight)
    width = 96 if fuse == "concat" else 48
    assert torch.equal(core.norm.weight, torch.ones(width))  # new by design: identity affine
    assert core.output_shape()["last_feat"].channels == width
    assert core(torch.randn(1, 3, 64, 64))["last_feat"].shape == (1, width, 8, 8)


def _one_line_error(exc_type, fn):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_is_one_line_naming_the_first_mismatch():
    sd = _plain().state_dict()
    build = partial(revvit_d2.create_model, "rev_vit_test", num_classes=5)
    cases = [
        (dict(TINY, embed_dim=64), "width"),
        (dict(TINY, patch_size=16), "patch size"),
        (dict(TINY, depth=4), "depth"),
        (dict(TINY, num_heads=4, mlp_ratio=2.0), "mlp.fc1"),
    ]
    for kw, word in cases:
        assert word in _one_line_error(PlainViTMismatch, lambda: build(checkpoint=sd, **kw))
    unknown = dict(sd, **{"blocks.1.attn.q_norm.weight": torch.ones(12)})
    assert "blocks.1.attn.q_norm.weight" in _one_line_error(
        PlainViTMismatch, lambda: build(checkpoint=unknown, **TINY))
    rel = {f"backbone.net.{k}": v for k, v in _d2_vit(use_rel_pos=True).state_dict().items()}
    assert "rel_pos_h" in _one_line_error(PlainViTMismatch, lambda: build(checkpoint=rel, **TINY))
    # another architecture: a plain ViT into Rev-MViT, and a ResNet into Rev-ViT
    assert "Rev-ViT" in _one_line_error(PlainViTMismatch, lambda: revvit_d2.create_model(
        "rev_mvit_test", checkpoint=sd, rewire=None, fuse="concat"))
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(5, 8)}
    _one_line_error(CheckpointMismatchError, lambda: build(checkpoint=resnet, **TINY))
    assert "rewire" in _one_line_error(ValueError, lambda: revvit_d2.create_model(
        "rev_vit_test", rewire="bogus"))


@pytest.mark.slow
def test_conversion_gap_benchmark_smoke(tmp_path):
    """benchmarks/vit_conversion_gap.py end to end at a tiny size: the Re^2TAL network stays
    exactly reversible, and the Dr2Net-style start is closer to the plain model."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vit_conversion_gap.py"
    spec = importlib.util.spec_from_file_location("vit_conversion_gap", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gap"
    bench.main(["--sizes", "vit_tiny", "--depth", "2", "--img", "32", "--betas", "0.01",
                "--out", str(out)])
    rows = {r["rewire"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["re2tal"]["param_grad_max_rel_err"] < 1e-3
    assert rows["dr2net"]["logits_rel_err"] < rows["re2tal"]["logits_rel_err"]
    assert "| vit_tiny (192) | re2tal |" in out.with_suffix(".md").read_text()
