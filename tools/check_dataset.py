#!/usr/bin/env python
"""Check a dataset before a long run: every entry read as training reads it, every problem listed.

    python tools/check_dataset.py --config-file configs/my_data.py            # what training uses
    python tools/check_dataset.py --coco /data/mine/train.json /data/mine/train
    python tools/check_dataset.py --kinetics /data/k400/train.csv --num-frames 16 --sampling-rate 4
    python tools/check_dataset.py --imagefolder /data/imagenet/val

With ``--config-file`` the paths and the sampling come from the LazyConfig that
tools/train_net.py, tools/run_video.py or tools/eval_imagenet.py would run (``key=value``
overrides after the options, as for those tools): the COCO datasets registered under
``dataloader.train/test.dataset.names``, the video lists ``dataloader.train/test.data_path``
with their ``num_frames``, ``sampling_rate``, ``target_fps``, ``video_path_prefix`` and the
model's number of classes, or the ImageFolder ``eval.data``.

What is checked. COCO: json entries training drops (unknown category or image ids, bad boxes,
malformed image entries, duplicate ids) and those it keeps with a doubt (renumbered duplicate
annotation ids, invalid segmentations, images without annotation); each image decoded as
training decodes it (EXIF rotation applied) and its size compared with the json's. Kinetics:
malformed list lines and labels out of range; each video opened and one clip decoded as the
loaders do, every frame decoded (``--quick``: only the first clip); videos shorter than one clip
(used by training with frames repeated: a warning). ImageFolder: each image decoded; class
folders without images.

Output: a table per dataset on stdout (``--max-rows``), a JSON report (``--report``, default
``check_dataset_report.json``), and a last line
``check_dataset: N entries checked: E errors (...), W warnings (...)`` or ``...: no problems``.
Exit status 0 when there is no problem, 1 when there are (or on an error line such as a missing
json). ``--ignore REASON`` (repeatable) lists those findings but does not count them, e.g.
``--ignore "no annotation"`` for COCO train2017's images without objects.
"""
import argparse
import inspect
import logging
import os
import sys
from pathlib import Path

from revvit_d2.utils.errors import EXIT_ERROR, UserError, print_error, quiet_import_warnings

quiet_import_warnings()  # before detectron2 imports

import torch  # noqa: E402
from detectron2.config import instantiate  # noqa: E402

import revvit_d2.d2.data as d2_data  # noqa: E402
from revvit_d2.d2.preflight import check_coco, coco_sources  # noqa: E402
from revvit_d2.data.preflight import (check_imagefolder, default_workers,  # noqa: E402
                                      summary_line, write_json_report)
from revvit_d2.training import ToolError, load_lazy_config, apply_overrides_strict  # noqa: E402
from revvit_video.data import model_num_classes  # noqa: E402
from revvit_video.preflight import check_kinetics  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("check_dataset")

#: The loader arguments the Kinetics check takes from a config node.
SAMPLING_KEYS = ("num_frames", "sampling_rate", "target_fps", "video_path_prefix", "num_classes")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=doc[0], epilog=doc[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config-file", metavar="FILE",
                      help="a LazyConfig of train_net.py, run_video.py or eval_imagenet.py")
    what.add_argument("--coco", nargs=2, metavar=("JSON", "IMAGE_ROOT"),
                      help="a COCO json and the folder its file_names are relative to")
    what.add_argument("--kinetics", metavar="LIST",
                      help="a Kinetics list file (<path> <label> lines) or class-folder tree")
    what.add_argument("--imagefolder", metavar="ROOT", help="an ImageNet-layout folder")
    parser.add_argument("--splits", nargs="+", default=["train", "test"],
                        help="with --config-file: the dataloader sections to check")
    video = parser.add_argument_group("Kinetics sampling (without --config-file)")
    video.add_argument("--num-frames", type=int, default=16)
    video.add_argument("--sampling-rate", type=int, default=4)
    video.add_argument("--target-fps", type=float, default=30.0)
    video.add_argument("--video-path-prefix", default=None)
    video.add_argument("--num-classes", type=int, default=None,
                       help="labels must be in [0, num-classes)")
    parser.add_argument("--quick", action="store_true",
                        help="videos: decode the first clip only, not every frame")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (0: check in this process; default: %(default)s)")
    parser.add_argument("--report", default="check_dataset_report.json",
                        help="JSON report path ('' for none; default: %(default)s)")
    parser.add_argument("--max-rows", type=int, default=50,
                        help="rows of each table on the terminal (default: %(default)s)")
    parser.add_argument("--ignore", action="append", default=[], metavar="REASON",
                        help="a reason listed but not counted as a problem (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE",
                        help="with --config-file: key=value overrides")
    return parser


# ------------------------------------------------------------------------------------------
# What a config trains on
# ------------------------------------------------------------------------------------------
def _loader_value(node, key):
    """The config's value of `key`, or the default of the loader function it calls."""
    if key in node:
        return node[key]
    target = node.get("_target_")
    try:
        param = inspect.signature(target).parameters.get(key)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is param.empty else param.default


def _config_num_classes(cfg):
    """Classes of the config's model, built on the meta device (no memory, no weights)."""
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model)
    except Exception as e:  # noqa: BLE001 - then labels are checked for >= 0 only
        logger.warning("cannot build the model to read its number of classes (%s): labels "
                       "are checked for >= 0 only; set dataloader.<split>.num_classes", e)
        return None
    return model_num_classes(model)


def jobs_from_config(args):
    """``[(kind, name, kwargs)]`` of the datasets the config's splits read."""
    path = args.config_file
    if not os.path.isfile(path) and (REPO_ROOT / path).is_file():
        path = str(REPO_ROOT / path)
    cfg = apply_overrides_strict(load_lazy_config(path), args.opts)
    loaders = cfg.get("dataloader")
    if loaders is None and "eval" in cfg and cfg.eval.get("data"):
        return [("imagefolder", f"eval: {cfg.eval.data}", {"root": cfg.eval.data})]
    if loaders is None:
        raise ToolError(f"{path} has neither a dataloader section nor eval.data")
    jobs, num_classes = [], "unset"
    for split in args.splits:
        node = loaders.get(split)
        if node is None:
            raise ToolError(f"{path} has no dataloader.{split}")
        if "dataset" in node and "names" in node.dataset:
            names = node.dataset.names
            names = [names] if isinstance(names, str) else list(names)
            if set(names) & set(d2_data.DEFAULT_NAMES):
                d2_data.register_synthetic_coco()
            for name, json_file, root in coco_sources(names):
                jobs.append(("coco", f"{split} {name}: {json_file}",
                             {"json_file": json_file, "image_root": root}))
        elif "data_path" in node:
            kwargs = {k: _loader_value(node, k) for k in SAMPLING_KEYS}
            if kwargs["num_classes"] is None:
                if num_classes == "unset":
                    num_classes = _config_num_classes(cfg)
                kwargs["num_classes"] = num_classes
            jobs.append(("kinetics", f"{split}: {node.data_path}",
                         {"data_path": node.data_path, **kwargs}))
        else:
            raise ToolError(f"dataloader.{split} reads neither registered detectron2 datasets "
                            f"(dataset.names) nor a video list (data_path)")
    return jobs


def jobs_from_args(args):
    if args.coco:
        return [("coco", f"coco: {args.coco[0]}",
                 {"json_file": args.coco[0], "image_root": args.coco[1]})]
    if args.kinetics:
        return [("kinetics", f"kinetics: {args.kinetics}",
                 {"data_path": args.kinetics, "num_frames": args.num_frames,
                  "sampling_rate": args.sampling_rate, "target_fps": args.target_fps,
                  "video_path_prefix": args.video_path_prefix,
                  "num_classes": args.num_classes})]
    return [("imagefolder", f"imagefolder: {args.imagefolder}", {"root": args.imagefolder})]


def run_job(kind, name, kwargs, args):
    common = {"workers": args.workers, "name": name,
              "progress": False if args.no_progress else None}
    try:
        if kind == "coco":
            return check_coco(**kwargs, **common)
        if kind == "kinetics":
            return check_kinetics(**kwargs, quick=args.quick, **common)
        return check_imagefolder(**kwargs, **common)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ToolError(f"{name}: {e}") from e


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.opts and not args.config_file:
        raise ToolError(f"key=value overrides need --config-file: {' '.join(args.opts)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    jobs = jobs_from_config(args) if args.config_file else jobs_from_args(args)
    reports = []
    for kind, name, kwargs in jobs:
        report = run_job(kind, name, kwargs, args)
        reports.append(report)
        print(report.table(args.max_rows), flush=True)
    if args.report:
        write_json_report(args.report, reports, args.ignore)
        print(f"JSON report: {args.report}")
    print(summary_line(reports, args.ignore), flush=True)
    return 1 if sum(r.problems(args.ignore) for r in reports) else 0


def invoke_main() -> int:
    try:
        return main()
    except UserError as e:
        print_error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(invoke_main())
