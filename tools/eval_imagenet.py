#!/usr/bin/env python
"""Evaluate a Rev-ViT classifier on an ImageNet-layout folder (top-1 / top-5, speed, size).

Example (official Rev-ViT-B checkpoint on ImageNet val; with no argument at all the tool runs
the built-in demo, configs/ImageNet/rev_vit_test_eval.py, on a generated shape folder):

    python tools/eval_imagenet.py --config-file configs/ImageNet/rev_vit_b_eval.py --checkpoint REV_VIT_B.pyth eval.data=/data/imagenet/val

Overrides are ``key=value`` pairs after the options (``eval.batch_size=32``,
``eval.max_images=1000``, ``model.name=rev_vit_s``...). The preprocessing is the official
single-crop test pipeline read from ``model.pretrained_cfg`` (resize the short side to
``int(size / crop_pct)``, centre crop, normalise). The last line printed starts with
``* Acc@1``. Expected errors (missing data, empty folder, a checkpoint of another model, an
unknown config key) print one ``error:`` line on stderr and exit with status 1. CUDA is used
when available (``--num-gpus 0`` forces the CPU); --resume, --eval-only and the multi-machine
options are accepted for compatibility and ignored.

The checkpoint is read as data only: a file whose pickle needs more is refused;
``eval.allow_unsafe_pickle=True`` loads it anyway, which executes code from the file: only for
files you trust (docs/security.md).
"""
import logging
import os
import sys
import time
from pathlib import Path

from revvit_d2.utils.errors import quiet_import_warnings

quiet_import_warnings()  # before detectron2 imports

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from revvit_d2.data.imagefolder import (  # noqa: E402
    SafeImageFolder,
    build_eval_loader,
    describe_skips,
    eval_transform_from_cfg,
)
from revvit_d2.data.synthetic.imagenet import (  # noqa: E402
    default_synthetic_root,
    make_synthetic_imagefolder,
)
from revvit_d2.modeling.flops import count_flops, count_parameters  # noqa: E402
from revvit_d2.training import (  # noqa: E402
    ToolError,
    add_unsafe_pickle_key,
    build,
    launch_guarded,
    load_checked,
    load_tool_config,
    tool_parser,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/ImageNet/rev_vit_test_eval.py"

logger = logging.getLogger("eval_imagenet")


def build_parser():
    parser = tool_parser(__doc__, DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="shortcut for eval.checkpoint=FILE ('none' for random weights)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="shortcut for eval.data=DIR (an ImageFolder: DIR/<class>/<image>)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="shortcut for eval.max_images=N (evenly spaced subset)")
    return parser


def setup_logging():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("fvcore", "iopath", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_config(args):
    def shortcuts(cfg):
        add_unsafe_pickle_key(cfg.eval)
        if args.checkpoint is not None:
            value = None if args.checkpoint.lower() in ("", "none", "null") else args.checkpoint
            OmegaConf.update(cfg, "eval.checkpoint", value, merge=True)
        if args.data is not None:
            OmegaConf.update(cfg, "eval.data", args.data, merge=True)
        if args.max_images is not None:
            OmegaConf.update(cfg, "eval.max_images", args.max_images, merge=True)

    return load_tool_config(args.config_file, DEFAULT_CONFIG, ("model", "eval"), args.opts,
                            REPO_ROOT, prepare=shortcuts)


# ------------------------------------------------------------------------------------------
# Data, model, checkpoint
# ------------------------------------------------------------------------------------------
def prepare_data(data):
    if data is None or str(data).strip() == "":
        raise ToolError("eval.data is not set (an ImageFolder directory: <data>/<class>/<image>)")
    path = Path(os.path.expanduser(os.path.expandvars(str(data))))
    synthetic = default_synthetic_root()
    if path.resolve() == (synthetic / "val").resolve():
        # The built-in demo folder: generate it on first use (a no-op once complete).
        if not (synthetic / ".complete").is_file():
            logger.info("generating the built-in synthetic dataset in %s", synthetic)
        make_synthetic_imagefolder(synthetic)
    return path


def open_dataset(path):
    try:
        return SafeImageFolder(path)  # checks the folder before any model is built
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ToolError(str(e)) from None


def build_loader(dataset, transform, ecfg, device):
    try:
        return build_eval_loader(dataset, transform, batch_size=int(ecfg.get("batch_size", 64)),
                                 num_workers=int(ecfg.get("num_workers", 2)),
                                 max_images=ecfg.get("max_images"),
                                 pin_memory=device.type == "cuda")
    except (TypeError, ValueError) as e:
        raise ToolError(f"eval settings: {e}") from None


def build_model(cfg):
    model = build(cfg.model, "the model")
    if not hasattr(model, "pretrained_cfg"):
        raise ToolError("the configured model has no pretrained_cfg (build it with "
                        "revvit_d2.create_model)")
    return model


def checkpoint_path(checkpoint):
    if checkpoint is None or str(checkpoint).strip() == "":
        return None
    path = Path(os.path.expanduser(os.path.expandvars(str(checkpoint))))
    if not path.is_file():
        raise ToolError(f"checkpoint not found: {path} (set eval.checkpoint=<file>, or "
                        f"eval.checkpoint=null to evaluate random weights)")
    return path


def load_weights(model, cfg) -> bool:
    """``eval.checkpoint`` into `model`, strictly (:func:`revvit_d2.training.load_checked`),
    read as data only unless ``eval.allow_unsafe_pickle``. False when there is no checkpoint."""
    checkpoint = checkpoint_path(cfg.eval.get("checkpoint"))
    if checkpoint is None:
        return False
    load_checked(model, checkpoint, f"model {cfg.model.get('name', type(model).__name__)}",
                 allow_unsafe_pickle=bool(cfg.eval.get("allow_unsafe_pickle", False)))
    return True


def _model_input_size(model):
    cfg_size = tuple(model.pretrained_cfg["input_size"][-2:])
    grid, ps = getattr(model, "patch_grid", None), getattr(model, "patch_size", None)
    if grid is not None and isinstance(ps, int):
        actual = (grid[0] * ps, grid[1] * ps)
        if actual != cfg_size:
            logger.info("model built for %s input (pretrained_cfg says %s): evaluating at %s",
                        actual, cfg_size, actual)
            return actual
    return cfg_size


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
def evaluate(model, loader, device, num_classes, log_period):
    n_batches = len(loader)
    total = len(loader.dataset)
    top1 = top5 = seen = 0
    skipped = {}  # path -> reason: distinct files, each warned about once
    model_time = 0.0
    k5 = min(5, num_classes)
    use_bar = sys.stderr.isatty()
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            for s in batch["skipped"]:
                if s.path not in skipped:
                    logger.warning("skipping unreadable image %s (%s: %s)", s.path, s.reason,
                                   s.error)
                    skipped[s.path] = s.reason
            if batch["images"] is not None:
                images = batch["images"].to(device, non_blocking=True)
                targets = batch["targets"].to(device, non_blocking=True)
                t0 = time.perf_counter()
                logits = model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                model_time += time.perf_counter() - t0
                pred = logits.topk(k5, dim=1).indices
                hit = pred == targets[:, None]
                top1 += int(hit[:, :1].any(dim=1).sum())
                top5 += int(hit.any(dim=1).sum())
                seen += images.shape[0]
            done = seen + len(skipped)
            if bar is not None:
                bar.update(done - bar.n)
                if seen:
                    bar.set_postfix(acc1=f"{100.0 * top1 / seen:.2f}")
            elif (i + 1) % max(1, log_period) == 0 or i + 1 == n_batches:
                el = time.perf_counter() - start
                logger.info("batch %d/%d  images %d/%d  running Acc@1 %.3f  %.1f images/s",
                            i + 1, n_batches, done, total, 100.0 * top1 / max(seen, 1),
                            done / max(el, 1e-9))
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    return dict(top1=100.0 * top1 / max(seen, 1), top5=100.0 * top5 / max(seen, 1), images=seen,
                skipped=len(skipped), skipped_reasons=skipped, seconds=elapsed,
                model_seconds=model_time)


def do_test(cfg, model, dataset, device):
    """Single-crop evaluation of `model` on `dataset`; prints the results (the last line starts
    with ``* Acc@1``) and returns them."""
    name, data = cfg.model.get("name", type(model).__name__), cfg.eval.data
    pcfg = dict(model.pretrained_cfg)
    pcfg["input_size"] = (3,) + tuple(_model_input_size(model))
    try:
        transform = eval_transform_from_cfg(pcfg)
    except ValueError as e:
        raise ToolError(f"preprocessing: {e}") from None
    dataset, loader = build_loader(dataset, transform, cfg.eval, device)
    num_classes = int(getattr(model, "num_classes", pcfg.get("num_classes", 0)))
    if len(dataset.classes) > num_classes:
        raise ToolError(f"{data} has {len(dataset.classes)} class folders but model {name} "
                        f"predicts {num_classes} classes")
    if len(dataset.classes) != num_classes:
        logger.warning("%s has %d class folders, model %s predicts %d classes: folder i is "
                       "taken as class i", data, len(dataset.classes), name, num_classes)
    h, w = pcfg["input_size"][-2:]
    logger.info("model %s on %s; data %s: %d classes, %d images, evaluating %d", name, device,
                data, len(dataset.classes), len(dataset), len(loader.dataset))
    logger.info("preprocessing: resize short side %d (%s), centre crop %dx%d, mean %s, std %s",
                int(h / pcfg["crop_pct"]), pcfg["interpolation"], h, w,
                tuple(pcfg["mean"]), tuple(pcfg["std"]))

    params = count_parameters(model)
    flops = count_flops(model, (torch.zeros(1, 3, h, w, device=device),))
    res = evaluate(model, loader, device, num_classes, int(cfg.eval.get("log_period", 20)))
    if res["images"] == 0:
        raise ToolError(f"no image of {data} could be read ({res['skipped']} skipped)")
    ips = res["images"] / max(res["seconds"], 1e-9)
    why = describe_skips(res["skipped_reasons"]).partition(": ")[2]
    print(f"Evaluated {res['images']} images ({res['skipped']} skipped as unreadable"
          f"{': ' + why if why else ''}) of {data} with {name} on {device}")
    print(f"Top-1 accuracy: {res['top1']:.3f} %   Top-5 accuracy: {res['top5']:.3f} %")
    print(f"Throughput: {ips:.1f} images/s end-to-end ({res['seconds']:.2f} s, data loading "
          f"included); model only {res['images'] / max(res['model_seconds'], 1e-9):.1f} images/s")
    gflops = flops / 1e9
    gflops_s = f"{gflops:.2f}" if gflops >= 1 else f"{gflops:.3g}"
    print(f"Parameters: {params:,}   FLOPs: {gflops_s} G per image at {h}x{w} (fvcore count)")
    print(f"* Acc@1 {res['top1']:.3f} Acc@5 {res['top5']:.3f} images {res['images']} skipped "
          f"{res['skipped']} images/s {ips:.1f} params {params:,} GFLOPs {gflops_s}", flush=True)
    return res


def main(args):
    cfg, cfg_path = load_config(args)
    logger.info("config %s", cfg_path)
    use_cuda = torch.cuda.is_available() and args.num_gpus > 0
    device = torch.device("cuda" if use_cuda else "cpu")
    cfg.eval.data = str(prepare_data(cfg.eval.get("data")))
    dataset = open_dataset(cfg.eval.data)
    checkpoint_path(cfg.eval.get("checkpoint"))  # a missing file: before the model is built
    torch.manual_seed(0)  # a run without checkpoint evaluates the same random weights each time
    model = build_model(cfg)
    if not load_weights(model, cfg):
        logger.info("no checkpoint: evaluating randomly initialised weights (seed 0; accuracy "
                    "is at chance level)")
    return do_test(cfg, model.eval().to(device), dataset, device)


def invoke_main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.num_gpus > 1:
        logger.warning("--num-gpus %d: this tool evaluates on a single device", args.num_gpus)
        args.num_gpus = 1
    return launch_guarded(main, args)  # one process: reports an expected error in one line


if __name__ == "__main__":
    sys.exit(invoke_main())
