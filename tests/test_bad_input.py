"""Bad input across the tools: a missing path, an empty dataset, a checkpoint of another model,
an unknown config key and a config that cannot be built each end with exactly one ``error:``
line on stderr (no traceback), a non-zero exit status, and nothing half-written.

"Nothing half-written", per tool:

* ``train_net.py``, ``run_video.py``: no checkpoint, ``last_checkpoint`` or metrics file. Errors
  found while checking the config and the paths come before detectron2's ``default_setup``, so
  the output directory is not even created; errors found while building the model or the data,
  or loading a checkpoint, leave only the ``config.yaml`` and ``log.txt`` that ``default_setup``
  writes (the record of the failed run).
* ``eval_imagenet.py`` writes no file at all.
* ``convert_checkpoint.py``: no output file and no temporary file.

Every tool runs in an empty working directory that must stay empty.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _runs import assert_one_error_line
from revvit_d2 import create_model

pytestmark = pytest.mark.slow  # every case runs a tool in a subprocess (make test, not test-fast)

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SETUP_FILES = {"config.yaml", "log.txt"}  # written by detectron2's default_setup


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from revvit_d2.data.synthetic.imagenet import make_synthetic_imagefolder
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    root = tmp_path_factory.mktemp("inputs")
    videos = make_synthetic_kinetics(root / "ks", train_per_class=1, val_per_class=1,
                                     num_frames=16, fps=16, size=(64, 48))
    images = make_synthetic_imagefolder(root / "img", num_classes=10, train_per_class=1,
                                        val_per_class=1, image_size=(40, 60), seed=0)
    (root / "empty_dir").mkdir()
    (root / "empty.csv").write_text("")
    (root / "empty.pth").write_bytes(b"")
    other = root / "rev_vit_other.pth"  # a Rev-ViT of other dimensions than every tool expects
    torch.save(create_model("rev_vit_test", embed_dim=32, num_heads=2).state_dict(), other)
    # A COCO-format dataset without images, registered by a config file that is otherwise the
    # demo's (only a config file can register a dataset for tools/train_net.py).
    (root / "empty_coco.json").write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}]}')
    (root / "empty_coco_config.py").write_text(textwrap.dedent(f"""
        import os
        from detectron2.config import LazyConfig
        from detectron2.data import DatasetCatalog
        from detectron2.data.datasets import register_coco_instances

        _here = os.path.dirname(__file__)
        if "empty_coco_train" not in DatasetCatalog.list():
            register_coco_instances("empty_coco_train", {{}},
                                    os.path.join(_here, "empty_coco.json"), _here)
        _demo = LazyConfig.load("{ROOT / 'configs/COCO/mask_rcnn_revvit_synthetic.py'}")
        model, optimizer, lr_multiplier = _demo.model, _demo.optimizer, _demo.lr_multiplier
        dataloader, train = _demo.dataloader, _demo.train
        dataloader.train.dataset.names = "empty_coco_train"
    """))
    return dict(root=root, videos=videos, images=images / "val", other=other)


def _train_net(d, out):
    common = [f"train.output_dir={out}", "train.max_iter=1"]
    return {
        "missing_path": ([f"train.init_checkpoint={d['root'] / 'no_such.pth'}"],
                         "train.init_checkpoint not found"),
        "missing_config": (["--config-file", "nope.py"], "config file not found: nope.py"),
        # Two CPU processes (gloo, also on a machine with GPUs): still one line, from the main
        # process only.
        "missing_path_2proc": (["--num-gpus", "2", "train.device=cpu",
                                f"train.init_checkpoint={d['root'] / 'no_such.pth'}"],
                               "train.init_checkpoint not found"),
        "missing_dataset": (["dataloader.train.dataset.names=no_such_set"],
                            "not registered in detectron2's DatasetCatalog: no_such_set"),
        "empty_dataset": (["--config-file", d["root"] / "empty_coco_config.py"],
                          "Dataset 'empty_coco_train' is empty"),
        "other_model": ([f"train.init_checkpoint={d['other']}"],
                        "checkpoint does not match the model"),
        "unknown_key": (["train.max_iters=5"],
                        "unknown config key 'train.max_iters' (known keys of 'train'"),
        "unbuildable": (["model.backbone.net.no_such_arg=3"], "cannot build the model"),
    }, common


def _run_video(d, out):
    train, test = d["videos"] / "train.csv", d["videos"] / "val.csv"
    common = [f"train.output_dir={out}", "train.max_iter=1"]
    return {
        "missing_path": ([f"dataloader.train.data_path={d['root'] / 'nope.csv'}",
                          f"dataloader.test.data_path={test}"], "video list not found"),
        "missing_checkpoint": ([f"train.init_checkpoint={d['root'] / 'no_such.pyth'}"],
                               "train.init_checkpoint not found"),
        "missing_path_eval_only": (["--eval-only", f"dataloader.test.data_path="
                                    f"{d['root'] / 'nope.csv'}"], "nope.csv"),
        "empty_dataset": ([f"dataloader.train.data_path={d['root'] / 'empty.csv'}",
                           f"dataloader.test.data_path={test}"], "is empty"),
        "other_model": ([f"dataloader.train.data_path={train}",
                         f"dataloader.test.data_path={test}",
                         f"train.init_checkpoint={d['other']}"], "does not fit the model"),
        "unknown_key": (["train.epochz=3"], "unknown config key 'train.epochz'"),
        "unbuildable": ([f"dataloader.train.data_path={train}",
                         f"dataloader.test.data_path={test}", "model.no_such_arg=3"],
                        "cannot build the model"),
    }, common


def _eval_imagenet(d, out):
    data = f"eval.data={d['images']}"
    return {
        "missing_path": ([f"eval.data={d['root'] / 'no_such_dir'}"], "no_such_dir"),
        "empty_dataset": ([f"eval.data={d['root'] / 'empty_dir'}"], "empty_dir"),
        "other_model": ([data, f"eval.checkpoint={d['other']}"],
                        "does not fit model rev_vit_test"),
        "unknown_key": ([data, "eval.batchsize=4"],
                        "unknown config key 'eval.batchsize' (known keys of 'eval'"),
        "unbuildable": ([data, "model.name=no_such_model"], "cannot build the model"),
    }, []


def _convert_checkpoint(d, out):
    # No config, so no config key; an empty file stands for the empty input.
    target = out / "converted.pth"
    return {
        "missing_path": ([d["root"] / "no_such.pyth", target], "no_such.pyth"),
        "empty_dataset": ([d["root"] / "empty.pth", target], "cannot read checkpoint"),
        "other_model": ([d["other"], target, "--model", "rev_vit_test"],
                        "checkpoint does not match"),
        "unbuildable": ([d["other"], target, "--model", "no_such_model"], "no_such_model"),
    }, []


TOOL_CASES = {"train_net.py": _train_net, "run_video.py": _run_video,
              "eval_imagenet.py": _eval_imagenet, "convert_checkpoint.py": _convert_checkpoint}
_NAMES_ONLY = dict.fromkeys(("root", "videos", "images", "other"), Path("."))  # for the ids
PARAMS = [(tool, case) for tool, cases in TOOL_CASES.items()
          for case in cases(_NAMES_ONLY, Path("."))[0]]


@pytest.mark.parametrize("tool,case", PARAMS, ids=[f"{t[:-3]}-{c}" for t, c in PARAMS])
def test_bad_input_is_one_error_line_and_nothing_half_written(tool, case, inputs, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    cases, common = TOOL_CASES[tool](inputs, out)
    args, needle = cases[case]
    args = args + common
    env = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), OMP_NUM_THREADS="2",
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], cwd=str(work),
                          env=env, capture_output=True, text=True, timeout=300)
    assert_one_error_line(proc, needle)
    assert not list(work.iterdir())
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if tool in ("train_net.py", "run_video.py"):
        assert set(left) <= SETUP_FILES, left
    else:
        assert left == [], left
