"""Resume after SIGKILL: a detection run and a video run killed mid-way continue with --resume
and log, iteration for iteration, the losses of an uninterrupted run; a kill during a save leaves
the previous "last" checkpoint loadable.

The comparisons are exact (==): on the CPU with a fixed thread count, the resumed run repeats
the same float operations on the same bits (weights, optimizer and schedule state from the
checkpoint; data order, augmentations and drop-path masks from the seed and the iteration).
Every run says ``train.device=cpu``, so that a machine with GPUs runs the same CPU processes
(gloo), not CUDA kernels whose sums may change from run to run.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _runs import assert_losses_repeat, kill_when, start_tool
from revvit_d2.utils.io import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "tools" / "train_net.py"
RUN_VIDEO = ROOT / "tools" / "run_video.py"
ENV = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1")

# A tiny detector (2 reversible blocks with drop path, random flips and 96-112 px resizes, 2
# data-loader workers) for 8 iterations with a checkpoint every 2; no evaluation. The demo config
# has no augmentation, so a small config file on top of it adds random ones (_detection_config).
# The processes of a run share 2 threads and 2 data-loader workers, as one process alone has
# them (the machines have 2 cores; more only made the 2-process runs slower).
DEMO_CONFIG = ROOT / "configs" / "COCO" / "mask_rcnn_revvit_synthetic.py"
DETECTION = ["model.backbone.net.depth=2", "model.backbone.net.drop_path_rate=0.2",
             "model.roi_heads.batch_size_per_image=32", "dataloader.train.total_batch_size=2",
             "dataloader.evaluator=null", "train.max_iter=8",
             "train.checkpointer.period=2", "train.log_period=1", "train.seed=7",
             "train.deterministic=True", "train.device=cpu"]

def _start(tool, args, cwd, processes=1):
    return start_tool(tool, args, cwd, dict(ENV, OMP_NUM_THREADS=str(2 // processes)))


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _last_iteration(out_dir: Path) -> int:
    tag = out_dir / "last_checkpoint"
    name = tag.read_text().strip() if tag.exists() else ""
    return int(name[len("model_"):-len(".pth")]) if name.startswith("model_0") else -1


def _run_and_kill(tool, args, out_dir: Path, cwd, after: int, processes=1, timeout=600):
    """Start a run and SIGKILL it (and its data-loader workers) once its last checkpoint is at
    iteration `after` or later."""
    return kill_when(_start(tool, args, cwd, processes), lambda: _last_iteration(out_dir), after,
                     timeout)


def _assert_resumed_like_uninterrupted(full: Path, resumed: Path, killed_at: int, max_iter: int):
    assert_losses_repeat(full, resumed, killed_at, max_iter)
    final_a = read_checkpoint(full / "model_final.pth")  # data only (docs/security.md)
    final_b = read_checkpoint(resumed / "model_final.pth")
    assert final_a["model"].keys() == final_b["model"].keys()
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])


def _detection_config(tmp_path: Path) -> Path:
    path = tmp_path / "resume_config.py"
    path.write_text(textwrap.dedent(f"""
        import detectron2.data.transforms as T
        from detectron2.config import LazyCall as L
        from detectron2.config import LazyConfig

        _demo = LazyConfig.load({str(DEMO_CONFIG)!r})
        model, dataloader, train = _demo.model, _demo.dataloader, _demo.train
        optimizer, lr_multiplier = _demo.optimizer, _demo.lr_multiplier
        dataloader.train.mapper.augmentations = [
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeShortestEdge)(short_edge_length=(96, 112), sample_style="choice",
                                    max_size=160),
        ]
        """))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [1, 2])  # 2: two gloo processes, one image each
def test_detection_resume_after_sigkill_repeats_the_losses(tmp_path, num_gpus):
    full, killed = tmp_path / "full", tmp_path / "killed"
    config = ["--config-file", _detection_config(tmp_path), "--num-gpus", num_gpus] + DETECTION
    config.append(f"dataloader.train.num_workers={2 // num_gpus}")
    _finish(_start(TRAIN_NET, config + [f"train.output_dir={full}"], tmp_path, num_gpus))
    args = config + [f"train.output_dir={killed}"]
    at = _run_and_kill(TRAIN_NET, args, killed, tmp_path, after=3, processes=num_gpus)
    assert 3 <= at < 7
    log = _finish(_start(TRAIN_NET, ["--resume"] + args, tmp_path, num_gpus))
    assert f"Starting training from iteration {at + 1}" in log
    assert f"World size: {num_gpus}" in log
    _assert_resumed_like_uninterrupted(full, killed, at, 8)


@pytest.mark.slow
def test_video_resume_after_sigkill_mid_epoch_repeats_the_losses(tmp_path):
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    data = make_synthetic_kinetics(tmp_path / "ks", train_per_class=4, val_per_class=1,
                                   num_frames=16, fps=16, size=(64, 48))
    # A missing video in the list: the epoch positions no longer follow from the iteration, the
    # loader state saved in the checkpoint has to say where the epoch stands.
    train = tmp_path / "train.csv"
    train.write_text((data / "train.csv").read_text() + f"{tmp_path}/missing.mp4 0\n")
    common = [f"dataloader.train.data_path={train}", f"dataloader.train.video_path_prefix={data}",
              f"dataloader.test.data_path={data / 'val.csv'}", "dataloader.test.num_workers=0",
              "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=1",
              "train.max_iter=10", "train.checkpointer.period=3", "train.log_period=1",
              "model.drop_path_rate=0.2", "train.device=cpu"]
    # Two processes (gloo): each has its own share of the videos, and only one holds the
    # missing one, so each must get back its own position.
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_start(RUN_VIDEO, ["--num-gpus", 2] + common + [f"train.output_dir={full}"], ROOT, 2))
    args = ["--num-gpus", 2] + common + [f"train.output_dir={killed}"]
    at = _run_and_kill(RUN_VIDEO, args, killed, ROOT, after=5, processes=2)
    assert at in (5, 8)  # 9 videos per process / 2 = 4 iterations per epoch: inside epoch 1 or 2
    log = _finish(_start(RUN_VIDEO, ["--resume"] + args, ROOT, 2))  # options before key=value
    assert f"resuming from {killed / f'model_{at:07d}.pth'} at iteration {at + 1}" in log
    assert "without the loader state" not in log
    _assert_resumed_like_uninterrupted(full, killed, at, 10)


_SAVE_AND_DIE = textwrap.dedent("""
    import sys, time, torch
    from revvit_d2.d2 import RevvitCheckpointer

    model = torch.nn.Linear(4, 3)
    ckpt = RevvitCheckpointer(model, sys.argv[1])
    ckpt.save("model_0000009", iteration=9)
    real_save = torch.save

    def save_half_then_hang(obj, f, *args, **kwargs):
        f.write(b"PK half a checkpoint")
        f.flush()
        print("inside the save", flush=True)
        time.sleep(600)

    torch.nn.init.zeros_(model.weight)
    torch.save = save_half_then_hang
    ckpt.save("model_0000019", iteration=19)
""")


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    from revvit_d2.d2 import RevvitCheckpointer

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_AND_DIE, str(out)], cwd=str(ROOT),
                            env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inside the save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (out / "model_0000019.pth").exists()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp_")]
    assert len(leftovers) == 1  # the killed save's temporary file, never named "last"

    model = torch.nn.Linear(4, 3)
    ckpt = RevvitCheckpointer(model, str(out))
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 9
    assert model.weight.abs().sum() > 0  # the weights of the completed save
    ckpt.save("model_0000029", iteration=29)  # the next save removes the stale temporary file
    assert sorted(p.name for p in out.iterdir()) == ["last_checkpoint", "model_0000009.pth",
                                                     "model_0000029.pth"]


# ---------------------------------------------------------------------------------------------
# The loaders alone (fast): starting at iteration k gives batch k of the uninterrupted stream
# ---------------------------------------------------------------------------------------------
class _NoisyMapper:
    """Draws from numpy, torch and python RNGs like an augmentation would; rejects index 5."""

    def __call__(self, d):
        import random

        if d["id"] == 5:
            return None
        return (d["id"], float(np.random.rand()), float(torch.rand(())), random.random())


def _dicts(n=23):
    return [{"id": i, "width": 100 + 7 * (i % 5), "height": 110} for i in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_detection_loader_restarts_at_any_iteration(workers):
    from revvit_d2.d2.sampler import ResumableTrainingStream, build_resumable_train_loader

    def batches(start, n, num_workers):
        loader = build_resumable_train_loader(_dicts(), mapper=_NoisyMapper(), total_batch_size=3,
                                              seed=11, start_iter=start, num_workers=num_workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    torch.manual_seed(0)
    reference = batches(0, 20, 0)  # 20 batches of 3 from 22 usable images: > 2 epochs
    state = torch.get_rng_state()
    assert batches(13, 7, workers) == reference[13:]
    assert torch.equal(state, torch.get_rng_state())  # mapping leaves the caller's RNGs alone
    ids = [x[0] for b in reference for x in b]
    assert 5 not in ids and len(set(ids)) == 22  # the rejected image is replaced, all are seen
    groups = [{d["width"] > d["height"] for d in (_dicts()[x[0]] for x in b)} for b in reference]
    assert all(len(g) == 1 for g in groups)  # one aspect-ratio group per batch

    # Two ranks deal the stream alternately: disjoint positions, together the whole epoch.
    first = [next(iter(ResumableTrainingStream(_dicts(), _NoisyMapper(), 1, seed=11, rank=r,
                                               world_size=2, aspect_ratio_grouping=False)
                       .batch_keys())) for r in (0, 1)]
    assert [k[1] for b in first for k in b] == [0, 1]


def test_video_loader_state_resumes_inside_an_epoch(tmp_path):
    from revvit_video.data import build_kinetics_train_loader
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    data = make_synthetic_kinetics(tmp_path / "ks", train_per_class=2, val_per_class=1,
                                   num_frames=8, fps=16, size=(48, 36))
    lst = tmp_path / "train.csv"
    lst.write_text(f"{tmp_path}/gone.mp4 1\n" + (data / "train.csv").read_text())

    def loader(workers):
        return build_kinetics_train_loader(str(lst), num_frames=4, sampling_rate=2, target_fps=16,
                                           crop_size=24, total_batch_size=2, num_workers=workers,
                                           seed=5, video_path_prefix=str(data))

    full = loader(0)
    stream = iter(full)
    reference, states = [], []
    rng = torch.get_rng_state()
    for _ in range(7):
        reference.append(next(stream))
        states.append(full.state_dict())
    assert full.iters_per_epoch == 4
    assert torch.equal(rng, torch.get_rng_state())  # the training step's RNG is left alone
    for k in (1, 5):  # resume after batch k (inside epoch 0 and inside epoch 1)
        again = loader(2)
        again.start_iter = k + 1
        again.load_state_dict(states[k])
        it = iter(again)
        for ref in reference[k + 1:]:
            got = next(it)
            assert torch.equal(got["video"], ref["video"])
            assert torch.equal(got["video_index"], ref["video_index"])
