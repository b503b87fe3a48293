"""The parts of a training run that the training tools assemble the same way on detectron2's
engine: per-process setup, the DDP wrapper, the hooks in their order, the metric writers, and
(for the epoch-based classification tools, ``tools/train_imagenet.py`` and
``tools/run_video.py``) their hooks, their training call and the weights ``--eval-only`` tests."""
import logging
import os
from typing import Callable, Iterable, List, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, JSONWriter
from detectron2.utils.logger import setup_logger

from ..utils.errors import UserError
from ..utils.seeding import set_deterministic
from .checkpoint import last_checkpoint_file
from .cli import build
from .seeding import ReseedHook

__all__ = ["build_trainer", "ddp", "epoch_training_hooks", "eval_only_weights", "metrics_writer",
           "setup_run", "train_from", "training_hooks"]

logger = logging.getLogger(__name__)


def setup_run(cfg, args, logger_names: Iterable[str]) -> None:
    """detectron2's ``default_setup`` (output folder, ``config.yaml``, ``log.txt``, environment
    report), our loggers into the same ``log.txt``, and deterministic kernels when
    ``train.deterministic``."""
    default_setup(cfg, args)
    for name in logger_names:
        setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name=name)
    set_deterministic(bool(cfg.train.deterministic))


def ddp(model: torch.nn.Module, device, **kwargs):
    """detectron2's ``create_ddp_model``; on a CPU (gloo) it passes no ``device_ids``, which
    DDP refuses for a CPU module (detectron2 passes the local rank)."""
    if torch.device(device).type != "cuda":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def build_trainer(model, data_loader, optimizer, device, precision: Optional[torch.dtype] = None,
                  trainer=SimpleTrainer, amp_trainer=AMPTrainer, **kwargs):
    """detectron2's ``AMPTrainer`` (`amp_trainer`) when `precision` (``torch.float16`` or
    ``torch.bfloat16``) is set and `device` is CUDA, else ``SimpleTrainer`` (`trainer`);
    `kwargs` go to the trainer. The reversible backward restores the forward's autocast state
    for its recomputation, so AMP is safe with ``use_rev_backprop=True``. The gradient scaler
    is enabled for float16 only (bfloat16 has float32's exponent range)."""
    if precision is not None:
        if torch.device(device).type == "cuda":
            scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
            return amp_trainer(model, data_loader, optimizer, precision=precision,
                               grad_scaler=scaler, **kwargs)
        logger.warning("mixed precision is ignored on %s (autocast is used on CUDA only)", device)
    return trainer(model, data_loader, optimizer, **kwargs)


def training_hooks(seed: int, scheduler, checkpointer, eval_period: int = 0,
                   eval_fn: Optional[Callable] = None, eval_after_train: bool = True,
                   **periodic_checkpointer) -> List:
    """detectron2's hooks of ``lazyconfig_train_net.py`` (timer, LR schedule, periodic
    checkpoints with `periodic_checkpointer` arguments such as ``period`` and ``max_to_keep``,
    on the main process, or on every process for a checkpointer whose
    ``saves_on_all_processes`` is True (sharded checkpoints), evaluation) behind
    :class:`ReseedHook`, which must run first. Register
    the writers (:func:`metrics_writer`) only after the weights are loaded, so that a
    checkpoint that does not fit leaves no ``metrics.json``."""
    return [
        ReseedHook(seed),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=scheduler),
        hooks.PeriodicCheckpointer(checkpointer, **periodic_checkpointer)
        if comm.is_main_process() or getattr(checkpointer, "saves_on_all_processes", False)
        else None,
        hooks.EvalHook(eval_period, eval_fn, eval_after_train=eval_after_train)
        if eval_fn is not None else None,
    ]


def metrics_writer(output_dir: str, log_period: int, printers: Iterable[EventWriter]):
    """A ``PeriodicWriter`` hook for the main process: the `printers` and ``metrics.json``.

    Unlike detectron2's ``default_writers``, each ``metrics.json`` line holds the medians over
    its own log period instead of a fixed 20-iteration window that overlaps the previous lines:
    the lines a resumed run writes equal those of an uninterrupted run, and ``log_period=1``
    records the raw per-iteration losses."""
    writers = list(printers) + [JSONWriter(os.path.join(output_dir, "metrics.json"),
                                           window_size=log_period)]
    return hooks.PeriodicWriter(writers, period=log_period)


def epoch_training_hooks(cfg, seed: int, checkpointer, test: Callable,
                         iters_per_epoch: int) -> List:
    """:func:`training_hooks` as the classification tools configure them: the schedule
    ``cfg.lr_multiplier``, a checkpoint every ``train.checkpointer.period`` iterations (default:
    one epoch) keeping ``train.checkpointer.max_to_keep``, `test` every ``train.eval_period``
    iterations (0 or unset: never; the tools test once more after training themselves)."""
    ckpt_cfg = cfg.train.get("checkpointer") or {}
    return training_hooks(
        seed, build(cfg.lr_multiplier, "the LR schedule"), checkpointer,
        int(cfg.train.get("eval_period") or 0), test, eval_after_train=False,
        period=int(ckpt_cfg.get("period") or iters_per_epoch),
        max_to_keep=ckpt_cfg.get("max_to_keep"))


def _no_traceback_for_expected(record: logging.LogRecord) -> bool:
    """detectron2's trainer logs every exception with its traceback before re-raising it; an
    expected one (a :class:`UserError`, e.g. no usable image or video in a whole pass) reaches
    the user as the tool's one error line instead."""
    return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def train_from(trainer, start_iter: int, max_iter: int) -> None:
    """``trainer.train(start_iter, max_iter)``, or a logged line when a resumed checkpoint is
    already at `max_iter` (the tool goes on to its final test). A :class:`UserError` raised in
    the loop propagates without detectron2's logged traceback."""
    logging.getLogger("detectron2.engine.train_loop").addFilter(_no_traceback_for_expected)
    if start_iter < max_iter:
        trainer.train(start_iter, max_iter)
    else:
        logger.info("checkpoint is at iteration %d >= max_iter %d: nothing to train",
                    start_iter, max_iter)


def eval_only_weights(train_cfg, resume: bool) -> Optional[str]:
    """The checkpoint ``--eval-only`` tests: with ``--resume`` the output directory's last one
    (``train.init_checkpoint`` when there is none), else ``train.init_checkpoint``; None, with a
    warning, when neither is set (randomly initialised weights)."""
    init = train_cfg.get("init_checkpoint")
    if resume:
        init = last_checkpoint_file(train_cfg.output_dir) or init
    if not init:
        logger.warning("no checkpoint (train.init_checkpoint is not set): testing randomly "
                       "initialised weights, accuracy will be at chance level")
    return init or None
