#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with a reversible backbone from a LazyConfig file.

Shaped like detectron2's tools/lazyconfig_train_net.py (same options: --config-file,
--eval-only, --resume, --num-gpus, --num-machines, key=value overrides). ``--num-gpus N``
starts N processes: one per GPU (NCCL) when ``train.device`` is CUDA, N CPU processes (gloo)
when it is ``cpu``, as in the demo config, on any machine. Several machines (``--num-machines``,
``--machine-rank``, ``--dist-url``, ``--dist-timeout``), torchrun and SLURM (``--launcher``):
docs/distributed.md. Without --config-file
it runs the built-in demo, configs/COCO/mask_rcnn_revvit_synthetic.py: a small Rev-ViT Mask R-CNN
trained on a generated COCO-format shapes dataset, then COCO box and mask AP.

Example (8 GPUs, official ImageNet checkpoint converted on the fly):

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_revvit_b_100ep.py \
        --num-gpus 8 train.init_checkpoint=REV_VIT_B.pyth

Resume: ``--resume`` continues from ``<train.output_dir>/last_checkpoint`` with the same data
order, augmentations and drop-path masks as an uninterrupted run (the losses of the following
iterations are bit-identical on the CPU; see docs/reliability.md). ``train.seed`` (default -1:
a random seed, saved in the checkpoints) seeds everything; ``train.deterministic=True`` also
selects deterministic CUDA kernels. ``dataloader.evaluator=null`` skips the final evaluation.

Sharded training: ``train.fsdp.enabled=True`` shards parameters, gradients and optimizer state
over the processes (FSDP2) instead of replicating them (DDP, the default), and saves sharded
checkpoints (directories) that ``--resume`` continues, with any number of processes;
tools/convert_checkpoint.py turns one into a file for ``--eval-only`` (docs/fsdp_training.md).

Checkpoints (``train.init_checkpoint``, ``--resume``) are read as data only: a file whose pickle
needs more is refused; ``train.allow_unsafe_pickle=True`` loads it anyway, which executes code
from the file: only for files you trust (docs/security.md).

Expected errors (a missing file or dataset, an empty dataset, an unknown config key, a config that
cannot be built, a checkpoint of another model) print one ``error:`` line on stderr and exit with
status 1 before any checkpoint or metrics file is written.
"""
import logging
import sys
from pathlib import Path

from revvit_d2.utils.errors import UserError, quiet_import_warnings

quiet_import_warnings()  # before detectron2 imports

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_train_loader  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter  # noqa: E402

import revvit_d2.d2.data as d2_data  # noqa: E402  (registers the datasets)
from revvit_d2 import CheckpointMismatchError  # noqa: E402
from revvit_d2.d2 import RevvitCheckpointer  # noqa: E402
from revvit_d2.d2.sampler import build_resumable_train_loader  # noqa: E402
from revvit_d2.training import (  # noqa: E402
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
    fsdp_settings,
    launch_guarded,
    load_tool_config,
    metrics_writer,
    resume_from_checkpoint,
    resume_point,
    setup_run,
    shard_for_training,
    tool_parser,
    train_from,
    training_hooks,
    unsharded_copy,
)

logger = logging.getLogger("revvit.train_net")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/COCO/mask_rcnn_revvit_synthetic.py"


def do_test(cfg, model):
    if cfg.dataloader.get("evaluator") is None:
        return {}
    loader = build(cfg.dataloader.test, "the test data loader")
    results = inference_on_dataset(model, loader,
                                   build(cfg.dataloader.evaluator, "the evaluator"))
    summary = d2_data.skip_summary(is_train=False, what="test image(s)")
    if summary:  # while the loader (and its mapper's count) is alive
        logger.warning("%s; each was replaced by another image, so the AP is approximate",
                       summary)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _resumable(loader_cfg, seed: int, start_iter: int):
    """Swap detectron2's train loader for the resumable one (same arguments, plus the seed and
    the first iteration), unless the config chose its own sampler or loader."""
    if loader_cfg.get("_target_") is build_detection_train_loader and \
            loader_cfg.get("sampler") is None:
        loader_cfg._target_ = build_resumable_train_loader
        loader_cfg.pop("sampler", None)
        loader_cfg.seed, loader_cfg.start_iter = seed, start_iter
    else:
        logger.warning("dataloader.train is not detectron2's build_detection_train_loader without "
                       "a sampler: --resume restarts its data order")
    return loader_cfg


def _amp_dtype(cfg):
    amp = cfg.train.amp
    return getattr(torch, amp.get("precision", "float16")) if amp.enabled else None


def _unsharded_for_test(cfg, sharded):
    """The weights of the sharded model in an unsharded one: the processes test different
    numbers of images, and each forward of a sharded model gathers from all of them."""
    fresh = build(cfg.model, "the model").to(cfg.train.device)
    return unsharded_copy(sharded, fresh)


def do_train(args, cfg):
    unsafe = bool(cfg.train.allow_unsafe_pickle)
    point = resume_point(cfg.train.output_dir, args.resume, cfg.train.seed, unsafe)
    model = build(cfg.model, "the model")
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    sharding = fsdp_settings(cfg.train, _amp_dtype(cfg))
    if sharding is not None:
        # train.fsdp: the initial weights go in whole, before sharding; the optimizer is built
        # after it (it must hold the sharded parameters).
        if point.path is None:
            RevvitCheckpointer(model, allow_unsafe_pickle=unsafe).load(
                cfg.train.init_checkpoint, checkpointables=[])
        model = shard_for_training(model, sharding, cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = build(cfg.optimizer, "the optimizer")
    train_loader = build(_resumable(cfg.dataloader.train, point.seed, point.start_iter),
                         "the training data loader")

    if sharding is None:
        model = ddp(model, cfg.train.device, **cfg.train.ddp)
    trainer = build_trainer(model, train_loader, optimizer, cfg.train.device, _amp_dtype(cfg))
    if sharding is None:
        checkpointer = RevvitCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                          seed=SeedState(point.seed), allow_unsafe_pickle=unsafe)
    else:
        checkpointer = ShardedCheckpointer(model, optimizer, cfg.train.output_dir, unsafe,
                                           trainer=trainer, seed=SeedState(point.seed))
    trainer.register_hooks(training_hooks(
        point.seed, build(cfg.lr_multiplier, "the LR schedule"), checkpointer,
        eval_period=cfg.train.eval_period,
        eval_fn=lambda: do_test(cfg, model if sharding is None
                                else _unsharded_for_test(cfg, model)),
        **cfg.train.checkpointer))
    # Load before the writers open metrics.json: a checkpoint that does not fit leaves no file.
    if point.path is not None:
        resume_from_checkpoint(checkpointer, trainer, point)
    elif sharding is None:
        checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
    if comm.is_main_process():
        trainer.register_hooks([metrics_writer(
            cfg.train.output_dir, cfg.train.log_period,
            [CommonMetricPrinter(cfg.train.max_iter), TensorboardXWriter(cfg.train.output_dir)])])
    train_from(trainer, point.start_iter, cfg.train.max_iter)
    # Distinct files over all loader workers, per reason; e.g. "3 training image(s) were
    # skipped: 2 unreadable, 1 size differs from the annotation".
    summary = d2_data.skip_summary(is_train=True, what="training image(s)")
    if summary:
        logger.warning("%s", summary)


def _dataset_names(cfg):
    names = []
    for split in ("train", "test"):
        node = cfg.dataloader.get(split, {})
        dataset = node.get("dataset", {}) if hasattr(node, "get") else {}
        found = dataset.get("names", []) if hasattr(dataset, "get") else []
        names += [found] if isinstance(found, str) else list(found)
    return names


def check_inputs(cfg, args):
    """The cheap checks, before default_setup writes anything into train.output_dir."""
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.train.device = "cpu"
    check_start_checkpoint(cfg.train.output_dir, cfg.train.init_checkpoint, args.resume)
    if fsdp_settings(cfg.train, _amp_dtype(cfg)) is not None and args.eval_only:
        logger.info("train.fsdp does not apply to --eval-only: the model is tested unsharded")
    # The synthetic set is generated on first use (a few seconds), only if the config uses it.
    if set(_dataset_names(cfg)) & set(d2_data.DEFAULT_NAMES):
        d2_data.register_synthetic_coco()
    unknown = [n for n in _dataset_names(cfg) if n not in DatasetCatalog.list()]
    if unknown:
        raise ToolError(f"dataset(s) not registered in detectron2's DatasetCatalog: "
                        f"{', '.join(unknown)}")


def _add_keys(cfg):
    add_seed_keys(cfg.train)
    add_unsafe_pickle_key(cfg.train)
    add_fsdp_keys(cfg.train)


def load_config(args):
    cfg, _ = load_tool_config(args.config_file, str(DEFAULT_CONFIG),
                              ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
                              args.opts, prepare=_add_keys)
    return cfg


def launch_device(args):
    """Before several processes are launched: the config's ``train.device``, so that CPU
    processes use gloo even where CUDA is available (launch_guarded). One process loads the
    config only once, in ``main``."""
    if args.num_gpus * args.num_machines <= 1:
        return None
    return str(load_config(args).train.device)


def main(args):
    cfg = load_config(args)
    check_inputs(cfg, args)
    setup_run(cfg, args, ("revvit", "revvit_d2"))  # this tool's and the loaders' reports
    if args.eval_only:
        model = build(cfg.model, "the model")
        model.to(cfg.train.device)
        model = ddp(model, cfg.train.device)
        RevvitCheckpointer(model, allow_unsafe_pickle=bool(cfg.train.allow_unsafe_pickle)).load(
            cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)  # the EvalHook evaluates after the last iteration


def invoke_main() -> int:
    args = tool_parser(__doc__, str(DEFAULT_CONFIG)).parse_args()
    return launch_guarded(main, args, check=launch_device,
                          expected=(UserError, FileNotFoundError, CheckpointMismatchError))


if __name__ == "__main__":
    sys.exit(invoke_main())
