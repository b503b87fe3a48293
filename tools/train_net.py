#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with a reversible backbone from a LazyConfig file.

Shaped like detectron2's tools/lazyconfig_train_net.py (same options: --config-file,
--eval-only, --resume, --num-gpus, --num-machines, key=value overrides). Without --config-file
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

Expected errors (a missing file or dataset, an empty dataset, an unknown config key, a config that
cannot be built, a checkpoint of another model) print one ``error:`` line on stderr and exit with
status 1 before any checkpoint or metrics file is written.
"""
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"detectron2\..*")
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
# default_setup's environment report imports it; "no CUDA runtime" is no news on a CPU machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from detectron2.config import instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import (  # noqa: E402
    CommonMetricPrinter,
    JSONWriter,
    TensorboardXWriter,
)
from detectron2.utils.logger import setup_logger  # noqa: E402

import revvit_d2.d2.data as coco_synthetic  # noqa: E402  (registers the datasets)
from revvit_d2 import CheckpointMismatchError  # noqa: E402
from revvit_d2.cli import ToolError, launch_guarded, load_tool_config  # noqa: E402
from revvit_d2.d2 import RevvitCheckpointer  # noqa: E402
from revvit_d2.d2.checkpoint import (  # noqa: E402
    check_start_checkpoint,
    last_checkpoint_file,
)
from revvit_d2.d2.determinism import (  # noqa: E402
    ReseedHook,
    SeedState,
    add_seed_keys,
    resolve_seed,
    saved_run_state,
    set_deterministic,
)
from revvit_d2.d2.sampler import build_resumable_train_loader  # noqa: E402

logger = logging.getLogger("revvit.train_net")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/COCO/mask_rcnn_revvit_synthetic.py"


def do_test(cfg, model):
    if cfg.dataloader.get("evaluator") is None:
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


def _ddp(cfg, model, **kwargs):
    # detectron2 passes device_ids=[local rank], which DDP refuses for a CPU module (gloo).
    if not cfg.train.device.startswith("cuda"):
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


def _build_trainer(cfg, model, train_loader, optimizer):
    if cfg.train.amp.enabled:
        if cfg.train.device.startswith("cuda"):
            precision = getattr(torch, cfg.train.amp.get("precision", "float16"))
            # The reversible backward restores the forward's autocast state for its
            # recomputation, so AMP is safe with use_rev_backprop=True.
            return AMPTrainer(model, train_loader, optimizer, precision=precision)
        logger.warning("train.amp.enabled is ignored on the CPU (AMPTrainer needs CUDA)")
    return SimpleTrainer(model, train_loader, optimizer)


def _resume_point(cfg, args):
    """(checkpoint to resume from or None, seed of the run, first iteration)."""
    path = last_checkpoint_file(cfg.train.output_dir) if args.resume else None
    saved_seed, saved_iter = None, -1
    if path is not None:
        try:
            saved_seed, saved_iter = saved_run_state(path)
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's to fix
            raise ToolError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
        if saved_iter is None:
            raise ToolError(f"cannot resume from {path}: no 'iteration' in it (not a training "
                            f"checkpoint)")
    return path, resolve_seed(cfg.train.seed, saved_seed), saved_iter + 1


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


def do_train(args, cfg):
    resume_from, seed, start_iter = _resume_point(cfg, args)
    model = build(cfg.model, "the model")
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = build(_resumable(cfg.dataloader.train, seed, start_iter),
                         "the training data loader")

    model = _ddp(cfg, model, **cfg.train.ddp)
    trainer = _build_trainer(cfg, model, train_loader, optimizer)
    checkpointer = RevvitCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                      seed=SeedState(seed))
    trainer.register_hooks([
        ReseedHook(seed),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
    ])
    # Load before the writers open metrics.json: a checkpoint that does not fit leaves no file.
    checkpointer.resume_or_load(resume_from or cfg.train.init_checkpoint,
                                resume=resume_from is not None)
    if resume_from is not None and trainer.iter + 1 != start_iter:
        raise ToolError(f"{resume_from} holds trainer iteration {trainer.iter}, not "
                        f"{start_iter - 1}")
    if comm.is_main_process():
        trainer.register_hooks([hooks.PeriodicWriter(
            _writers(cfg.train.output_dir, cfg.train.max_iter, cfg.train.log_period),
            period=cfg.train.log_period)])
    trainer.train(start_iter, cfg.train.max_iter)
    skipped = coco_synthetic.num_skipped()
    if skipped:
        logger.warning("%d training image(s) could not be read and were skipped", skipped)


def _writers(output_dir, max_iter, log_period):
    # detectron2's default_writers, but each metrics.json line holds the medians over its own
    # log period instead of a fixed 20-iteration window that overlaps the previous lines: the
    # lines a resumed run writes equal those of an uninterrupted run, and log_period=1 records
    # the raw per-iteration losses.
    return [CommonMetricPrinter(max_iter),
            JSONWriter(os.path.join(output_dir, "metrics.json"), window_size=log_period),
            TensorboardXWriter(output_dir)]


def _load_config(args):
    cfg, _ = load_tool_config(args.config_file, str(DEFAULT_CONFIG),
                              ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
                              args.opts, prepare=lambda c: add_seed_keys(c.train))
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
    """The cheap checks, before default_setup writes anything into train.output_dir."""
    try:
        check_start_checkpoint(cfg.train.output_dir, cfg.train.init_checkpoint, args.resume)
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    _register_builtin_datasets(cfg)
    unknown = [n for n in _dataset_names(cfg) if n not in DatasetCatalog.list()]
    if unknown:
        raise ToolError(f"dataset(s) not registered in detectron2's DatasetCatalog: "
                        f"{', '.join(unknown)}")


def main(args):
    cfg = _load_config(args)
    _select_device(cfg)
    _check_inputs(cfg, args)
    default_setup(cfg, args)
    for name in ("revvit", "revvit_d2"):  # this tool's and the checkpoint loader's reports
        setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name=name)
    set_deterministic(bool(cfg.train.deterministic))
    if args.eval_only:
        model = build(cfg.model, "the model")
        model.to(cfg.train.device)
        model = _ddp(cfg, model)
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


def invoke_main() -> int:
    args = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1]).parse_args()
    return launch_guarded(main, args,
                          expected=(ToolError, FileNotFoundError, CheckpointMismatchError))


if __name__ == "__main__":
    sys.exit(invoke_main())
