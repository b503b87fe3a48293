"""Model variants: the registry sweep, exact sizes, FLOPs, multi-scale features, Rev-MViT engine
equivalence, input checks, and the engine options every builder exposes."""
import dataclasses
import inspect
import logging
from pathlib import Path

import pytest
import torch

import revvit_d2
from revvit_d2.modeling import EngineOptions, RevModelBase, RevMViT, RevViT, build_model
from revvit_d2.modeling.flops import count_flops, count_parameters

from _helpers import load_oracle

ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = 1_000_000  # variants below this are built for real and trained one step


@pytest.mark.parametrize("name", revvit_d2.list_models())
def test_every_registered_variant_builds_and_fits_its_metadata(name, rev_backward_calls):
    """Every list_models() entry: its pretrained_cfg input size and class count fit the model
    (full-size variants: shapes only, on the meta device; tiny ones: a real forward and a
    reversible backward that reaches every parameter)."""
    cfg = revvit_d2.get_pretrained_cfg(name)
    shape = (2,) + tuple(cfg["input_size"])
    with torch.device("meta"):
        model = revvit_d2.create_model(name)
    assert model.num_classes == cfg["num_classes"]
    assert model.pretrained_cfg == cfg
    if count_parameters(model) > TINY_PARAMS:
        with torch.no_grad():
            out = model.eval()(torch.empty(shape, device="meta"))
        assert tuple(out.shape) == (2, cfg["num_classes"])
        return
    model = revvit_d2.create_model(name).train()
    out = model(torch.randn(shape))
    assert tuple(out.shape) == (2, cfg["num_classes"]) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert rev_backward_calls  # through the reversible engine
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name,params", [
    ("rev_vit_s", 22_434_664),
    ("rev_vit_b", 87_335_656),
    ("rev_vit_l", 305_350_632),  # no official config: 1024 wide, 24 blocks, 16 heads
    ("rev_mvit_b", 39_689_320),
    ("rev_mvit_b_16x4", 34_963_120),
])
def test_official_parameter_counts(name, params):
    with torch.device("meta"):
        assert count_parameters(revvit_d2.create_model(name)) == params


def test_rev_vit_l_dimensions():
    with torch.device("meta"):
        model = revvit_d2.create_model("rev_vit_l")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].F.attn.num_heads) == (1024, 24, 16)
    assert model.head.in_features == 2048


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,gflops", [
    ("rev_vit_s", (1, 3, 224, 224), 4.58),
    ("rev_vit_b", (1, 3, 224, 224), 17.49),
    ("rev_mvit_b", (1, 3, 224, 224), 8.67),
    ("rev_mvit_b_16x4", (1, 3, 16, 224, 224), 63.85),
])
def test_official_flops(name, shape, gflops):
    model = revvit_d2.create_model(name)
    assert round(count_flops(model, (torch.randn(shape),)) / 1e9, 2) == gflops


def test_forward_returns_logits_in_train_and_eval():
    model = revvit_d2.create_model("rev_vit_test", drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert not torch.allclose(out.softmax(-1).sum(-1), out.sum(-1))  # not probabilities
    model.train()
    torch.testing.assert_close(model(x).detach(), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-7), (torch.float32, 2e-3)])
def test_rev_mvit_reversible_matches_plain_autograd(dtype, rel):
    """Exact in float64 (the logic); in float32 within the rounding of the inversion, whose
    relative error grows with |activations| / |residual branch| (the oracle README's criterion
    is max|g - g_ref| <= 1e-6 + 1e-3 max|g_ref| for independent implementations)."""
    kw = dict(drop_path_rate=0.3, dropout_rate=0.1, depth=7, transition_layers=(1, 3))
    torch.manual_seed(0)
    rev = revvit_d2.create_model("rev_mvit_test", **kw).to(dtype)
    torch.manual_seed(0)
    plain = revvit_d2.create_model("rev_mvit_test", use_rev_backprop=False, **kw).to(dtype)
    x = torch.randn(4, 3, 64, 64, dtype=dtype)
    for m in (rev, plain):
        m.train()
        torch.manual_seed(11)
        m(x).pow(2).mean().backward()
    for (n, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        assert a.grad is not None, n
        bound = (1e-6 if dtype == torch.float32 else 1e-12) + rel * b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= bound, n


def test_rev_vit_features():
    model = revvit_d2.create_model("rev_vit_test")
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    feats = model.forward_features(x)
    assert list(feats) == ["last_feat"]
    assert feats["last_feat"].shape == (2, 128, 4, 6)  # stride 16, 2C channels
    feats["last_feat"].pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,shape,expected", [
    ("rev_mvit_test", (2, 3, 64, 64),
     {"scale2": (2, 32, 16, 16), "scale3": (2, 64, 8, 8), "scale4": (2, 128, 4, 4)}),
    ("rev_mvit_video_test", (2, 3, 4, 64, 64),
     {"scale2": (2, 32, 2, 16, 16), "scale3": (2, 64, 2, 8, 8), "scale4": (2, 128, 2, 4, 4)}),
])
def test_rev_mvit_features_shapes_strides_and_gradients(name, shape, expected):
    model = revvit_d2.create_model(name)
    model.train()
    x = torch.randn(shape)
    feats = model.forward_features(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    for k, v in feats.items():
        assert v.shape[-1] * model.feature_strides[k] == shape[-1]
        assert v.shape[1] == model.feature_channels[k]
    sum(f.pow(2).mean() for f in feats.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["head.weight", "head.bias"]  # the last level uses the final norm


def test_full_size_rev_mvit_b_feature_pyramid_levels():
    with torch.device("meta"):
        model = revvit_d2.create_model("rev_mvit_b", num_classes=0)
    assert model.feature_strides == {"scale2": 4, "scale3": 8, "scale4": 16, "scale5": 32}
    assert model.feature_channels == {"scale2": 192, "scale3": 384, "scale4": 768, "scale5": 1536}


def test_cls_embed_on_is_accepted_with_a_warning(caplog):
    data = load_oracle("slowfast_revmvit_tiny_video.pt")
    cfg = dict(data["config"])
    cfg["MVIT"] = dict(cfg["MVIT"], CLS_EMBED_ON=True)
    with caplog.at_level(logging.WARNING):
        model = revvit_d2.build_from_slowfast_cfg(cfg)
    assert "CLS_EMBED_ON" in caplog.text
    revvit_d2.load_pretrained(model, data["state_dict"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data["input"]), data["logits_eval"], atol=1e-5, rtol=1e-4)


def test_video_of_another_length_and_size_interpolates_position_embedding():
    model = revvit_d2.create_model("rev_mvit_video_test").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 96, 96)).shape == (1, 10)
        same = torch.randn(1, 3, 4, 64, 64)
        # at the training size the interpolation is the identity
        ref = model.pos_embed_spatial.repeat(1, 2, 1) + model.pos_embed_temporal.repeat_interleave(
            256, dim=1)
        torch.testing.assert_close(model._pos_embed((2, 16, 16)), ref)
        assert model(same).shape == (1, 10)


@pytest.mark.parametrize("name,shape,match", [
    ("rev_vit_test", (1, 3, 70, 64), "multiples of the patch size 16"),
    ("rev_vit_test", (1, 3, 4, 64, 64), r"\(B, C, H, W\)"),
    ("rev_mvit_video_test", (1, 3, 64, 64), r"\(B, C, T, H, W\)"),
])
def test_bad_input_shapes_are_rejected_clearly(name, shape, match):
    model = revvit_d2.create_model(name)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))


def test_inconsistent_transition_layers_are_rejected():
    with pytest.raises(ValueError, match="transition_layers"):
        revvit_d2.create_model("rev_mvit_test", transition_layers=(1,))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(KeyError, match="rev_vit_b"):
        revvit_d2.create_model("rev_vit_xl")


def test_rev_vit_intermediate_block_features_keep_gradients_exact():
    kw = dict(drop_path_rate=0.2, depth=6)
    torch.manual_seed(0)
    rev = revvit_d2.create_model("rev_vit_test", **kw)
    torch.manual_seed(0)
    plain = revvit_d2.create_model("rev_vit_test", use_rev_backprop=False, **kw)
    x = torch.randn(2, 3, 64, 80)
    outs = []
    for m in (rev, plain):
        m.train()
        torch.manual_seed(3)
        feats = m.forward_features(x, block_indices=(1, 3))
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "block1": (2, 128, 4, 5), "block3": (2, 128, 4, 5), "last_feat": (2, 128, 4, 5)}
        sum(f.pow(2).mean() for f in feats.values()).backward()
        outs.append(feats)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=1e-6, rtol=1e-5)
    for (n, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        if b.grad is None:
            assert a.grad is None and n.startswith("head."), n
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="block_indices"):
        rev.forward_features(x, block_indices=(6,))


# -- the engine options: one set of names, exposed by every builder ------------------------------

ENGINE_NAMES = EngineOptions.names()
# every option away from its default, so that a dropped option shows
CHANGED = EngineOptions(**{f.name: (not f.default) if isinstance(f.default, bool) else f.default + 2
                           for f in dataclasses.fields(EngineOptions)})


def _cores(module):
    return [m for m in module.modules() if isinstance(m, RevModelBase)]


def _assert_options_arrive(module):
    cores = _cores(module)
    assert cores and all(core.engine == CHANGED for core in cores)


def test_engine_options_differ_from_the_defaults_and_are_the_model_keywords():
    assert all(getattr(CHANGED, n) != getattr(EngineOptions(), n) for n in ENGINE_NAMES)
    for cls in (RevViT, RevMViT):
        assert set(ENGINE_NAMES) <= set(inspect.signature(cls).parameters), cls


@pytest.mark.parametrize("name", revvit_d2.list_models())
def test_every_variant_takes_the_engine_options(name):
    with torch.device("meta"):
        _assert_options_arrive(build_model(name, **dataclasses.asdict(CHANGED)))
        _assert_options_arrive(revvit_d2.create_model(name, **dataclasses.asdict(CHANGED)))


def test_video_builders_and_hub_take_the_engine_options():
    from revvit_video import create_rev_mvit, create_rev_vit_video, rev_mvit_b_16x4, \
        rev_mvit_video_test

    for builder in (create_rev_mvit, create_rev_vit_video):
        assert set(ENGINE_NAMES) <= set(inspect.signature(builder).parameters), builder
    opts = dataclasses.asdict(CHANGED)
    with torch.device("meta"):
        _assert_options_arrive(create_rev_mvit(**opts))
        _assert_options_arrive(create_rev_vit_video(**opts))
        _assert_options_arrive(rev_mvit_b_16x4(**opts))
        _assert_options_arrive(rev_mvit_video_test(**opts))


@pytest.mark.parametrize("builder,variant", [("build_revvit_sfp_backbone", "rev_vit_test"),
                                             ("build_revmvit_fpn_backbone", "rev_mvit_test")])
def test_yacs_config_has_every_engine_option(builder, variant):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from revvit_d2.d2 import add_revvit_config

    cfg = add_revvit_config(get_cfg())
    assert {n.upper() for n in ENGINE_NAMES} <= set(cfg.MODEL.REVVIT)
    cfg.MODEL.BACKBONE.NAME = builder
    cfg.MODEL.REVVIT.VARIANT = variant
    cfg.MODEL.REVVIT.IMG_SIZE = 64
    cfg.MODEL.REVVIT.OUT_FEATURES = ["scale2", "scale3", "scale4"]
    for name in ENGINE_NAMES:
        cfg.MODEL.REVVIT[name.upper()] = getattr(CHANGED, name)
    _assert_options_arrive(build_backbone(cfg))


def _reversible_nodes(node, found):
    """LazyCall nodes of `node` whose target builds a reversible model."""
    from omegaconf import DictConfig, ListConfig

    from revvit_d2.d2 import RevMViTBackbone, RevViTBackbone
    from revvit_video import create_rev_mvit, create_rev_vit_video, rev_mvit_b_16x4, \
        rev_mvit_video_test

    builders = (RevViTBackbone, RevMViTBackbone, RevViT, RevMViT, revvit_d2.create_model,
                build_model, create_rev_mvit, create_rev_vit_video, rev_mvit_b_16x4,
                rev_mvit_video_test)
    if isinstance(node, DictConfig):
        if node.get("_target_", None) in builders:
            found.append(node)
        for key in node:
            _reversible_nodes(node[key], found)
    elif isinstance(node, ListConfig):
        for item in node:
            _reversible_nodes(item, found)
    return found


LAZY_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py")
                      if "common" not in p.parts)


@pytest.mark.parametrize("path", LAZY_CONFIGS)
def test_lazyconfig_models_take_the_engine_options(path):
    """Every reversible model in a LazyConfig file accepts each engine option as
    ``model...<name>=...`` and passes it to the engine; the detection base models list them."""
    from detectron2.config import LazyConfig, instantiate

    from revvit_d2.d2 import RevMViTBackbone, RevViTBackbone

    cfg = LazyConfig.load(str(ROOT / path))
    nodes = _reversible_nodes(cfg.model, [])
    if "rev" not in Path(path).name:
        assert not nodes
        return
    assert nodes, f"{path}: no reversible model found"
    for node in nodes:
        if node._target_ in (RevViTBackbone, RevMViTBackbone):
            assert set(ENGINE_NAMES) <= set(node), path  # listed in configs/common/models
        for name in ENGINE_NAMES:
            node[name] = getattr(CHANGED, name)
        with torch.device("meta"):
            _assert_options_arrive(instantiate(node))
