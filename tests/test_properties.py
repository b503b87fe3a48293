"""Property-based checks (hypothesis) over input sizes, batch sizes and dtypes for every
backbone: valid inputs give finite outputs of the documented shape, invalid ones a ValueError."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import revvit_d2

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: revvit_d2.create_model(name).eval()
            for name in ("rev_vit_test", "rev_mvit_test", "rev_mvit_video_test")}


@SETTINGS
@given(batch=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), dtype=DTYPES)
def test_rev_vit_any_multiple_of_the_patch(models, batch, h, w, dtype):
    model = models["rev_vit_test"].to(dtype)
    x = torch.randn(batch, 3, 16 * h, 16 * w, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        feat = model.forward_features(x)["last_feat"]
    assert out.shape == (batch, 10) and out.dtype == dtype and torch.isfinite(out).all()
    assert feat.shape == (batch, 128, h, w)


@SETTINGS
@given(h=st.integers(17, 95), w=st.integers(17, 95))
def test_rev_vit_rejects_sizes_off_the_patch_grid(models, h, w):
    if h % 16 == 0 and w % 16 == 0:
        return
    with pytest.raises(ValueError, match="multiples of the patch size"):
        models["rev_vit_test"].float()(torch.randn(1, 3, h, w))


@SETTINGS
@given(batch=st.integers(1, 3), h=st.integers(24, 96), w=st.integers(24, 96), dtype=DTYPES)
def test_rev_mvit_image_any_size(models, batch, h, w, dtype):
    model = models["rev_mvit_test"].to(dtype)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(batch, 3, h, w, dtype=dtype))
        out = model(torch.randn(batch, 3, h, w, dtype=dtype))
    assert out.shape == (batch, 10) and torch.isfinite(out.float()).all()
    grid = (math.ceil(h / 4), math.ceil(w / 4))
    for name in ("scale2", "scale3", "scale4"):
        assert feats[name].shape[-2:] == grid, (name, feats[name].shape, grid)
        grid = tuple(math.ceil(s / 2) for s in grid)


@SETTINGS
@given(batch=st.integers(1, 2), t=st.sampled_from([2, 4, 6, 8]), s=st.integers(32, 80),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rev_mvit_video_any_clip(models, batch, t, s, dtype):
    model = models["rev_mvit_video_test"].to(dtype)
    with torch.no_grad():
        out = model(torch.randn(batch, 3, t, s, s, dtype=dtype))
    assert out.shape == (batch, 10) and torch.isfinite(out).all()


@SETTINGS
@given(batch=st.integers(1, 2), h=st.integers(20, 90), w=st.integers(20, 90))
def test_detectron2_backbones_pad_and_match_output_shape(batch, h, w):
    from detectron2.structures import ImageList

    from _d2_helpers import tiny_fpn, tiny_sfp

    for make in (tiny_sfp, tiny_fpn):
        backbone = _BACKBONES.setdefault(make, make().eval())
        images = ImageList.from_tensors([torch.randn(3, h, w) for _ in range(batch)],
                                        backbone.size_divisibility,
                                        padding_constraints=backbone.padding_constraints)
        H, W = images.tensor.shape[-2:]
        with torch.no_grad():
            out = backbone(images.tensor)
        for name, spec in backbone.output_shape().items():
            assert out[name].shape == (batch, spec.channels, -(-H // spec.stride),
                                       -(-W // spec.stride))


_BACKBONES = {}
