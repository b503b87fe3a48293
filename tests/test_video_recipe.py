"""The optional pieces of the official Kinetics training recipe (revvit_video.augment):
RandAugment, random erasing, repeated augmentation, Mixup/CutMix with soft targets, the soft-target
loss and the config checks of tools/run_video.py."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from torchvision.transforms import Compose, RandomHorizontalFlip

from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics
from revvit_d2.utils.seeding import seeded_rng
from revvit_video.augment import (ClipMixer, build_clip_mixer, check_train_augmentation,
                                  mixup_args, parse_rand_augment)
from revvit_video.data import build_kinetics_train_loader
from revvit_video.transforms import build_train_transform, pvt

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.45, 0.225
OFFICIAL_RA = "rand-m7-n4-mstd0.5-inc1"
SAMPLING = dict(num_frames=4, sampling_rate=2, target_fps=16, crop_size=24)


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    """12 small synthetic mp4s (3 per class)."""
    return make_synthetic_kinetics(tmp_path_factory.mktemp("recipe") / "ks", train_per_class=3,
                                   val_per_class=1, num_frames=16, fps=16, size=(48, 36))


def _clip(seed=0, t=10, h=36, w=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, t, h, w), generator=g).float()  # the decoder's 0-255 floats


def _transform(seed, clip, **kw):
    with seeded_rng(seed):
        return build_train_transform(4, 24, **kw)({"video": clip.clone()})["video"]


# ---------------------------------------------------------------------------------------------
# Clip transforms
# ---------------------------------------------------------------------------------------------
def test_rand_augment_strings():
    assert parse_rand_augment(OFFICIAL_RA) == dict(magnitude=7.0, num_layers=4, sampling_std=0.5)
    assert parse_rand_augment("rand-m9") == dict(magnitude=9.0, num_layers=2, sampling_std=0.0)
    assert parse_rand_augment(None) is None and parse_rand_augment("") is None
    # `key=None` on the command line is the string "None" (detectron2's override grammar)
    assert parse_rand_augment("None") is None and mixup_args("None") is None
    for bad in ("rand-m7-n4-mstd0.5-inc0", "rand-m7-x4", "auto-m7", "rand-m11", "rand-n0",
                "rand-m7-n4-mstd0.5-inc1-w0"):
        with pytest.raises(ValueError) as e:
            parse_rand_augment(bad)
        assert bad in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("pieces", [dict(rand_augment=OFFICIAL_RA), dict(random_erasing=0.25),
                                    dict(rand_augment=OFFICIAL_RA, random_erasing=0.25)],
                         ids=["randaugment", "erasing", "both"])
def test_pipeline_shapes_and_normalisation_with_each_piece(pieces):
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    changed = 0
    for seed in range(6):
        clip = _clip(seed)
        out = _transform(seed, clip, **pieces)
        base = _transform(seed, clip)
        assert out.shape == (3, 4, 24, 24) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        if "random_erasing" not in pieces:  # RandAugment keeps pixels on the 0-1 scale
            assert out.min() >= lo - 1e-4 and out.max() <= hi + 1e-4
        changed += int(not torch.allclose(out, base))
    assert changed >= 1  # the piece did something to some clip (erasing: p 0.25 per clip)


def test_random_erasing_is_one_box_for_the_whole_clip():
    clip = _clip(3)
    for seed in range(4):
        erased = _transform(seed, clip, random_erasing=1.0)
        plain = _transform(seed, clip)  # same draws up to the erasing, which comes last
        mask = (erased != plain)  # (C, T, H, W)
        assert mask.any()
        assert (mask == mask[:1, :1]).all()  # the same pixels in every channel and frame
        rows, cols = mask[0, 0].any(1).nonzero(), mask[0, 0].any(0).nonzero()
        box = mask[0, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # a rectangle
        # the box holds fresh noise in each frame (SlowFast's per-pixel mode)
        assert not torch.equal(erased[:, 0][mask[:, 0]], erased[:, 1][mask[:, 1]])


def _old_transform():
    """The training transform before the recipe pieces existed."""
    return pvt.ApplyTransformToKey("video", Compose([
        pvt.UniformTemporalSubsample(4),
        pvt.RandomResizedCrop(24, 24, scale=(0.08, 1.0), aspect_ratio=(0.75, 1.3333),
                              interpolation="bilinear"),
        RandomHorizontalFlip(0.5), pvt.Div255(), pvt.Normalize((MEAN,) * 3, (STD,) * 3)]))


def test_each_piece_off_is_the_old_pipeline():
    for seed in range(3):
        clip = _clip(seed)
        with seeded_rng(seed):
            want = _old_transform()({"video": clip.clone()})["video"]
        got = _transform(seed, clip, rand_augment=None, random_erasing=0.0)
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix and the loss
# ---------------------------------------------------------------------------------------------
def test_mixed_targets_sum_to_one_and_mix_the_clips():
    k, s = 5, 0.1
    labels = torch.tensor([0, 1, 2, 3])
    clips = torch.randn(4, 3, 2, 8, 8)
    smoothed = torch.full((4, k), s / k)
    smoothed[torch.arange(4), labels] += 1 - s
    for seed in range(8):
        with seeded_rng(seed):
            mixed, targets = build_clip_mixer(dict(), k)(clips.clone(), labels)  # official
        assert targets.shape == (4, k) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(4))
        assert targets.min() >= s / k - 1e-6
        # the weight of each clip's own class gives lambda; the clips are mixed with it:
        # blended (Mixup) or a box of the reversed batch pasted over 1 - lambda of the area
        lam = float((targets[0, 0] - s / k) / (1 - s))
        assert torch.allclose(targets, lam * smoothed + (1 - lam) * smoothed.flip(0), atol=1e-6)
        if not torch.allclose(mixed, lam * clips + (1 - lam) * clips.flip(0), atol=1e-5):
            pasted = (mixed != clips).flatten(0, 2).any(0)  # (H, W)
            assert torch.equal(mixed[..., pasted], clips.flip(0)[..., pasted])
            assert abs(float(pasted.float().mean()) - (1 - lam)) < 1e-6
    mixup_only = ClipMixer(k, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=s)
    with seeded_rng(1):
        mixed, targets = mixup_only(clips.clone(), labels)
    lam = float((targets[0, 0] - s / k) / (1 - s))
    assert 0 < lam < 1 and torch.allclose(mixed, lam * clips + (1 - lam) * clips.flip(0),
                                          atol=1e-5)
    # mixing off, smoothing on: the label-smoothed one-hots and the clips as they were
    off = build_clip_mixer(dict(prob=0.0), k)
    mixed, targets = off(clips.clone(), labels)
    assert torch.equal(mixed, clips) and torch.allclose(targets, smoothed)


def test_loss_takes_soft_targets():
    from detectron2.utils.events import EventStorage
    from revvit_video.engine import ClipClassificationLoss

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 4 * 4, 5))
    loss = ClipClassificationLoss(net, torch.device("cpu"), label_smoothing=0.1)
    clips, labels = torch.randn(4, 3, 2, 4, 4), torch.tensor([0, 1, 2, 4])
    logits = net(clips)
    smoothed = torch.full((4, 5), 0.1 / 5)
    smoothed[torch.arange(4), labels] += 0.9
    soft = torch.rand(4, 5).softmax(1)
    with EventStorage():
        hard = loss({"video": clips, "label": labels})["loss_cls"]
        from_smoothed = loss({"video": clips, "label": smoothed})["loss_cls"]
        from_soft = loss({"video": clips, "label": soft})["loss_cls"]
    assert torch.allclose(hard, nnf.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.allclose(from_smoothed, hard, atol=1e-6)  # smoothing not applied twice
    assert torch.allclose(from_soft, -(soft * logits.log_softmax(1)).sum(1).mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The training loader: repeated augmentation, mixing, resume
# ---------------------------------------------------------------------------------------------
def _loader(videos, **kw):
    args = dict(SAMPLING, total_batch_size=4, num_workers=0, seed=5, pin_memory=False,
                num_classes=4)
    args.update(kw)
    return build_kinetics_train_loader(str(videos / "train.csv"), **args)


def test_repeated_augmentation_puts_differently_augmented_clips_of_a_video_in_one_batch(
        tiny_videos):
    loader = _loader(tiny_videos, num_sample=2, rand_augment=OFFICIAL_RA, random_erasing=0.25)
    assert loader.batch_size == 4 and loader.videos_per_batch == 2
    assert loader.iters_per_epoch == 6  # 12 videos / 2 per batch
    stream = iter(loader)
    batches = [next(stream) for _ in range(6)]
    seen = []
    for b in batches:
        assert b["video"].shape == (4, 3, 4, 24, 24) and b["label"].shape == (4,)
        idx, lab = b["video_index"].tolist(), b["label"].tolist()
        assert idx[0] == idx[1] and idx[2] == idx[3] and idx[0] != idx[2]
        assert lab[0] == lab[1] and lab[2] == lab[3]
        assert not torch.allclose(b["video"][0], b["video"][1])  # different augmentations
        assert not torch.allclose(b["video"][2], b["video"][3])
        seen += idx[::2]
    assert sorted(seen) == list(range(12))  # each video once per epoch


def test_mixed_batches_and_exact_resume(tiny_videos):
    def make():
        loader = _loader(tiny_videos, num_sample=2, random_erasing=0.25)
        loader.mix = build_clip_mixer(dict(), 4)
        return loader

    loader = make()
    stream = iter(loader)
    run = [next(stream) for _ in range(8)]  # into the second epoch
    for b in run:
        assert b["label"].shape == (4, 4) and b["label"].dtype == torch.float32
        assert torch.allclose(b["label"].sum(1), torch.ones(4))
    first = make()
    stream = iter(first)
    for _ in range(3):
        next(stream)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.start_iter = 3
    again = iter(resumed)
    for want in run[3:]:
        got = next(again)
        assert torch.equal(got["video"], want["video"]) and torch.equal(got["label"], want["label"])


def test_each_piece_off_gives_the_old_batches(tiny_videos):
    off = _loader(tiny_videos, rand_augment=None, random_erasing=0.0, num_sample=1)
    old = _loader(tiny_videos)
    old.dataset.transform.transform = _old_transform()  # inside the skip-reporting wrapper
    assert off.videos_per_batch == off.batch_size == 4 and off.mix is None
    for a, b, _ in zip(iter(off), iter(old), range(4)):
        assert a["label"].dtype == torch.long and a["label"].shape == (4,)
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["video_index"], b["video_index"])


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------
def test_bad_values_are_one_line_errors():
    for kw in (dict(rand_augment="rand-m7-q1"), dict(random_erasing=1.5), dict(num_sample=0)):
        with pytest.raises(ValueError) as e:
            check_train_augmentation(**kw)
        assert "\n" not in str(e.value)
    for mixup, match in ((dict(alpha=0.8), "unknown key alpha"),
                         (dict(prob=2.0), "prob must be in"),
                         (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "both 0")):
        with pytest.raises(ValueError, match=match):
            build_clip_mixer(mixup, 4)
    with pytest.raises(ValueError, match="num_sample 2"):
        build_kinetics_train_loader("unused.csv", total_batch_size=3, num_sample=2)


def _tool():
    spec = importlib.util.spec_from_file_location("run_video_tool", ROOT / "tools" / "run_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override,message", [
    ("dataloader.train.rand_augment=rand-m7-n4-bad", "unknown part 'bad'"),
    ("dataloader.train.num_sample=0", "num_sample must be"),
    ("train.mixup.mixup_alpha=-1", "mixup_alpha must be >= 0"),
    ("train.mixup.alpha=1", "unknown config key 'train.mixup.alpha'"),
    ("dataloader.train.rand_augmnt=x", "unknown config key"),
])
def test_tool_reports_a_bad_recipe_key_in_one_line_before_writing(tmp_path, capsys, override,
                                                                  message):
    tool = _tool()
    out = tmp_path / "out"
    code = tool.invoke_main(["--config-file", "configs/Kinetics/rev_mvit_b_16x4.py",
                             f"train.output_dir={out}", f"dataloader.train.data_path={tmp_path}/x",
                             override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_tool_takes_none_on_the_command_line_for_a_piece_off():
    tool = _tool()
    args = tool.build_parser().parse_args([
        "--config-file", "configs/Kinetics/rev_mvit_b_16x4.py",
        "dataloader.train.rand_augment=None", "train.mixup=None", "dataloader.train.random_erasing=0", "dataloader.train.num_sample=1"])
    cfg, _ = tool.load_config(args)
    tool.check_recipe(cfg)  # no error
    assert parse_rand_augment(cfg.dataloader.train.rand_augment) is None
    assert mixup_args(cfg.train.mixup) is None
