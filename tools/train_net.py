#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with a reversible backbone from a LazyConfig file.

Shaped like detectron2's tools/lazyconfig_train_net.py (same options: --config-file,
--eval-only, --resume, --num-gpus, --num-machines, key=value overrides). Without --config-file
it runs the built-in demo, configs/COCO/mask_rcnn_revvit_synthetic.py: a small Rev-ViT Mask R-CNN
trained on a generated COCO-format shapes dataset, then COCO box and mask AP.

Example (8 GPUs, official ImageNet checkpoint converted on the fly):

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_revvit_b_100ep.py \
        --num-gpus 8 train.init_checkpoint=REV_VIT_B.pyth

Expected errors (a missing file or dataset, an unknown config key, a config that cannot be built,
a checkpoint of another model) print one ``error:`` line on stderr and exit with status 1.
"""
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"detectron2\..*")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import revvit_d2.data.coco_synthetic as coco_synthetic  # noqa: E402  (registers the datasets)
from revvit_d2.d2 import RevvitCheckpointer  # noqa: E402

logger = logging.getLogger("revvit.train_net")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/COCO/mask_rcnn_revvit_synthetic.py"


class ToolError(Exception):
    """An expected failure, reported as one line on stderr."""


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, build(cfg.dataloader.test, "the test data loader"),
        build(cfg.dataloader.evaluator, "the evaluator"))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _select_device(cfg):
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.train.device = "cpu"


def _build_trainer(cfg, model, train_loader, optimizer):
    if cfg.train.amp.enabled:
        if cfg.train.device.startswith("cuda"):
            precision = getattr(torch, cfg.train.amp.get("precision", "float16"))
            # The reversible backward restores the forward's autocast state for its
            # recomputation, so AMP is safe with use_rev_backprop=True.
            return AMPTrainer(model, train_loader, optimizer, precision=precision)
        logger.warning("train.amp.enabled is ignored on the CPU (AMPTrainer needs CUDA)")
    return SimpleTrainer(model, train_loader, optimizer)


def do_train(args, cfg):
    model = build(cfg.model, "the model")
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = build(cfg.dataloader.train, "the training data loader")

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = _build_trainer(cfg, model, train_loader, optimizer)
    checkpointer = RevvitCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    skipped = coco_synthetic.num_skipped()
    if skipped:
        logger.warning("%d training image(s) could not be read and were skipped", skipped)


def _load_config(args):
    path = args.config_file or str(DEFAULT_CONFIG)
    if not os.path.isfile(path):
        raise ToolError(f"config file not found: {path}")
    cfg = LazyConfig.load(path)
    try:
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
    except (KeyError, AttributeError, ValueError) as e:
        raise ToolError(f"bad override {args.opts}: {e}") from None
    return cfg


def _dataset_names(cfg):
    names = []
    for split in ("train", "test"):
        node = cfg.dataloader.get(split, {})
        dataset = node.get("dataset", {}) if hasattr(node, "get") else {}
        found = dataset.get("names", []) if hasattr(dataset, "get") else []
        names += [found] if isinstance(found, str) else list(found)
    return names


def _register_builtin_datasets(cfg):
    # The synthetic set is generated on first use (a few seconds), only if the config uses it.
    if set(_dataset_names(cfg)) & set(coco_synthetic.DEFAULT_NAMES):
        coco_synthetic.register_synthetic_coco()


def _check_inputs(cfg, args):
    ckpt = cfg.train.init_checkpoint
    if ckpt and "://" not in ckpt and not os.path.isfile(ckpt) and not (
            args.resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint"))):
        raise ToolError(f"train.init_checkpoint not found: {ckpt}")


def main(args):
    cfg = _load_config(args)
    _select_device(cfg)
    _check_inputs(cfg, args)
    default_setup(cfg, args)
    _register_builtin_datasets(cfg)
    if args.eval_only:
        model = build(cfg.model, "the model")
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        RevvitCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)  # the EvalHook evaluates after the last iteration


def build(cfg_node, what: str):
    """instantiate() with a one-line error for a config that cannot be built."""
    try:
        return instantiate(cfg_node)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ToolError(f"cannot build {what}: {type(e).__name__}: {first}") from e


def _expected_error(e: BaseException) -> bool:
    from revvit_d2 import CheckpointMismatchError

    return isinstance(e, (ToolError, FileNotFoundError, CheckpointMismatchError))


def invoke_main() -> int:
    args = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1]).parse_args()
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except Exception as e:  # noqa: BLE001 - turned into one line for the expected kinds
        if not _expected_error(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, ToolError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(invoke_main())
