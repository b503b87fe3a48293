"""hubconf.py through ``torch.hub.load(ROOT, name, source="local")``: every entry point builds
its variant, loads a checkpoint strictly (the same outputs as the model it came from), refuses
``pretrained=True`` without a local file, and works from a clone where ``revvit_video`` is not
installed."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revvit_d2
from revvit_d2 import CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ("rev_vit_s", "rev_vit_b", "rev_vit_l", "rev_mvit_b")


def _hub(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


@pytest.mark.parametrize("name", IMAGE)
def test_image_entry_builds_the_variant(name):
    model = _hub(name, depth=2) if name.startswith("rev_vit") else _hub(name)
    reference = revvit_d2.create_model(name, **({"depth": 2} if name.startswith("rev_vit") else {}))
    assert type(model) is type(reference)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert model.pretrained_cfg["num_classes"] == 1000


def test_image_checkpoint_loads_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    source = revvit_d2.create_model("rev_vit_s", depth=2, num_classes=7).eval()
    path = tmp_path / "rev_vit_s.pth"
    torch.save({"model": source.state_dict()}, path)
    model = _hub("rev_vit_s", pretrained=True, checkpoint=str(path), depth=2,
                 num_classes=7).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # strict: a checkpoint of another class count is refused
    with pytest.raises(CheckpointMismatchError, match="head"):
        _hub("rev_vit_s", checkpoint=str(path), depth=2)


def test_video_entry_loads_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = _hub("rev_mvit_b_16x4", head_num_classes=5)
    path = tmp_path / "video.pth"
    torch.save(source.state_dict(), path)
    model = _hub("rev_mvit_b_16x4", checkpoint=str(path), head_num_classes=5)
    assert model.pretrained_cfg["num_classes"] == 5
    for (key, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name,file", [("rev_vit_b", "REV_VIT_B.pyth"),
                                       ("rev_mvit_b_16x4", "REV_MVIT_B_16x4.pyth")])
def test_pretrained_without_a_file_is_one_clear_error(name, file):
    with pytest.raises(ValueError, match=rf"{name}\(pretrained=True\): weights cannot be "
                                         rf"downloaded .* checkpoint=<path to the official "
                                         rf"{file}>"):
        _hub(name, pretrained=True)
    with pytest.raises(TypeError, match="pass the checkpoint path as checkpoint="):
        _hub(name, pretrained="weights.pth")


def test_video_entry_from_a_clone_without_revvit_video_installed():
    code = (
        "import sys, torch\n"
        "sys.modules['revvit_video'] = None  # as if only the clone were there\n"
        f"m = torch.hub.load({str(ROOT)!r}, 'rev_mvit_b_16x4', source='local', "
        "head_num_classes=3)\n"
        "print(type(m).__name__, sys.modules['revvit_video'].__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, file = out.stdout.split()
    assert name == "RevVideoNet" and Path(file) == ROOT / "video" / "__init__.py"
