#!/usr/bin/env python
"""Train and test reversible video transformers on Kinetics-layout data (LazyConfig).

Example (official Rev-MViT-B 16x4 checkpoint, 5 clips x 1 crop test on Kinetics-400 val; with
no argument at all the tool runs the built-in demo, configs/Kinetics/rev_mvit_test_synthetic.py:
it generates a synthetic motion dataset, trains the tiny Rev-MViT on the CPU and tests it):

    python tools/run_video.py --config-file configs/Kinetics/rev_mvit_b_16x4.py --eval-only train.init_checkpoint=REV_MVIT_B_16x4.pyth

Training: ``--num-gpus N`` processes (one per GPU; with ``train.device=cpu`` or on a machine
without CUDA, N CPU processes with the gloo backend; several machines, torchrun and SLURM:
docs/distributed.md), ``--resume`` continues from
``<train.output_dir>/last_checkpoint`` (model, optimizer, LR schedule position, iteration).
Overrides are ``key=value`` pairs after the options (``train.epochs=10``,
``dataloader.train.data_path=...``). The last line printed starts
with ``* Top-1``; expected errors (missing data, a bad config key, a checkpoint of another model)
print one ``error:`` line on stderr and exit with status 1.

Sharded training: ``train.fsdp.enabled=True`` shards parameters, gradients and optimizer state
over the processes (FSDP2) instead of replicating them (DDP, the default), and saves sharded
checkpoints (directories) that ``--resume`` continues, with any number of processes;
tools/convert_checkpoint.py turns one into a file for ``--eval-only`` (docs/fsdp_training.md).

Checkpoints (``train.init_checkpoint``, ``--resume``) are read as data only: a file whose pickle
needs more is refused; ``train.allow_unsafe_pickle=True`` loads it anyway, which executes code
from the file: only for files you trust (docs/security.md).
"""
import logging
import os
import sys
from pathlib import Path

from revvit_d2.utils.errors import quiet_import_warnings

quiet_import_warnings()  # before detectron2 and pytorchvideo import

from detectron2.utils import comm  # noqa: E402

from revvit_d2.training import (  # noqa: E402
    AtomicCheckpointer,
    SeedState,
    ShardedCheckpointer,
    ToolError,
    add_fsdp_keys,
    add_seed_keys,
    add_unsafe_pickle_key,
    build,
    build_trainer,
    check_start_checkpoint,
    ddp,
    epoch_training_hooks,
    eval_only_weights,
    fsdp_settings,
    invoke_tool,
    is_sharded,
    load_checked,
    load_tool_config,
    metrics_writer,
    resume_from_checkpoint,
    resume_point,
    setup_run,
    shard_for_training,
    tool_parser,
    train_from,
    unsharded_copy,
)
from revvit_d2.training.device import amp_dtype, set_num_threads, training_device  # noqa: E402
from revvit_video.data import (  # noqa: E402
    build_kinetics_test_loader,
    build_kinetics_train_loader,
    format_skip_counts,
    model_num_classes,
    read_video_list,
    skip_counts,
)
from revvit_video.augment import (  # noqa: E402
    build_clip_mixer,
    check_train_augmentation,
    mixup_args,
)
from revvit_video.engine import (  # noqa: E402
    ClipClassificationLoss,
    VideoAMPTrainer,
    VideoMetricPrinter,
    VideoTrainer,
    evaluate_multiview,
)
from revvit_video.hub import load_video_checkpoint  # noqa: E402
from revvit_d2.utils.sharded_checkpoint import (  # noqa: E402
    is_sharded_checkpoint,
    read_sharded_tensors,
)
from revvit_d2.data.synthetic.kinetics import default_synthetic_root, make_synthetic_kinetics  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/Kinetics/rev_mvit_test_synthetic.py"

logger = logging.getLogger("run_video")


def build_parser():
    parser = tool_parser(__doc__, DEFAULT_CONFIG)
    for action in parser._actions:
        if action.dest == "num_gpus":
            action.help = ("processes per machine: one per GPU, or CPU processes (gloo) with "
                           "train.device=cpu or when CUDA is not available")
    return parser


# ------------------------------------------------------------------------------------------
# Config and data checks (run once, before any process is launched)
# ------------------------------------------------------------------------------------------
def _add_keys(cfg):
    add_seed_keys(cfg.train)
    add_unsafe_pickle_key(cfg.train)
    add_fsdp_keys(cfg.train)
    if "mixup" not in cfg.train:
        cfg.train.mixup = None  # Mixup/CutMix off (configs/Kinetics/rev_mvit_b_16x4.py)


def load_config(args):
    return load_tool_config(args.config_file, DEFAULT_CONFIG,
                            ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
                            args.opts, REPO_ROOT, prepare=_add_keys)


def check_recipe(cfg):
    """The optional pieces of the training recipe (train.mixup, dataloader.train.rand_augment /
    random_erasing / num_sample): a value that cannot be used is one error line."""
    try:
        mixup_args(cfg.train.get("mixup"))
        node = cfg.dataloader.get("train")
        if node is not None and node.get("_target_") is build_kinetics_train_loader:
            check_train_augmentation(node.get("rand_augment"), node.get("random_erasing", 0.0),
                                     node.get("num_sample", 1))
    except ValueError as e:
        raise ToolError(str(e)) from None


def prepare_data(cfg, eval_only: bool):
    """Check the configured video lists; generate the built-in synthetic dataset when a list
    is its default location and it does not exist yet."""
    splits = ("test",) if eval_only else ("train", "test")
    synthetic = default_synthetic_root().resolve()
    for split in splits:
        node = cfg.dataloader.get(split)
        if node is None:
            raise ToolError(f"config defines no dataloader.{split}")
        data = node.get("data_path")
        if data is None or str(data).strip() == "":
            raise ToolError(f"dataloader.{split}.data_path is not set (a Kinetics list file with "
                            f"'<path> <label>' lines, or a <root>/<class>/<video> folder)")
        path = Path(os.path.expanduser(os.path.expandvars(str(data))))
        if path.resolve().parent == synthetic and path.name in ("train.csv", "val.csv"):
            if not (synthetic / ".complete").is_file():
                logger.info("generating the built-in synthetic Kinetics-layout dataset in %s",
                            synthetic)
            try:
                make_synthetic_kinetics(synthetic, **dict(cfg.dataloader.get("synthetic") or {}))
            except (OSError, ValueError) as e:
                raise ToolError(f"cannot generate the synthetic dataset in {synthetic}: "
                                f"{e}") from None
        try:
            read_video_list(str(path), node.get("video_path_prefix"))
        except (FileNotFoundError, ValueError) as e:
            raise ToolError(f"dataloader.{split}.data_path: {e}") from None


# ------------------------------------------------------------------------------------------
# Per-process work
# ------------------------------------------------------------------------------------------
def build_model(cfg, device):
    model = build(cfg.model, "the model").to(device)
    logger.info("model: %s, %d parameters", type(model).__name__,
                sum(p.numel() for p in model.parameters()))
    return model


def load_weights(model, path, load_head=True, allow_unsafe_pickle=False):
    """Checkpoint `path` into `model`, strictly; read as data only unless
    `allow_unsafe_pickle` (``train.allow_unsafe_pickle``: executes code from the file)."""
    path = os.path.expanduser(str(path))
    net = getattr(model, "module", model)
    if is_sharded_checkpoint(path):  # --eval-only --resume after a train.fsdp run
        load_video_checkpoint(net, {"model": read_sharded_tensors(path, allow_unsafe_pickle=
                                                                  allow_unsafe_pickle)},
                              load_head=load_head)
        return
    load_checked(net, path, "the model", load_video_checkpoint,
                 allow_unsafe_pickle=allow_unsafe_pickle, load_head=load_head)


def _set_num_classes(node, model):
    """Our loaders skip list lines whose label the model cannot predict: tell them its
    number of classes (unless the config does)."""
    ours = node.get("_target_") in (build_kinetics_train_loader, build_kinetics_test_loader)
    if ours and node.get("num_classes") is None and model_num_classes(model) is not None:
        node.num_classes = model_num_classes(model)


def _gather_skipped(entries):
    """``{entry: reason}`` of every process (first reason met wins) on the main process."""
    merged = {}
    for part in comm.gather(entries):
        for k, v in (part or {}).items():
            merged.setdefault(k, v)
    return merged


def do_test(cfg, model, device, final=False):
    """Multi-view test on dataloader.test; prints the summary on the main process when
    `final`. Returns the results (main process) or {}."""
    _set_num_classes(cfg.dataloader.test, model)
    loader = build(cfg.dataloader.test, "the test data loader")
    net = getattr(model, "module", model)
    if is_sharded(net):
        # The processes test different numbers of clips, and each forward of a sharded model
        # gathers from all of them: test an unsharded copy.
        net = unsharded_copy(net, build_model(cfg, device))
    res = evaluate_multiview(net, loader, device, amp_dtype(cfg.train),  # autocast on CUDA only
                             log_period=int(cfg.train.get("log_period", 20)))
    skipped = _gather_skipped(loader.skipped_entries())  # distinct entries, all processes
    if not comm.is_main_process():
        return {}
    res["skipped"] = len(skipped)
    why = format_skip_counts(skip_counts(skipped))
    data = cfg.dataloader.test.data_path
    if res["videos"] == 0:
        raise ToolError(f"no video of {data} could be used ({res['skipped']} skipped: {why})")
    test = cfg.dataloader.test
    logger.info("test on %s: top-1 %.3f top-5 %.3f over %d videos (%d views), %d skipped, %d "
                "with fewer than %d views", data, res["top1"], res["top5"], res["videos"],
                res["views"], res["skipped"], res["incomplete"], loader.views_per_video)
    if skipped:
        logger.info("test entries skipped (distinct): %s", why)
    if final:
        sys.stdout.flush()
        clips, crops = int(test.num_clips), int(test.num_crops)
        print(f"Evaluated {res['videos']} videos ({res['views']} views: {clips} clip"
              f"{'s' if clips != 1 else ''} x {crops} crop{'s' if crops != 1 else ''} per video, "
              f"softmax averaged) of {data}; {res['skipped']} skipped"
              f"{f' ({why})' if skipped else ''}, {res['incomplete']} with fewer views")
        print(f"* Top-1 {res['top1']:.3f} Top-5 {res['top5']:.3f} videos {res['videos']} "
              f"skipped {res['skipped']} clips/s {res['clips_per_s']:.1f}", flush=True)
    return {k: v for k, v in res.items() if k in ("top1", "top5", "videos", "skipped")}


def build_training(cfg, device, seed: int, init_weights: bool = False):
    """Model (DDP-wrapped, or sharded with ``train.fsdp``), data loader, trainer and
    checkpointer of a run with `seed`, and its length ``(max_iter, iterations per epoch)``.
    `init_weights`: a sharded model gets ``train.init_checkpoint`` here, before sharding."""
    model = build_model(cfg, device)
    sharding = fsdp_settings(cfg.train, amp_dtype(cfg.train))
    if sharding is not None:
        if init_weights and cfg.train.get("init_checkpoint"):
            load_weights(model, cfg.train.init_checkpoint,
                         load_head=not cfg.train.get("init_skip_head", False),
                         allow_unsafe_pickle=bool(cfg.train.allow_unsafe_pickle))
        model = shard_for_training(model, sharding, device)  # before the optimizer is built
    _set_num_classes(cfg.dataloader.train, model)
    train_loader = build(cfg.dataloader.train, "the training data loader")
    try:  # soft targets (train.label_smoothing is then unused); None: off
        mixer = build_clip_mixer(cfg.train.get("mixup"), model_num_classes(model))
    except ValueError as e:
        raise ToolError(str(e)) from None
    if mixer is not None:
        if not hasattr(train_loader, "mix"):
            raise ToolError("train.mixup needs revvit_video's training loader "
                            "(build_kinetics_train_loader)")
        train_loader.mix = mixer
    ipe = train_loader.iters_per_epoch
    max_iter = cfg.train.get("max_iter") or int(round(float(cfg.train.epochs) * ipe))
    logger.info("training data: %d list entries, %d clips per iteration (%d per process, %d "
                "per video), %d iterations per epoch, %d iterations (%.1f epochs)",
                train_loader.num_videos, train_loader.batch_size * comm.get_world_size(),
                train_loader.batch_size, getattr(train_loader, "num_sample", 1), ipe, max_iter,
                max_iter / ipe)
    cfg.optimizer.params.model = model
    optimizer = build(cfg.optimizer, "the optimizer")
    if sharding is None:
        model = ddp(model, device, broadcast_buffers=False)
    loss = ClipClassificationLoss(model, device, cfg.train.get("label_smoothing", 0.0))
    trainer = build_trainer(loss, train_loader, optimizer, device, amp_dtype(cfg.train),
                            VideoTrainer, VideoAMPTrainer,
                            clip_grad_l2norm=cfg.train.get("clip_grad_l2norm"))
    if sharding is None:
        checkpointer = AtomicCheckpointer(
            model, cfg.train.output_dir, trainer=trainer, save_to_disk=comm.is_main_process(),
            seed=SeedState(seed), allow_unsafe_pickle=bool(cfg.train.allow_unsafe_pickle))
    else:
        checkpointer = ShardedCheckpointer(model, optimizer, cfg.train.output_dir,
                                           bool(cfg.train.allow_unsafe_pickle), trainer=trainer,
                                           seed=SeedState(seed))
    return model, trainer, checkpointer, max_iter, ipe


def do_train(args, cfg, device):
    unsafe = bool(cfg.train.allow_unsafe_pickle)
    point = resume_point(cfg.train.output_dir, args.resume, cfg.train.seed, unsafe)
    sharded = fsdp_settings(cfg.train, amp_dtype(cfg.train)) is not None
    model, trainer, checkpointer, max_iter, ipe = build_training(
        cfg, device, point.seed, init_weights=point.path is None)
    trainer.register_hooks(epoch_training_hooks(cfg, point.seed, checkpointer,
                                                lambda: do_test(cfg, model, device), ipe))
    if point.path:  # model, optimizer, grad scaler, iteration, data position
        resume_from_checkpoint(checkpointer, trainer, point)
    elif cfg.train.get("init_checkpoint") and not sharded:  # sharded: in build_training
        load_weights(model, cfg.train.init_checkpoint,
                     load_head=not cfg.train.get("init_skip_head", False),
                     allow_unsafe_pickle=unsafe)
    if comm.is_main_process():  # once the weights are in: a bad checkpoint leaves no file
        trainer.register_hooks([metrics_writer(cfg.train.output_dir,
                                               int(cfg.train.get("log_period", 20)),
                                               [VideoMetricPrinter(max_iter, ipe)])])
    trainer.data_loader.start_iter = point.start_iter
    train_from(trainer, point.start_iter, max_iter)  # no readable video: one error line
    loader = trainer.data_loader
    skipped = _gather_skipped(loader.skipped.entries())  # distinct entries, all processes
    if comm.is_main_process():
        why = f" ({format_skip_counts(skip_counts(skipped))})" if skipped else ""
        print(f"Training skipped {len(skipped)} of {loader.num_videos} list entries{why}",
              flush=True)
    return do_test(cfg, model, device, final=True)


def main(args):
    cfg, _ = load_config(args)
    setup_run(cfg, args, ("revvit_video", "revvit_d2", "run_video"))
    set_num_threads(cfg.train)
    device = training_device(cfg.train)
    if args.eval_only:
        model = build_model(cfg, device)
        init = eval_only_weights(cfg.train, args.resume)
        if init:
            load_weights(model, init, allow_unsafe_pickle=bool(cfg.train.allow_unsafe_pickle))
        return do_test(cfg, model, device, final=True)
    return do_train(args, cfg, device)


def check_inputs(args):
    """The cheap checks, once, before any process is launched or any file is written. Returns
    ``train.device`` for launch_guarded: with ``cpu``, the processes use gloo even where CUDA
    is available."""
    if args.num_gpus < 1:
        raise ToolError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    cfg, args.config_file = load_config(args)
    fsdp_settings(cfg.train, amp_dtype(cfg.train))  # a setting that does not apply: one line, here
    if not args.eval_only:
        check_recipe(cfg)
    prepare_data(cfg, args.eval_only)
    check_start_checkpoint(cfg.train.output_dir, cfg.train.get("init_checkpoint"), args.resume)
    return str(cfg.train.get("device", "auto"))


def invoke_main(argv=None) -> int:
    return invoke_tool(build_parser(), main, check_inputs, argv)


if __name__ == "__main__":
    sys.exit(invoke_main())
