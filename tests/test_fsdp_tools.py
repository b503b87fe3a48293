"""Sharded training (``train.fsdp.enabled=True``) in tools/train_net.py and tools/run_video.py:
a run SIGKILLed after a sharded checkpoint resumes with the losses of an uninterrupted one; a
checkpoint written by 2 processes resumes with 1 and the reverse (DCP reshards, bit for bit);
tools/convert_checkpoint.py turns a sharded checkpoint into one file that ``--eval-only`` and
the model loaders read; settings that do not apply are one error line.

Every run is on the CPU with gloo processes (``train.device=cpu``), as in tests/test_resume.py,
whose exact comparisons this file repeats for the sharded runs.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _runs import assert_losses_repeat, kill_when, metrics_losses, start_tool  # noqa: E402
from revvit_d2.utils.io import UnsafeCheckpointError, read_checkpoint  # noqa: E402
from revvit_d2.utils.sharded_checkpoint import (is_sharded_checkpoint,  # noqa: E402
                                                read_sharded_tensors)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "tools" / "train_net.py"
RUN_VIDEO = ROOT / "tools" / "run_video.py"
CONVERT = ROOT / "tools" / "convert_checkpoint.py"
ENV = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")

# The demo detector at depth 2, two images per step, 8 iterations, a checkpoint every 2.
DETECTION = ["model.backbone.net.depth=2", "model.backbone.net.drop_path_rate=0.2",
             "model.roi_heads.batch_size_per_image=32", "dataloader.train.total_batch_size=2",
             "dataloader.train.num_workers=1", "dataloader.evaluator=null",
             "train.max_iter=8", "train.checkpointer.period=2", "train.log_period=1",
             "train.seed=7", "train.deterministic=True", "train.device=cpu",
             "train.fsdp.enabled=True"]
VIDEO = ["model.drop_path_rate=0.2", "train.device=cpu", "train.fsdp.enabled=True"]


def _start(tool, args, cwd=ROOT):
    return start_tool(tool, args, cwd, ENV)


def _finish(proc, timeout=600, status=0):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == status, out[-4000:]
    return out


def _last_iteration(out_dir: Path) -> int:
    tag = out_dir / "last_checkpoint"
    name = tag.read_text().strip() if tag.exists() else ""
    return int(name[len("model_"):]) if name.startswith("model_0") else -1


def _run_and_kill(tool, args, out_dir: Path, after: int, timeout=600):
    """Start a run and SIGKILL it (and its workers) once its last checkpoint is at iteration
    `after` or later."""
    return kill_when(_start(tool, args), lambda: _last_iteration(out_dir), after, timeout)


_losses = metrics_losses


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_resumed_like_uninterrupted(full: Path, resumed: Path, killed_at: int, max_iter: int):
    assert_losses_repeat(full, resumed, killed_at, max_iter)
    for prefix in ("model.", "optimizer."):
        _assert_same_tensors(read_sharded_tensors(full / "model_final", prefix),
                             read_sharded_tensors(resumed / "model_final", prefix))


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """A tiny Kinetics-layout set (16 training, 4 test videos) and the run_video arguments
    that use it."""
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    root = tmp_path_factory.mktemp("ks")
    data = make_synthetic_kinetics(root / "ks", train_per_class=4, val_per_class=1,
                                   num_frames=16, fps=16, size=(64, 48))
    return [f"dataloader.train.data_path={data / 'train.csv'}",
            f"dataloader.train.video_path_prefix={data}",
            f"dataloader.test.data_path={data / 'val.csv'}", "dataloader.test.num_workers=0",
            "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=1",
            "train.log_period=1"]


# ---------------------------------------------------------------------------------------------
# (a) SIGKILL after a sharded checkpoint, --resume: the losses of the uninterrupted run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_detection_sharded_resume_after_sigkill_repeats_the_losses(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["--num-gpus", 2] + DETECTION
    _finish(_start(TRAIN_NET, common + [f"train.output_dir={full}"]))
    assert is_sharded_checkpoint(full / "model_final")
    assert sorted(p.name for p in (full / "model_final").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "training_state.pth"]
    args = common + [f"train.output_dir={killed}"]
    at = _run_and_kill(TRAIN_NET, args, killed, after=3)
    assert 3 <= at < 7
    log = _finish(_start(TRAIN_NET, ["--resume"] + args))
    assert f"resuming from {killed / f'model_{at:07d}'} at iteration {at + 1}" in log
    assert f"Starting training from iteration {at + 1}" in log
    _assert_resumed_like_uninterrupted(full, killed, at, 8)
    # max_to_keep=2 (the demo's): older checkpoint directories were removed; no temporary one
    assert sorted(p.name for p in full.iterdir() if p.name.startswith(("model_", ".tmp"))) \
        == ["model_0000005", "model_0000007", "model_final"]
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
def test_video_sharded_resume_after_sigkill_repeats_the_losses(tmp_path, kinetics):
    common = ["--num-gpus", 2] + kinetics + VIDEO + ["train.max_iter=8",
                                                     "train.checkpointer.period=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_start(RUN_VIDEO, common + [f"train.output_dir={full}"]))
    args = common + [f"train.output_dir={killed}"]
    at = _run_and_kill(RUN_VIDEO, args, killed, after=2)
    assert at in (2, 5)
    log = _finish(_start(RUN_VIDEO, ["--resume"] + args))
    assert f"resuming from {killed / f'model_{at:07d}'} at iteration {at + 1}" in log
    _assert_resumed_like_uninterrupted(full, killed, at, 8)


# ---------------------------------------------------------------------------------------------
# (b) another number of processes
# ---------------------------------------------------------------------------------------------
_ROUND_TRIP = textwrap.dedent("""
    # One process group of N (gloo): a tiny Rev-ViT sharded, trained two steps and saved
    # ("save"), or loaded from that checkpoint ("load"); rank 0 writes the full model and
    # optimizer state it then holds.
    import os, sys
    import torch
    import torch.nn.functional as F
    from detectron2.utils import comm
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    import revvit_d2
    from revvit_d2.training import ShardedCheckpointer, shard_for_training
    from revvit_d2.training.cli import launch_on


    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]


    def main(out, phase):
        torch.manual_seed(0)
        model = revvit_d2.create_model("rev_vit_test", depth=2, drop_path_rate=0.1)
        model = shard_for_training(model, {"reshard_after_forward": True}, "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        counter = Counter()
        ckpt = ShardedCheckpointer(model, opt, out, counter=counter)
        rank, size = comm.get_rank(), comm.get_world_size()
        if phase == "save":
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)
            for _ in range(2):
                part = slice(rank * 4 // size, (rank + 1) * 4 // size)
                F.cross_entropy(model(x[part]), y[part]).backward()
                opt.step()
                opt.zero_grad()
            counter.n = 41
            ckpt.save("model_0000001", iteration=1)
        else:
            ckpt.load(os.path.join(out, "model_0000001"))
            assert counter.n == 41
        full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            torch.save(full, os.path.join(out, f"{phase}_{size}.pt"))


    if __name__ == "__main__":
        n = int(sys.argv[3])
        launch_on("cpu", main, n, dist_url="auto", args=(sys.argv[1], sys.argv[2]))
""")


def _round_trip(tmp_path, out, phase, processes):
    script = tmp_path / "round_trip.py"
    script.write_text(_ROUND_TRIP)
    proc = subprocess.run([sys.executable, str(script), str(out), phase, str(processes)],
                          cwd=str(ROOT), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / f"{phase}_{processes}.pt", weights_only=True)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flat(v, f"{prefix}{i}.").items()}
    return {prefix: tree}


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,loaded_by", [(2, 1), (1, 2)])
def test_sharded_checkpoint_loads_exactly_with_another_process_count(tmp_path, saved_by,
                                                                     loaded_by):
    out = tmp_path / "out"
    out.mkdir()
    saved = _round_trip(tmp_path, out, "save", saved_by)
    loaded = _round_trip(tmp_path, out, "load", loaded_by)
    a, b = _flat(saved), _flat(loaded)
    assert a.keys() == b.keys()
    assert any(".exp_avg_sq" in k for k in a)  # the optimizer state is in the comparison
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.slow
def test_detection_sharded_checkpoint_resumes_with_one_process(tmp_path):
    out = tmp_path / "out"
    args = DETECTION + [f"train.output_dir={out}", "train.max_iter=4"]
    _finish(_start(TRAIN_NET, ["--num-gpus", 2] + args))
    two = _losses(out)
    (out / "last_checkpoint").write_text("model_0000001")
    ddp = [a for a in args if a != "train.fsdp.enabled=True"]  # a sharded one needs FSDP
    log = _finish(_start(TRAIN_NET, ["--resume"] + ddp), status=1)
    assert log.strip().splitlines()[-1] == (f"error: {out / 'model_0000001'} is a sharded "
                                            f"checkpoint: resume it with train.fsdp.enabled=True "
                                            f"(docs/fsdp_training.md)")
    log = _finish(_start(TRAIN_NET, ["--resume", "--num-gpus", 1] + args))
    assert f"resuming from {out / 'model_0000001'} at iteration 2" in log
    assert "World size: 1" in log
    # Iterations 2 and 3 again, now one process with both images: other per-process batches
    # and drop-path masks, so other losses (the exact reload: the test above).
    one = _losses(out)
    assert {2, 3} <= set(one) and {2, 3} <= set(two)
    assert all(torch.isfinite(torch.tensor(v)) for i in (2, 3) for v in one[i].values())
    assert is_sharded_checkpoint(out / "model_final")


# ---------------------------------------------------------------------------------------------
# (c) one file from a sharded checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_converted_sharded_checkpoint_loads_in_eval_only_and_the_hub(tmp_path, kinetics):
    out = tmp_path / "out"
    common = kinetics + VIDEO + ["train.max_iter=4", "train.checkpointer.period=2"]
    log = _finish(_start(RUN_VIDEO, ["--num-gpus", 2] + common + [f"train.output_dir={out}"]))
    top1 = [line for line in log.splitlines() if line.startswith("* Top-1")]
    converted = tmp_path / "final.pth"
    res = subprocess.run([sys.executable, str(CONVERT), str(out / "model_final"), str(converted)],
                         cwd=str(ROOT), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "format: sharded" in res.stdout
    data = read_checkpoint(converted)  # data only
    assert set(data) == {"model", "source", "format"} and data["source"] == "model_final"
    _assert_same_tensors(data["model"], read_sharded_tensors(out / "model_final"))

    # --eval-only with the file: the accuracy the training run's final test printed
    ev = _finish(_start(RUN_VIDEO, ["--eval-only"] + common + [
        f"train.output_dir={tmp_path / 'eval'}", f"train.init_checkpoint={converted}"]))
    assert [line.split(" clips/s")[0] for line in ev.splitlines() if line.startswith("* Top-1")] \
        == [line.split(" clips/s")[0] for line in top1]
    # ... and --eval-only --resume reads the sharded checkpoint directly
    ev2 = _finish(_start(RUN_VIDEO, ["--eval-only", "--resume"] + common +
                         [f"train.output_dir={out}"]))
    assert [line.split(" clips/s")[0] for line in ev2.splitlines()
            if line.startswith("* Top-1")] == [line.split(" clips/s")[0] for line in top1]

    # the hub entry point loads it strictly
    from revvit_video.hub import rev_mvit_video_test

    model = rev_mvit_video_test(checkpoint=str(converted), temporal_size=8, head_num_classes=4)
    _assert_same_tensors({k: v for k, v in model.state_dict().items() if k in data["model"]},
                         data["model"])


@pytest.mark.slow
def test_converted_detection_checkpoint_loads_in_eval_only(tmp_path):
    out = tmp_path / "out"
    args = DETECTION + ["train.max_iter=2", f"train.output_dir={out}"]
    _finish(_start(TRAIN_NET, ["--num-gpus", 2] + args))
    converted = tmp_path / "final.pth"
    res = subprocess.run([sys.executable, str(CONVERT), str(out / "model_final"), str(converted),
                          "--quiet"], cwd=str(ROOT), env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(
        ROOT / "configs/COCO/mask_rcnn_revvit_synthetic.py")), ["model.backbone.net.depth=2"])
    from revvit_d2.d2 import RevvitCheckpointer

    model = instantiate(cfg.model)
    RevvitCheckpointer(model).load(str(converted))  # the --eval-only loader
    _assert_same_tensors(model.state_dict(), read_checkpoint(converted)["model"])


def test_convert_refuses_a_sharded_checkpoint_whose_metadata_runs_code(tmp_path):
    import pickle

    bad = tmp_path / "bad"
    bad.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        read_sharded_tensors(bad)
    res = subprocess.run([sys.executable, str(CONVERT), str(bad), str(tmp_path / "x.pth")],
                         cwd=str(ROOT), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "pwned" not in res.stdout
    assert res.stderr.strip().startswith("error: refusing to load") and \
        len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([sys.executable, str(CONVERT), str(tmp_path), str(tmp_path / "x.pth")],
                         cwd=str(ROOT), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "is not a sharded checkpoint" in res.stderr
    assert not (tmp_path / "x.pth").exists()


# ---------------------------------------------------------------------------------------------
# (d) settings that do not apply: one error line
# ---------------------------------------------------------------------------------------------
def test_fsdp_keys_default_off_and_bad_settings_are_one_line():
    from omegaconf import OmegaConf

    from revvit_d2.training import ToolError, add_fsdp_keys, fsdp_settings

    train = OmegaConf.create({"ddp": {"fp16_compression": False}})
    add_fsdp_keys(train)
    assert dict(train.fsdp) == {"enabled": False, "reshard_after_forward": True,
                                "mixed_precision": None}
    assert fsdp_settings(train) is None  # DDP stays the default
    train.fsdp.enabled = True
    assert fsdp_settings(train) == {"reshard_after_forward": True}
    train.fsdp.mixed_precision = "bf16"
    policy = fsdp_settings(train)["mp_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    for change, amp, match in [
        ({"mixed_precision": "fp16"}, None, r"train\.fsdp\.mixed_precision must be 'bf16' or "
                                            r"None, got 'fp16'"),
        ({"reshard_after_forward": "yes"}, None, r"train\.fsdp\.reshard_after_forward must be"),
        ({"reshard_after_forward": False}, None, r"reshard_after_forward=False does not apply"),
        ({"mixed_precision": None}, torch.float16, r"train\.amp with float16 does not apply"),
    ]:
        bad = OmegaConf.merge(train, {"fsdp": change})
        with pytest.raises(ToolError, match=match):
            fsdp_settings(bad, amp)
    with pytest.raises(ToolError, match=r"train\.ddp\.fp16_compression=True does not apply"):
        fsdp_settings(OmegaConf.merge(train, {"ddp": {"fp16_compression": True}}))
    with pytest.raises(ToolError, match=r"unknown key\(s\) train\.fsdp\.shard_grads"):
        fsdp_settings(OmegaConf.merge(train, {"fsdp": {"shard_grads": True}}))


@pytest.mark.parametrize("tool,override,message", [
    (TRAIN_NET, "train.fsdp.mixed_precision=fp16", "error: train.fsdp.mixed_precision must be "
                                                   "'bf16' or None, got 'fp16'"),
    (RUN_VIDEO, "train.fsdp.mixed_precision=fp16", "error: train.fsdp.mixed_precision must be "
                                                   "'bf16' or None, got 'fp16'"),
    (TRAIN_NET, "train.fsdp.shard=2", "error: unknown config key 'train.fsdp.shard'"),
])
def test_tools_report_a_bad_fsdp_setting_in_one_line(tmp_path, tool, override, message):
    res = subprocess.run([sys.executable, str(tool), "train.fsdp.enabled=True", override,
                          "train.device=cpu", f"train.output_dir={tmp_path / 'out'}"],
                         cwd=str(ROOT), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_sharded_directory_as_init_checkpoint_is_one_line(tmp_path):
    from revvit_d2.training import ToolError, check_start_checkpoint

    ckpt = tmp_path / "model_final"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(ToolError, match=r"is a sharded checkpoint \(a directory\): --resume "
                                        r"continues it .*tools/convert_checkpoint\.py"):
        check_start_checkpoint(str(tmp_path / "run"), str(ckpt), resume=False)
    shutil.rmtree(ckpt)
