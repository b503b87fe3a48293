"""revvit_video: builders, hub entry points, the pytorchvideo compatibility alias, Kinetics data
with PyAV (skipping and counting bad files), multi-view aggregation, checkpointing and
tools/run_video.py end to end."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revvit_d2
from revvit_d2.data.synthetic.kinetics import MOTION_CLASSES, make_synthetic_kinetics
from revvit_video import (
    RevVideoNet,
    create_rev_mvit,
    create_rev_vit_video,
    load_video_checkpoint,
    rev_mvit_b_16x4,
    rev_mvit_video_test,
)
from revvit_d2.utils.io import read_checkpoint
from revvit_video.models import video_builder_kwargs

from _helpers import load_oracle, official_key_shapes

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "run_video.py"
SUMMARY = re.compile(r"^\* Top-1 (?P<top1>[\d.]+) Top-5 (?P<top5>[\d.]+) videos (?P<videos>\d+) "
                     r"skipped (?P<skipped>\d+) clips/s [\d.]+$")
TINY_DATA = dict(train_per_class=2, val_per_class=1, num_frames=16, fps=16, size=(48, 36))


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    """A few small synthetic mp4s (2 train + 1 val per class)."""
    return make_synthetic_kinetics(tmp_path_factory.mktemp("videos") / "ks", **TINY_DATA)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _tiny_mvit(**kw):
    args = dict(video_builder_kwargs("rev_mvit_video_test"), drop_path_rate=0.1, head_dropout_rate=0.1)
    args.update(kw)
    return create_rev_mvit(**args)


@pytest.mark.parametrize("build", ["mvit", "vit"])
def test_builder_forward_backward_every_parameter_gets_a_gradient(build, rev_backward_calls):
    torch.manual_seed(0)
    if build == "mvit":
        model = _tiny_mvit(head_num_classes=7)
        x = torch.randn(2, 3, 4, 64, 64)
    else:
        model = create_rev_vit_video(spatial_size=32, temporal_size=4, patch_size=(2, 8, 8),
                                     embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.1,
                                     head_num_classes=7)
        x = torch.randn(2, 3, 4, 32, 32)
    assert isinstance(model, RevVideoNet)
    assert isinstance(model.trunk, revvit_d2.modeling.rev_mvit.RevMViT)
    calls = rev_backward_calls
    model.train()
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.logsumexp(dim=1).sum().backward()
    assert calls, "the reversible backward was not used"
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()  # logits in eval mode too (never softmax)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and not torch.allclose(out.sum(-1), torch.ones(2))


def test_rev_vit_video_is_a_single_reversible_run_with_exact_gradients():
    """No pooling, no transitions, no multipliers: RevMViT accepts it (one stage) and its
    reversible gradients equal plain autograd's."""
    kw = dict(spatial_size=32, temporal_size=4, patch_size=(2, 8, 8), embed_dim=32, depth=3,
              num_heads=2, drop_path_rate=0.0, head_dropout_rate=0.0, head_num_classes=5)
    torch.manual_seed(0)
    rev = create_rev_vit_video(**kw)
    plain = create_rev_vit_video(use_rev_backprop=False, **kw)
    plain.load_state_dict(rev.state_dict())
    assert rev.trunk.stage_ends == [2] and not rev.trunk.feature_names[1:]
    assert rev.trunk.patch_grid == (2, 4, 4)
    x = torch.randn(2, 3, 4, 32, 32)
    for m in (rev, plain):
        m.train()
        m(x).pow(2).mean().backward()
    for (name, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_head_none_gives_pooled_features():
    model = _tiny_mvit(head=None)
    with torch.no_grad():
        feats = model.eval()(torch.randn(1, 3, 4, 64, 64))
    assert model.head is None and feats.shape == (1, model.trunk.num_features) == (1, 128)


def test_hub_tiny_reproduces_the_official_oracle(tmp_path):
    data = load_oracle("slowfast_revmvit_tiny_video.pt")
    for ckpt in ({"model_state": data["state_dict"]}, data["state_dict"]):
        model = rev_mvit_video_test(checkpoint=ckpt).eval()
        with torch.no_grad():
            logits = model(data["input"])
        torch.testing.assert_close(logits, data["logits_eval"], atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == data["num_params"]
    assert model.pretrained_cfg["num_frames"] == 4 and model.pretrained_cfg["mean"][0] == 0.45

    # A file on disk, and our own format (trunk.* / head.proj.*) round-trips strictly.
    path = tmp_path / "official.pyth"
    torch.save({"model_state": data["state_dict"], "epoch": 3, "cfg": "yaml"}, path)
    from_file = rev_mvit_video_test(pretrained=True, checkpoint=str(path)).eval()
    torch.save({"model": from_file.state_dict(), "iteration": 9}, tmp_path / "ours.pth")
    again = rev_mvit_video_test()
    load_video_checkpoint(again, tmp_path / "ours.pth")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(data["input"]), data["logits_eval"], atol=1e-5,
                                   rtol=1e-4)

    bad = dict(data["state_dict"])
    bad.pop("rev_backbone.layers.0.G.mlp.fc1.weight")
    with pytest.raises(revvit_d2.CheckpointMismatchError, match="fc1"):
        rev_mvit_video_test(checkpoint=bad)
    with pytest.raises(revvit_d2.CheckpointMismatchError, match="head"):
        rev_mvit_video_test(checkpoint=data["state_dict"], head_num_classes=4)
    keep_head = rev_mvit_video_test(head_num_classes=4)
    load_video_checkpoint(keep_head, data["state_dict"], load_head=False)  # fine-tuning start


def test_hub_b16x4_names_match_create_model_and_the_official_keys():
    with torch.device("meta"):
        hub = rev_mvit_b_16x4()
        ref = revvit_d2.create_model("rev_mvit_b_16x4")
    expect = {(f"head.proj.{k[5:]}" if k.startswith("head.") else f"trunk.{k}"): tuple(v.shape)
              for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in hub.state_dict().items()} == expect
    assert sum(p.numel() for p in hub.parameters()) == 34_963_120
    assert hub.pretrained_cfg["test_num_clips"] == 5 and hub.pretrained_cfg["sampling_rate"] == 4

    from revvit_video.hub import convert_to_video_state_dict

    official = official_key_shapes("official_keys_REV_MVIT_B_16x4.txt")
    converted = convert_to_video_state_dict({"model_state": official})
    assert {k: tuple(v.shape) for k, v in converted.items()} == expect


def test_pretrained_without_checkpoint_raises_clearly():
    with pytest.raises(ValueError, match=r"cannot be downloaded.*checkpoint="):
        rev_mvit_b_16x4(pretrained=True)
    with pytest.raises(TypeError, match="checkpoint="):
        rev_mvit_video_test(pretrained="REV_MVIT_B_16x4.pyth")


# ---------------------------------------------------------------------------------------------
# pytorchvideo.transforms compatibility alias
# ---------------------------------------------------------------------------------------------
def _python(code: str):
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=120)


def test_compat_alias_makes_pytorchvideo_transforms_importable():
    import torchvision

    probe = _python("import pytorchvideo.transforms")
    new_torchvision = tuple(int(v) for v in torchvision.__version__.split(".")[:2]) >= (0, 17)
    if new_torchvision:  # the problem the alias solves is real here
        assert probe.returncode != 0 and "functional_tensor" in probe.stderr
    fixed = _python(
        "from revvit_video.compat import install_functional_tensor_alias as f\n"
        "first = f(); second = f()\n"
        "import pytorchvideo.transforms as t, torchvision.transforms.functional_tensor as ft\n"
        "from torchvision.transforms import _functional_tensor as new\n"
        "assert ft is new and t.RandomResizedCrop and t.ShortSideScale\n"
        "print(first, second)")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.split() == (["True", "False"] if new_torchvision else ["False", "False"])


def test_compat_alias_leaves_a_working_original_alone(monkeypatch):
    import types

    from revvit_video import compat

    original = types.ModuleType("torchvision.transforms.functional_tensor")
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", original)
    assert compat.install_functional_tensor_alias() is False
    assert sys.modules["torchvision.transforms.functional_tensor"] is original


# ---------------------------------------------------------------------------------------------
# Synthetic data, loaders, faults
# ---------------------------------------------------------------------------------------------
def test_synthetic_dataset_layout_determinism_and_idempotence(tmp_path, tiny_videos, monkeypatch):
    root = tiny_videos
    lines = (root / "train.csv").read_text().splitlines()
    assert len(lines) == 2 * len(MOTION_CLASSES)
    for line in lines:
        rel, label = line.split(" ")
        assert re.fullmatch(r"train/[a-z_]+/[a-z_]+_\d{4}\.mp4", rel)
        assert rel.split("/")[1] == MOTION_CLASSES[int(label)] and (root / rel).is_file()
    assert (root / "classes.txt").read_text().split() == list(MOTION_CLASSES)

    import av

    with av.open(str(root / lines[0].split()[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (36, 48, 3)

    other = make_synthetic_kinetics(tmp_path / "again", **TINY_DATA)
    files = sorted(p.relative_to(root) for p in root.rglob("*.mp4"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.mp4"))
    assert all((root / f).read_bytes() == (other / f).read_bytes() for f in files)

    import revvit_d2.data.synthetic.kinetics as mod

    monkeypatch.setattr(mod, "render_video", lambda *a, **k: pytest.fail("regenerated"))
    assert make_synthetic_kinetics(other, **TINY_DATA) == other  # complete: nothing to do
    monkeypatch.undo()
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        make_synthetic_kinetics(tmp_path / "foreign", **TINY_DATA)


def _bad_list(root: Path, tmp_path: Path, leading_missing: int = 0) -> Path:
    """The val list plus a missing, a garbage, an empty and a truncated file."""
    good = [f"{root}/{line}" for line in (root / "val.csv").read_text().splitlines()]
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = Path(good[0].split()[0]).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    bad = [f"{tmp_path}/missing.mp4 0", f"{tmp_path}/garbage.mp4 1", f"{tmp_path}/empty.mp4 2",
           f"{tmp_path}/truncated.mp4 3"]
    lead = [f"{tmp_path}/gone_{i}.mp4 0" for i in range(leading_missing)]
    path = tmp_path / "with_bad.csv"
    path.write_text("\n".join(lead + good[:2] + bad + good[2:]) + "\n")
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_test_loader_skips_and_counts_bad_files(tiny_videos, tmp_path, workers):
    from revvit_video.data import build_kinetics_test_loader

    csv = _bad_list(tiny_videos, tmp_path, leading_missing=12 if workers == 0 else 0)
    loader = build_kinetics_test_loader(str(csv), num_frames=4, sampling_rate=2, target_fps=16,
                                        num_clips=3, short_side=32, crop_size=32, batch_size=4,
                                        num_workers=workers)
    views = {}
    for batch in loader:
        if batch["video"] is None:
            continue
        assert batch["video"].shape[1:] == (3, 4, 32, 32)
        for v, c in zip(batch["video_index"].tolist(), batch["clip_index"].tolist()):
            views.setdefault(v, []).append(c)
    lead = 12 if workers == 0 else 0
    assert sorted(views) == [lead, lead + 1, lead + 6, lead + 7]  # the 4 good videos
    assert all(sorted(c) == [0, 1, 2] for c in views.values())
    names = {Path(p).name for p in loader.skipped.paths}
    expected = {"missing.mp4", "garbage.mp4", "empty.mp4", "truncated.mp4"}
    assert names == expected | {f"gone_{i}.mp4" for i in range(lead)}
    assert loader.num_videos == 8 + lead


def test_train_loader_epochs_shuffle_and_skip(tiny_videos, tmp_path):
    from revvit_video.data import build_kinetics_train_loader, iters_per_epoch

    csv = tmp_path / "train_bad.csv"
    csv.write_text((tiny_videos / "train.csv").read_text()
                   + f"{tmp_path}/missing.mp4 1\n{tmp_path}/missing2.mp4 2\n")
    loader = build_kinetics_train_loader(str(csv), num_frames=4, sampling_rate=2, target_fps=16,
                                         crop_size=32, total_batch_size=2, num_workers=0, seed=3,
                                         video_path_prefix=str(tiny_videos))
    assert loader.iters_per_epoch == iters_per_epoch(10, 2) == 5
    stream = iter(loader)
    epochs = [[next(stream) for _ in range(5)] for _ in range(3)]
    orders = [[i for b in e for i in b["video_index"].tolist()] for e in epochs]
    assert all(len(o) == 10 and 8 not in o and 9 not in o for o in orders)  # refilled epochs
    assert orders[0] != orders[1] and loader.epoch == 2
    assert {Path(p).name for p in loader.skipped.paths} == {"missing.mp4", "missing2.mp4"}
    assert all(b["video"].shape == (2, 3, 4, 32, 32) for e in epochs for b in e)

    loader.start_iter = 5  # resume at the start of epoch 1: same order as before
    again = iter(loader)
    first = [i for _ in range(5) for i in next(again)["video_index"].tolist()]
    assert first == orders[1]


def test_bad_video_list_errors(tmp_path):
    from revvit_video.data import read_video_list

    with pytest.raises(FileNotFoundError, match="not found"):
        read_video_list(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_video_list(str(tmp_path / "empty.csv"))
    # A malformed line is left out and recorded (tests/test_own_data_videos.py counts them);
    # a list with no usable line is an error.
    (tmp_path / "bad.csv").write_text("a.mp4 0\nb.mp4 cat\n")
    paths = read_video_list(str(tmp_path / "bad.csv"))
    assert len(paths) == 1 and paths.num_entries == 2
    assert [(Path(r.path).name, r.reason) for r in paths.rejected] == [
        ("bad.csv:2", "malformed list line")]
    (tmp_path / "worse.csv").write_text("b.mp4 cat\nc.mp4\n")
    with pytest.raises(ValueError, match="no usable entry .*worse.csv:1: malformed list line"):
        read_video_list(str(tmp_path / "worse.csv"))
    (tmp_path / "ok.csv").write_text("dir with space/a b.mp4 3\n")
    paths = read_video_list(str(tmp_path / "ok.csv"))
    assert paths[0] == (str(tmp_path / "dir with space" / "a b.mp4"), {"label": 3})


# ---------------------------------------------------------------------------------------------
# Multi-view aggregation, checkpointing
# ---------------------------------------------------------------------------------------------
def test_multiview_aggregation_against_a_hand_computation():
    from revvit_video.engine import MultiViewAccumulator, aggregate_views

    # video 7: one confident view for class 0 and two mild views for class 1. The mean of the
    # logits says class 0, the mean of the softmax (the official rule) says class 1.
    views = [(7, [20.0, 0.0, 0.0]), (3, [0.0, 0.0, 1.0]), (7, [0.0, 2.0, 0.0]),
             (7, [0.0, 2.0, 0.0]), (3, [0.5, 0.0, 0.0]), (5, [1.0, 2.0, 3.0])]
    labels = {7: 1, 3: 2, 5: 0}
    expected = {}
    for v, logits in views:
        z = sum(math.exp(l) for l in logits)
        expected.setdefault(v, []).append([math.exp(l) / z for l in logits])
    expected = {v: [sum(c) / len(ps) for c in zip(*ps)] for v, ps in expected.items()}

    idx = torch.tensor([v for v, _ in views])
    logits = torch.tensor([l for _, l in views])
    videos, probs, counts = aggregate_views(idx, logits)
    assert videos.tolist() == [3, 5, 7] and counts.tolist() == [2, 1, 3]
    for v, p in zip(videos.tolist(), probs):
        torch.testing.assert_close(p, torch.tensor(expected[v]), atol=1e-6, rtol=0)
    assert probs[2].argmax() == 1 and logits[idx == 7].mean(0).argmax() == 0

    # Views split over batches and processes give the same result.
    a, b = MultiViewAccumulator(), MultiViewAccumulator()
    lab = torch.tensor([labels[v] for v, _ in views])
    a.add(idx[:3], logits[:3], lab[:3])
    b.add(idx[3:], logits[3:], lab[3:])
    a.merge(MultiViewAccumulator.from_state(b.state()))
    res = a.compute(expected_views=2)
    top1 = [max(range(3), key=lambda k: expected[v][k]) == labels[v] for v in (3, 5, 7)]
    assert res["videos"] == 3 and res["views"] == 6 and res["incomplete"] == 1
    assert res["top1"] == pytest.approx(100.0 * sum(top1) / 3)  # video 5 wrong: 66.7
    assert res["top5"] == 100.0  # k is capped at the 3 classes


def test_atomic_checkpointer_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from revvit_d2.training import AtomicCheckpointer

    model = torch.nn.Linear(3, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000009", iteration=9)
    good = (tmp_path / "model_0000009.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert (tmp_path / "model_0000009.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert ckpt.load(ckpt.get_checkpoint_file())["iteration"] == 9
    with pytest.raises(RuntimeError, match="does not match"):
        AtomicCheckpointer(torch.nn.Linear(3, 3)).load(str(tmp_path / "model_0000009.pth"))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
KINETICS_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "Kinetics").glob("*.py"))


@pytest.mark.parametrize("name", KINETICS_CONFIGS)
def test_kinetics_configs_load_and_instantiate(name):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ROOT / "configs" / "Kinetics" / name))
    model = instantiate(cfg.model)
    assert isinstance(model, RevVideoNet)
    for split in ("train", "test"):
        for key in ("num_frames", "sampling_rate", "target_fps"):
            assert cfg.dataloader[split][key] == cfg.dataloader.train[key]
    assert model.trunk.input_size[0] == cfg.dataloader.train.num_frames
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    for group in opt.param_groups:  # no weight decay on 1-D parameters (norms, biases)
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else cfg.optimizer.weight_decay)
    sched = instantiate(cfg.lr_multiplier)
    warm = cfg.lr_multiplier.warmup_length
    assert sched(0.0) == pytest.approx(0.01) and sched(warm) == pytest.approx(1.0, abs=1e-3)
    assert sched(1.0 - 1e-9) == pytest.approx(0.01, abs=1e-4)
    assert sched(warm + (1 - warm) / 2) == pytest.approx(0.505, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# tools/run_video.py
# ---------------------------------------------------------------------------------------------
def run_tool(*args, env=None, timeout=300):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=str(ROOT), timeout=timeout)


def summary(proc):
    lines = proc.stdout.rstrip().splitlines()
    assert lines and lines[-1].startswith("* Top-1"), proc.stdout[-3000:] + proc.stderr[-3000:]
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    return m


def test_tool_help():
    proc = run_tool("--help", timeout=120)
    assert proc.returncode == 0
    for needle in ("--config-file", "--eval-only", "--resume", "--num-gpus", "* Top-1"):
        assert needle in proc.stdout


@pytest.mark.slow
def test_tool_trains_tests_resumes_and_evaluates(tmp_path):
    data = make_synthetic_kinetics(tmp_path / "ks", train_per_class=12, val_per_class=4)
    out = tmp_path / "out"
    common = [f"dataloader.train.data_path={data / 'train.csv'}",
              f"dataloader.test.data_path={data / 'val.csv'}", f"train.output_dir={out}",
              "dataloader.train.total_batch_size=12", "dataloader.test.num_workers=1",
              "train.checkpointer.period=5"]
    env = {"REVVIT_DATASETS": str(tmp_path / "unused")}
    first = run_tool(*common, "train.max_iter=36", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Starting training from iteration 0" in first.stdout
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob(".*.tmp.*"))  # no temporary file left behind
    # every checkpoint the tool writes is data only (docs/security.md)
    ckpts = {p.name: read_checkpoint(p) for p in out.glob("model_*.pth")}
    ckpt = ckpts["model_final.pth"]
    assert ckpt["iteration"] == 35 and "optimizer" in ckpt["trainer"]

    second = run_tool("--resume", *common, "train.max_iter=42", env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at iteration 36" in second.stdout
    assert "Starting training from iteration 36" in second.stdout
    assert "iter 42/42" in second.stdout
    m = summary(second)
    assert int(m["videos"]) == 16 and int(m["skipped"]) == 0
    assert float(m["top1"]) > 50.0, second.stdout[-2000:]  # chance is 25 %
    assert read_checkpoint(out / "model_final.pth")["iteration"] == 41

    # --eval-only on our own checkpoint, with a corrupt and a missing video in the list.
    bad = _bad_list(data, tmp_path)
    third = run_tool("--eval-only", *common, f"dataloader.test.data_path={bad}",
                     f"train.init_checkpoint={out / 'model_final.pth'}", env=env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    m3 = summary(third)
    assert int(m3["videos"]) == 16 and int(m3["skipped"]) == 4
    assert "skipping test video" in third.stdout and "garbage.mp4" in third.stdout
    assert not (tmp_path / "unused").exists()
