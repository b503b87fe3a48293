"""Training scaffolding on detectron2's engine that the training tools share
(``tools/train_net.py``, ``tools/run_video.py``, ``tools/train_imagenet.py``; layer 2.5 of
docs/architecture.md).

* :mod:`.cli`: the parser, config loading, one-line errors through detectron2's ``launch``;
* :mod:`.lazyconfig`: LazyConfig loading with strict ``key=value`` overrides;
* :mod:`.checkpoint`: atomic checkpointers, the one "read a checkpoint and check it strictly"
  step, the resume point;
* :mod:`.seeding`: the seed hooks that make a resumed run repeat the uninterrupted one;
* :mod:`.engine`: per-process setup, DDP, the hooks in their order, the metric writers; the
  classification tools' hooks, training call and ``--eval-only`` weights;
* :mod:`.fsdp`: ``train.fsdp``: FSDP2 instead of DDP, sharded (DCP) checkpoints;
* :mod:`.device`: ``train.device``, ``train.amp`` and ``train.num_threads`` of the
  classification and video tools;
* :mod:`.classification`: the classifier's loss step (timm's Mixup and soft-target loss), the
  trainer with gradient clipping, the progress line, top-1 / top-5 evaluation.

Imports detectron2; never ``revvit_d2.d2`` or ``revvit_video``.
"""
from .checkpoint import (AtomicCheckpointer, AtomicSaveMixin, ResumePoint, SafeLoadMixin,
                         add_unsafe_pickle_key, check_start_checkpoint, last_checkpoint_file,
                         load_checked, read_checked, resume_from_checkpoint, resume_point)
from .cli import (EXIT_ERROR, ToolError, build, invoke_tool, launch_guarded, load_tool_config,
                  tool_parser)
from .engine import (build_trainer, ddp, epoch_training_hooks, eval_only_weights, metrics_writer,
                     setup_run, train_from, training_hooks)
from .fsdp import (FSDP_DEFAULTS, ShardedCheckpointer, add_fsdp_keys, fsdp_settings,
                   is_sharded, shard_for_training, unsharded_copy)
from .lazyconfig import ConfigError, apply_overrides_strict, load_lazy_config
from .seeding import ReseedHook, SeedState, add_seed_keys, resolve_seed

__all__ = [
    "AtomicCheckpointer", "AtomicSaveMixin", "ConfigError", "EXIT_ERROR", "FSDP_DEFAULTS",
    "ReseedHook", "ResumePoint", "SafeLoadMixin", "SeedState", "ShardedCheckpointer",
    "ToolError", "add_fsdp_keys", "add_seed_keys",
    "add_unsafe_pickle_key", "apply_overrides_strict", "build",
    "build_trainer",
    "check_start_checkpoint", "ddp", "epoch_training_hooks", "eval_only_weights",
    "fsdp_settings", "invoke_tool", "is_sharded",
    "last_checkpoint_file", "launch_guarded", "load_checked",
    "load_lazy_config", "load_tool_config", "metrics_writer", "read_checked", "resolve_seed",
    "resume_from_checkpoint", "resume_point", "setup_run", "shard_for_training", "tool_parser",
    "train_from", "training_hooks", "unsharded_copy",
]
