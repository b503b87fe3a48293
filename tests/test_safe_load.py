"""Checkpoints are data, not code (docs/security.md): every load path reads files with
``weights_only=True`` plus a short allowlist, a file whose pickle asks for anything else is
refused before any of its content is used, and ``allow_unsafe_pickle=True`` opts in (with a
warning).

The malicious files below create a marker file when unpickled (``open(marker, "w")``); each is
wrapped in one of the supported container layouts and offered to every load path. The benign
files are built with the object types the real files hold.
"""
import argparse
import os
import pickle
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import AMPTrainer
from torch import nn

import revvit_d2
from revvit_d2.d2 import RevvitCheckpointer
from revvit_d2.training import (AtomicCheckpointer, ResumePoint, SeedState, load_checked,
                                resume_from_checkpoint, resume_point)
from revvit_d2.utils.io import SAFE_GLOBALS, UnsafeCheckpointError, read_checkpoint
from revvit_video import load_video_checkpoint, rev_mvit_video_test

from _helpers import load_oracle

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
LAYOUTS = ["slowfast", "mmpretrain", "plain", "detectron2", "pkl"]


class _Payload:
    """Unpickling it opens (creates) the marker file: any code the pickle names runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _slowfast_sd():
    return OrderedDict(load_oracle("slowfast_revvit_tiny.pt")["state_dict"])


def _revvit_sd():
    return revvit_d2.convert_slowfast_state_dict(_slowfast_sd())


def _write(layout: str, path: Path, payload=None) -> Path:
    """A checkpoint file of `layout` for ``rev_vit_test``; with `payload`, that object is the
    first entry of the file's state dict (or of its metadata)."""
    sd = _slowfast_sd()
    if payload is not None:
        sd = OrderedDict([("evil", payload)] + list(sd.items()))
    if layout == "slowfast":  # epoch, state dicts, the config as YAML (SlowFast checkpoint.py)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
        data = {"epoch": 300, "model_state": sd, "optimizer_state": opt.state_dict(),
                "cfg": "MODEL:\n  MODEL_NAME: MViT\nMVIT:\n  REV:\n    ENABLE: true\n"}
    elif layout == "mmpretrain":  # mmengine: state dict + plain metadata
        mm = OrderedDict(load_oracle("mmpretrain_revvit_tiny.pt")["state_dict"])
        meta = {"epoch": 300, "iter": 1000, "cfg": "model = dict(type='ImageClassifier')",
                "seed": 0, "experiment_name": "revvit", "time": "20221213_000000",
                "mmengine_version": "0.7.0", "dataset_meta": {"classes": ("a", "b")},
                "hook_msgs": {"best_score": np.float64(0.799), "last_ckpt": "epoch_300.pth"}}
        if payload is not None:
            meta = {"evil": payload, **meta}
        data = {"meta": meta, "state_dict": mm}
    elif layout == "plain":
        data = sd
    elif layout == "detectron2":  # what our checkpointers write
        sd = _revvit_sd()
        if payload is not None:
            sd = OrderedDict([("evil", payload)] + list(sd.items()))
        data = {"model": sd, "trainer": {"iteration": 4, "hooks": {}, "optimizer": {}},
                "seed": {"seed": 1}, "iteration": 4}
    elif layout == "pkl":  # detectron2 / Caffe2 model zoo: numpy arrays
        blobs = {k: v.numpy() for k, v in _slowfast_sd().items()}
        if payload is not None:
            blobs = {"evil": payload, **blobs}
        with open(path, "wb") as f:
            pickle.dump({"model": blobs, "__author__": "test"}, f, protocol=2)
        return path
    else:
        raise ValueError(layout)
    torch.save(data, path)
    return path


def _suffix(layout):
    return {"slowfast": ".pyth", "pkl": ".pkl"}.get(layout, ".pth")


@pytest.fixture
def evil(tmp_path):
    """``make(layout) -> path`` of a malicious file; after the test, the marker must not exist."""
    marker = tmp_path / "PWNED"

    def make(layout, name=None):
        return _write(layout, tmp_path / (name or f"evil_{layout}{_suffix(layout)}"),
                      _Payload(marker))

    yield make
    assert not marker.exists(), "a checkpoint ran code while it was loaded"


def _refused(fn, path):
    with pytest.raises(UnsafeCheckpointError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and "allow_unsafe_pickle=True" in msg
    assert "open" in msg  # the global the pickle asked for (io.open / builtins.open)
    return msg


# ---------------------------------------------------------------------------------------------
# Every load path refuses a malicious file in every layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_and_core_loader_refuse(layout, evil):
    path = evil(layout)
    _refused(lambda: read_checkpoint(path), path)
    _refused(lambda: read_checkpoint(path, mmap=True), path)
    model = revvit_d2.create_model("rev_vit_test")
    _refused(lambda: revvit_d2.load_pretrained(model, path), path)
    _refused(lambda: revvit_d2.load_pretrained(model, str(path)), path)
    _refused(lambda: revvit_d2.create_model("rev_vit_test", checkpoint=path), path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detectron2_checkpointers_refuse_load_and_resume(layout, evil, tmp_path):
    path = evil(layout)
    model = revvit_d2.create_model("rev_vit_test")
    for cls in (RevvitCheckpointer, AtomicCheckpointer):
        _refused(lambda: cls(model).load(str(path)), path)
    # --resume: the file "last_checkpoint" names, read first by resume_point, then loaded
    out = tmp_path / "out"
    out.mkdir()
    # (a .pkl is never a training checkpoint; mmap=True needs torch's zip format)
    last = evil("detectron2" if layout == "pkl" else layout, name="model_0000004.pth")
    os.replace(last, out / last.name)
    (out / "last_checkpoint").write_text(last.name)
    _refused(lambda: resume_point(str(out), True, None), out / last.name)
    for cls in (RevvitCheckpointer, AtomicCheckpointer):  # a fresh one each: a failed load
        ckpt = cls(model, str(out), seed=SeedState(1))  # leaves detectron2's unusable
        _refused(lambda: ckpt.resume_or_load("", resume=True), out / last.name)
        point = ResumePoint(str(out / last.name), 1, 5)
        _refused(lambda: resume_from_checkpoint(cls(model, str(out)), None, point),
                 out / last.name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tool_loading_functions_and_video_hub_refuse(layout, evil):
    """load_checked is what eval_imagenet (with load_pretrained) and run_video (with
    load_video_checkpoint) load weights with; the hub functions read files themselves."""
    path = evil(layout)
    _refused(lambda: load_checked(revvit_d2.create_model("rev_vit_test"), path), path)
    video = rev_mvit_video_test()
    _refused(lambda: load_checked(video, path, load=load_video_checkpoint), path)
    _refused(lambda: load_video_checkpoint(video, path), path)
    _refused(lambda: rev_mvit_video_test(checkpoint=str(path)), path)


def _run_tool(tool, *args, cwd=ROOT, timeout=600):
    env = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], cwd=str(cwd),
                          env=env, capture_output=True, text=True, timeout=timeout)


def _refused_by_tool(proc, path):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"refusing to load {path}" in lines[0], proc.stderr[-2000:]


def test_convert_checkpoint_cli_refuses_and_opts_in(evil, tmp_path):
    path = evil("slowfast")
    out = tmp_path / "converted.pth"
    _refused_by_tool(_run_tool("convert_checkpoint.py", path, out, "--quiet"), path)
    assert not out.exists()
    benign = tmp_path / "with_args.pyth"
    torch.save({"model_state": _slowfast_sd(), "args": argparse.Namespace(lr=0.1)}, benign)
    _refused_by_tool(_run_tool("convert_checkpoint.py", benign, out, "--quiet"), benign)
    ok = _run_tool("convert_checkpoint.py", benign, out, "--quiet", "--allow-unsafe-pickle",
                   "--model", "rev_vit_test")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "allow_unsafe_pickle=True" in ok.stderr  # the warning
    converted = read_checkpoint(out)  # what the tool writes loads under the rule
    revvit_d2.load_pretrained(revvit_d2.create_model("rev_vit_test"), converted)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    for c in ("a", "b"):
        (root / c).mkdir()
        Image.new("RGB", (40, 40), (100, 50, 0)).save(root / c / "x.png")
    return root


@pytest.mark.slow
def test_eval_imagenet_refuses(evil, image_folder):
    path = evil("slowfast")
    proc = _run_tool("eval_imagenet.py", "--checkpoint", path, f"eval.data={image_folder}",
                     "eval.num_workers=0")
    _refused_by_tool(proc, path)


@pytest.mark.slow
def test_train_net_refuses_init_checkpoint_and_resume(evil, tmp_path):
    path = evil("detectron2")
    common = ["dataloader.evaluator=null", "model.backbone.net.depth=2"]
    proc = _run_tool("train_net.py", "--eval-only", *common, f"train.init_checkpoint={path}",
                     f"train.output_dir={tmp_path / 'a'}", cwd=tmp_path)
    _refused_by_tool(proc, path)
    out = tmp_path / "b"
    out.mkdir()
    os.replace(evil("detectron2", name="x.pth"), out / "model_0000004.pth")
    (out / "last_checkpoint").write_text("model_0000004.pth")
    proc = _run_tool("train_net.py", "--resume", *common, f"train.output_dir={out}",
                     "train.max_iter=6", cwd=tmp_path)
    _refused_by_tool(proc, out / "model_0000004.pth")
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_run_video_refuses_init_checkpoint_and_resume(evil, tmp_path):
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    data = make_synthetic_kinetics(tmp_path / "ks", train_per_class=1, val_per_class=1,
                                   num_frames=16, fps=16, size=(48, 36))
    common = [f"dataloader.train.data_path={data / 'train.csv'}",
              f"dataloader.test.data_path={data / 'val.csv'}", "dataloader.test.num_workers=0",
              "dataloader.train.num_workers=0"]
    path = evil("slowfast")
    proc = _run_tool("run_video.py", "--eval-only", *common, f"train.init_checkpoint={path}",
                     f"train.output_dir={tmp_path / 'a'}")
    _refused_by_tool(proc, path)
    out = tmp_path / "b"
    out.mkdir()
    os.replace(evil("detectron2", name="x.pth"), out / "model_0000004.pth")
    (out / "last_checkpoint").write_text("model_0000004.pth")
    proc = _run_tool("run_video.py", "--resume", *common, f"train.output_dir={out}",
                     "train.max_iter=6")
    _refused_by_tool(proc, out / "model_0000004.pth")


# ---------------------------------------------------------------------------------------------
# Every supported format still loads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["slowfast", "mmpretrain", "plain", "detectron2"])
def test_supported_formats_load_without_opt_in(layout, tmp_path):
    path = _write(layout, tmp_path / f"ok{_suffix(layout)}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unsafe" warning either
        data = read_checkpoint(path)
    if layout == "mmpretrain":
        assert data["meta"]["hook_msgs"]["best_score"] == np.float64(0.799)
        model = revvit_d2.build_from_mmpretrain_cfg(
            load_oracle("mmpretrain_revvit_tiny.pt")["model_config"])
    else:
        model = revvit_d2.create_model("rev_vit_test")
    report = revvit_d2.load_pretrained(model, path)
    assert report["loaded"] and not report["missing"] and not report["unexpected"]
    load_checked(model, path)
    if layout == "detectron2":
        AtomicCheckpointer(model).load(str(path))


def test_detectron2_pkl_loads_numpy_arrays_only(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    blobs = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "0.bias": np.ones(2, np.float32), "0.bias_momentum": np.zeros(2, np.float32)}
    for data in ({"model": blobs, "__author__": "zoo", "matching_heuristics": False},
                 {"blobs": blobs}):
        path = tmp_path / "R.pkl"
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
        nn.init.zeros_(model[0].weight)
        RevvitCheckpointer(model).load(str(path))
        assert torch.equal(model[0].weight, torch.arange(6.0).reshape(2, 3))
    # An object array's items go through the same restricted unpickler.
    marker = tmp_path / "PWNED"
    with open(path, "wb") as f:
        pickle.dump({"model": {"0.weight": np.array([_Payload(marker)], dtype=object)}}, f,
                    protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        read_checkpoint(path)
    assert not marker.exists()


def test_allowlist_is_numpy_scalars_only():
    objs = [g[0] if isinstance(g, tuple) else g for g in SAFE_GLOBALS]
    assert all(o.__module__.startswith("numpy") for o in objs)
    assert np.ndarray not in objs and not any("reconstruct" in o.__name__ for o in objs)


def test_opt_in_loads_a_benign_file_and_warns(tmp_path):
    """A training checkpoint with its argparse.Namespace (as DeiT / MAE training scripts save
    them) needs a global outside the allowlist: refused by default, loaded with the opt-in."""
    path = tmp_path / "deit_checkpoint.pth"
    torch.save({"model": _revvit_sd(), "args": argparse.Namespace(lr=5e-4), "epoch": 3}, path)
    msg = _refused_global_message(path)
    assert "argparse.Namespace" in msg
    with pytest.warns(UserWarning, match="allow_unsafe_pickle=True"):
        data = read_checkpoint(path, allow_unsafe_pickle=True)
    assert data["args"].lr == 5e-4
    model = revvit_d2.create_model("rev_vit_test")
    with pytest.warns(UserWarning, match="executes code|can execute code"):
        revvit_d2.load_pretrained(model, path, allow_unsafe_pickle=True)
    with pytest.warns(UserWarning):
        load_checked(model, path, allow_unsafe_pickle=True)
    with pytest.warns(UserWarning):
        AtomicCheckpointer(model, allow_unsafe_pickle=True).load(str(path))
    pkl = tmp_path / "with_namespace.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"blobs": {"w": np.zeros(2)}, "args": argparse.Namespace(a=1)}, f)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        read_checkpoint(pkl)
    with pytest.warns(UserWarning):
        assert read_checkpoint(pkl, allow_unsafe_pickle=True)["args"].a == 1


def _refused_global_message(path):
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    return str(err.value)


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(_slowfast_sd(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(Exception) as err:
        read_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


# ---------------------------------------------------------------------------------------------
# Our own checkpoints hold only types that load under the rule
# ---------------------------------------------------------------------------------------------
class _Loader:
    def __init__(self):
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield torch.randn(2, 3)

    def state_dict(self):
        return {"iteration": self.pos, "epoch": 0, "position": self.pos * 2}


def test_training_checkpoint_with_amp_scaler_and_data_state_loads_back(tmp_path):
    """What the training tools' checkpointers save (model, optimizer with state, LR schedule,
    AMP grad scaler, seed, data position) is weights-only loadable."""
    from detectron2.engine import hooks
    from detectron2.solver import LRMultiplier
    from fvcore.common.param_scheduler import CosineParamScheduler

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    trainer = AMPTrainer(model, _Loader(), opt, grad_scaler=torch.amp.GradScaler("cpu"))
    trainer.iter = 7
    sched = LRMultiplier(opt, CosineParamScheduler(1, 0), max_iter=10)
    trainer.register_hooks([hooks.LRScheduler(opt, sched)])
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] > 0  # a real scaler state
    state["data"] = {"per_rank": [_Loader().state_dict()]}
    for cls in (AtomicCheckpointer, RevvitCheckpointer):
        (tmp_path / cls.__name__).mkdir()
        ckpt = cls(model, str(tmp_path / cls.__name__), seed=SeedState(3))
        ckpt.checkpointables["trainer"] = type("T", (), {"state_dict": lambda self: state})()
        ckpt.save("model_0000007", iteration=7)
        path = tmp_path / cls.__name__ / "model_0000007.pth"
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        data = read_checkpoint(path)
        assert data["trainer"]["grad_scaler"] == state["grad_scaler"]
        assert data["seed"] == {"seed": 3} and data["iteration"] == 7
        point = resume_point(str(tmp_path / cls.__name__), True, None)
        assert point.seed == 3 and point.start_iter == 8
