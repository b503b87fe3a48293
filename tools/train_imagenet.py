#!/usr/bin/env python
"""Train (or fine-tune) a reversible image classifier on an ImageNet-layout folder (LazyConfig).

Example (official Rev-ViT-B recipe on 8 GPUs; with no argument at all the tool runs the built-in
demo, configs/ImageNet/rev_vit_test_train.py: the tiny Rev-ViT on the generated shape folder,
on the CPU, in a few minutes):

    python tools/train_imagenet.py --config-file configs/ImageNet/rev_vit_b_train.py --num-gpus 8

Training data: ``dataloader.train.data`` (``<data>/<class>/<image>``) through timm's training
transform (``dataloader.train.augment``: RandAugment, random erasing, ...) and timm's Mixup /
CutMix (``dataloader.train.mixup``) with soft-target cross-entropy; unreadable images are skipped
and counted. Top-1 / top-5 on ``dataloader.test.data`` every ``train.eval_period`` iterations
and at the end; the last line printed starts with ``* Acc@1``. Fine-tuning on other classes:
``train.init_checkpoint=FILE train.finetune=True`` (a new head; official, revvit or plain ViT
weights, configs/ImageNet/rev_vit_finetune.py, docs/imagenet_train.md).

``--resume`` continues from ``<train.output_dir>/last_checkpoint`` with the same data order,
augmentations, Mixup draws and drop-path masks as the uninterrupted run (bit-identical losses on
the CPU); ``--eval-only`` tests ``train.init_checkpoint`` (or, with ``--resume``, the last
checkpoint). ``--num-gpus N`` starts N processes (DDP; CPU processes with gloo when
``train.device=cpu``); ``train.amp.enabled=True`` uses autocast on CUDA. Overrides are
``key=value`` pairs after the options. Expected errors (an empty folder, an unknown augmentation
key, a checkpoint whose head does not fit without ``train.finetune``) print one ``error:`` line
on stderr and exit with status 1 before any checkpoint or metrics file is written. Checkpoints
are read as data only unless ``train.allow_unsafe_pickle=True`` (docs/security.md).
"""
import logging
import os
import sys
from pathlib import Path

from revvit_d2.utils.errors import quiet_import_warnings

quiet_import_warnings()  # before detectron2 imports

from detectron2.utils import comm  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from revvit_d2.checkpoint import load_pretrained  # noqa: E402
from revvit_d2.d2.sampler import build_resumable_train_loader  # noqa: E402
from revvit_d2.data.imagefolder import (  # noqa: E402
    SafeImageFolder,
    collate_skip_corrupt,
    describe_skips,
    eval_transform_from_cfg,
)
from revvit_d2.data.imagefolder_train import (  # noqa: E402
    SkipUnreadable,
    build_mixup,
    build_train_transform,
    collate_train_batch,
)
from revvit_d2.data.synthetic.imagenet import (  # noqa: E402
    default_synthetic_root,
    make_synthetic_imagefolder,
)
from revvit_d2.training import (  # noqa: E402
    AtomicCheckpointer,
    SeedState,
    ToolError,
    add_seed_keys,
    add_unsafe_pickle_key,
    build,
    build_trainer,
    check_start_checkpoint,
    ddp,
    epoch_training_hooks,
    eval_only_weights,
    invoke_tool,
    load_checked,
    load_tool_config,
    metrics_writer,
    resume_from_checkpoint,
    resume_point,
    setup_run,
    tool_parser,
    train_from,
)
from revvit_d2.training.classification import (  # noqa: E402
    ClassificationMetricPrinter,
    ClassifierAMPTrainer,
    ClassifierTrainer,
    ImageClassificationLoss,
    evaluate_classifier,
)
from revvit_d2.training.device import amp_dtype, set_num_threads, training_device  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/ImageNet/rev_vit_test_train.py"

logger = logging.getLogger("train_imagenet")


def build_parser():
    return tool_parser(__doc__, DEFAULT_CONFIG)


def _add_keys(cfg):
    add_seed_keys(cfg.train)
    add_unsafe_pickle_key(cfg.train)
    if "finetune" not in cfg.train:
        cfg.train.finetune = False


def load_config(args):
    return load_tool_config(args.config_file, DEFAULT_CONFIG,
                            ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
                            args.opts, REPO_ROOT, prepare=_add_keys)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def _data_path(cfg, split: str) -> Path:
    node = cfg.dataloader.get(split)
    if node is None:
        raise ToolError(f"config defines no dataloader.{split}")
    data = node.get("data")
    if data is None or str(data).strip() == "":
        raise ToolError(f"dataloader.{split}.data is not set (an ImageFolder directory: "
                        f"<data>/<class>/<image>)")
    path = Path(os.path.expanduser(os.path.expandvars(str(data))))
    # The built-in shape folder: the default one (tools/eval_imagenet.py's), or the one that
    # dataloader.synthetic describes (root + make_synthetic_imagefolder arguments).
    params = dict(cfg.dataloader.get("synthetic") or {})
    synthetic = Path(os.path.expandvars(str(params.pop("root", default_synthetic_root()))))
    if path.resolve().parent == synthetic.resolve() and path.name in ("train", "val"):
        if not (synthetic / ".complete").is_file():
            logger.info("generating the built-in synthetic dataset in %s", synthetic)
        try:
            make_synthetic_imagefolder(synthetic, **params)  # a no-op once complete
        except (OSError, TypeError, ValueError) as e:
            raise ToolError(f"cannot generate the synthetic dataset in {synthetic}: {e}") \
                from None
    return path


def open_folder(cfg, split: str) -> SafeImageFolder:
    try:
        return SafeImageFolder(_data_path(cfg, split))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ToolError(f"dataloader.{split}.data: {e}") from None


def _input_size(model):
    """The model's (H, W): its patch grid times the patch size (the pretrained_cfg may name
    another size when the model was built with ``img_size=...``)."""
    grid, ps = getattr(model, "patch_grid", None), getattr(model, "patch_size", None)
    if grid is not None and isinstance(ps, int):
        return grid[0] * ps, grid[1] * ps
    return tuple(model.pretrained_cfg["input_size"][-2:])


def train_transform(cfg, model):
    pcfg = model.pretrained_cfg
    try:
        return build_train_transform(_input_size(model)[-1], pcfg["mean"], pcfg["std"],
                                     **dict(cfg.dataloader.train.get("augment") or {}))
    except ValueError as e:
        raise ToolError(f"dataloader.train.augment: {e}") from None


def mixup(cfg, num_classes: int):
    try:
        return build_mixup(num_classes, **dict(cfg.dataloader.train.get("mixup") or {}))
    except ValueError as e:
        raise ToolError(f"dataloader.train.mixup: {e}") from None


def build_train_loader(cfg, folder, seed: int, start_iter: int):
    node = cfg.dataloader.train
    try:
        return build_resumable_train_loader(
            range(len(folder)), mapper=SkipUnreadable(folder),
            total_batch_size=int(node.total_batch_size), seed=seed, start_iter=start_iter,
            aspect_ratio_grouping=False, num_workers=int(node.get("num_workers", 2)),
            collate_fn=collate_train_batch)
    except ValueError as e:
        raise ToolError(f"dataloader.train: {e}") from None


def build_test_loader(cfg, model, device):
    folder = open_folder(cfg, "test")
    pcfg = dict(model.pretrained_cfg, input_size=(3,) + tuple(_input_size(model)))
    try:
        folder.transform = eval_transform_from_cfg(pcfg)
    except ValueError as e:
        raise ToolError(f"preprocessing: {e}") from None
    node = cfg.dataloader.test
    indices = list(range(len(folder)))
    if node.get("max_images"):  # an evenly spaced subset, as tools/eval_imagenet.py
        m = min(int(node.max_images), len(indices))
        indices = [i * len(indices) // m for i in range(m)]
    share = Subset(folder, indices[comm.get_rank()::comm.get_world_size()])
    loader = DataLoader(share, batch_size=int(node.get("batch_size", 64)), shuffle=False,
                        num_workers=int(node.get("num_workers", 2)),
                        collate_fn=collate_skip_corrupt, pin_memory=device.type == "cuda")
    return folder, loader


# ------------------------------------------------------------------------------------------
# Model and weights
# ------------------------------------------------------------------------------------------
def build_model(cfg, device):
    model = build(cfg.model, "the model")
    if not hasattr(model, "pretrained_cfg"):
        raise ToolError("the configured model has no pretrained_cfg (build it with "
                        "revvit_d2.create_model)")
    logger.info("model: %s, %d parameters, %d classes", type(model).__name__,
                sum(p.numel() for p in model.parameters()), model.num_classes)
    return model.to(device)


def check_classes(cfg, folder, model):
    n, k = len(folder.classes), int(model.num_classes)
    if n > k:
        raise ToolError(f"{folder.root} has {n} class folders but the model predicts {k} "
                        f"classes (set model.num_classes={n}; from a checkpoint with another "
                        f"head also train.finetune=True)")
    if n < k:
        logger.warning("%s has %d class folders, the model predicts %d classes: folder i is "
                       "class i", folder.root, n, k)


def load_weights(model, path, finetune: bool, allow_unsafe_pickle: bool):
    """`path` into `model`, strictly; with `finetune` the head is new (not loaded) and one
    line says what was loaded."""
    net = getattr(model, "module", model)
    ignore = ("head.",) if finetune else ()
    try:
        report = load_checked(net, os.path.expanduser(str(path)), "the model", load_pretrained,
                              allow_unsafe_pickle=allow_unsafe_pickle, ignore_prefixes=ignore)
    except ValueError as e:  # a plain ViT of another size or fusion (PlainViTMismatch)
        raise ToolError(f"checkpoint {path}: {e}") from None
    if finetune:
        logger.info("fine-tuning from %s: %d tensors loaded, new head for %d classes (%s)",
                    path, len(report["loaded"]), net.num_classes,
                    ", ".join(report["ignored"]) or "no head in the checkpoint")


# ------------------------------------------------------------------------------------------
# Test and training
# ------------------------------------------------------------------------------------------
def do_test(cfg, model, device, final=False):
    net = getattr(model, "module", model)  # no DDP: the processes test different counts
    folder, loader = build_test_loader(cfg, net, device)
    res = evaluate_classifier(net, loader, device, amp_dtype(cfg.train),
                              int(cfg.train.get("log_period", 20)))
    data = cfg.dataloader.test.data
    if res["images"] == 0:
        raise ToolError(f"no image of {data} could be read ({describe_skips(res['skipped'])})")
    if not comm.is_main_process():
        return {}
    skipped = len(res["skipped"])
    why = describe_skips(res["skipped"]).partition(": ")[2]
    logger.info("test on %s: Acc@1 %.3f Acc@5 %.3f over %d images, %d skipped", data,
                res["top1"], res["top5"], res["images"], skipped)
    if final:
        sys.stdout.flush()
        print(f"Evaluated {res['images']} images ({skipped} skipped as unreadable"
              f"{': ' + why if why else ''}) of {data} on {device}")
        print(f"* Acc@1 {res['top1']:.3f} Acc@5 {res['top5']:.3f} images {res['images']} "
              f"skipped {skipped} images/s {res['images_per_s']:.1f}", flush=True)
    return {k: res[k] for k in ("top1", "top5", "images")}


def do_train(args, cfg, device):
    unsafe = bool(cfg.train.allow_unsafe_pickle)
    point = resume_point(cfg.train.output_dir, args.resume, cfg.train.seed, unsafe)
    model = build_model(cfg, device)
    folder = open_folder(cfg, "train")
    check_classes(cfg, folder, model)
    folder.transform = train_transform(cfg, model)
    loader = build_train_loader(cfg, folder, point.seed, point.start_iter)
    total = int(cfg.dataloader.train.total_batch_size)
    ipe = max(1, len(folder) // total)
    max_iter = cfg.train.get("max_iter") or int(round(float(cfg.train.epochs) * ipe))
    logger.info("training data %s: %d images, %d classes, %d per iteration (%d per process), "
                "%d iterations per epoch, %d iterations (%.1f epochs)", folder.root,
                len(folder), len(folder.classes), total, total // comm.get_world_size(), ipe,
                max_iter, max_iter / ipe)
    cfg.optimizer.params.model = model
    optimizer = build(cfg.optimizer, "the optimizer")
    net = ddp(model, device, broadcast_buffers=False)
    loss = ImageClassificationLoss(net, device, mixup(cfg, model.num_classes),
                                   float(cfg.train.get("label_smoothing", 0.0)))
    trainer = build_trainer(loss, loader, optimizer, device, amp_dtype(cfg.train),
                            ClassifierTrainer, ClassifierAMPTrainer,
                            clip_grad_l2norm=cfg.train.get("clip_grad_l2norm"))
    checkpointer = AtomicCheckpointer(net, cfg.train.output_dir, trainer=trainer,
                                      save_to_disk=comm.is_main_process(),
                                      seed=SeedState(point.seed), allow_unsafe_pickle=unsafe)
    trainer.register_hooks(epoch_training_hooks(cfg, point.seed, checkpointer,
                                                lambda: do_test(cfg, net, device), ipe))
    if point.path:  # model, optimizer, grad scaler, iteration
        resume_from_checkpoint(checkpointer, trainer, point)
    elif cfg.train.get("init_checkpoint"):
        load_weights(net, cfg.train.init_checkpoint, bool(cfg.train.finetune), unsafe)
    if comm.is_main_process():  # once the weights are in: a bad checkpoint leaves no file
        trainer.register_hooks([metrics_writer(cfg.train.output_dir,
                                               int(cfg.train.get("log_period", 20)),
                                               [ClassificationMetricPrinter(max_iter, ipe)])])
    train_from(trainer, point.start_iter, max_iter)
    skipped = {}
    for part in comm.gather(loss.skipped):
        for k, v in (part or {}).items():
            skipped.setdefault(k, v)
    if comm.is_main_process():
        why = describe_skips(skipped).partition(": ")[2]
        print(f"Training skipped {len(skipped)} of {len(folder)} images"
              f"{f' ({why})' if why else ''}", flush=True)
    return do_test(cfg, net, device, final=True)


def main(args):
    cfg, _ = load_config(args)
    setup_run(cfg, args, ("revvit_d2", "train_imagenet"))
    set_num_threads(cfg.train)
    device = training_device(cfg.train)
    if args.eval_only:
        model = build_model(cfg, device)
        init = eval_only_weights(cfg.train, args.resume)
        if init:
            load_weights(model, init, False, bool(cfg.train.allow_unsafe_pickle))
        return do_test(cfg, model, device, final=True)
    return do_train(args, cfg, device)


def check_inputs(args):
    """The cheap checks, once, before any process is launched or any file is written. Returns
    ``train.device`` for launch_guarded."""
    if args.num_gpus < 1:
        raise ToolError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    cfg, args.config_file = load_config(args)
    amp_dtype(cfg.train)
    if not args.eval_only:
        open_folder(cfg, "train")
        try:  # the settings alone (any size, any class count): before anything is written
            build_train_transform(224, (0.5,) * 3, (0.5,) * 3,
                                  **dict(cfg.dataloader.train.get("augment") or {}))
        except ValueError as e:
            raise ToolError(f"dataloader.train.augment: {e}") from None
        mixup(cfg, 1000)
    open_folder(cfg, "test")
    check_start_checkpoint(cfg.train.output_dir, cfg.train.get("init_checkpoint"), args.resume)
    return str(cfg.train.get("device", "auto"))


def invoke_main(argv=None) -> int:
    return invoke_tool(build_parser(), main, check_inputs, argv)


if __name__ == "__main__":
    sys.exit(invoke_main())
