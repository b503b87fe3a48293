"""The run pieces the classification tools share (revvit_d2.training.engine, .device), in
process: which weights --eval-only tests, the hooks an epoch-based run gets from its config,
and a resumed run that has nothing left to train. The tools end to end: test_train_imagenet.py,
test_video.py."""
import logging

import torch
from detectron2.checkpoint import Checkpointer
from detectron2.config import LazyCall as L
from detectron2.engine import hooks
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf

from revvit_d2.training import epoch_training_hooks, eval_only_weights, train_from
from revvit_d2.training.device import set_num_threads


def _train_cfg(out, **keys):
    return OmegaConf.create({"output_dir": str(out), "init_checkpoint": "", **keys})


def test_eval_only_weights(tmp_path, caplog):
    (tmp_path / "model_0000009.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    init = str(tmp_path / "pretrained.pth")
    assert eval_only_weights(_train_cfg(tmp_path, init_checkpoint=init), False) == init
    assert eval_only_weights(_train_cfg(tmp_path, init_checkpoint=init), True) == str(
        tmp_path / "model_0000009.pth")  # --resume: the run's last checkpoint first
    assert eval_only_weights(_train_cfg(tmp_path / "new", init_checkpoint=init), True) == init
    with caplog.at_level(logging.WARNING, logger="revvit_d2.training.engine"):
        assert eval_only_weights(_train_cfg(tmp_path / "new"), True) is None
    assert "testing randomly initialised weights" in caplog.text


def _cfg(tmp_path, **train):
    return OmegaConf.create({
        "train": _train_cfg(tmp_path, **train),
        "lr_multiplier": L(WarmupParamScheduler)(
            scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
            warmup_length=0.1, warmup_factor=0.01),
    })


def test_epoch_training_hooks_read_the_train_section(tmp_path):
    checkpointer = Checkpointer(torch.nn.Linear(1, 1), str(tmp_path))

    def periods(cfg):
        found = {type(h).__name__: h for h in epoch_training_hooks(cfg, 5, checkpointer,
                                                                   lambda: {}, 31) if h}
        return found["PeriodicCheckpointer"].period, found["PeriodicCheckpointer"].max_to_keep, \
            found["EvalHook"]._period, found["EvalHook"]._eval_after_train

    # defaults: a checkpoint per epoch, every one kept, no test during training
    assert periods(_cfg(tmp_path)) == (31, None, 0, False)
    cfg = _cfg(tmp_path, eval_period=62, checkpointer=dict(period=93, max_to_keep=2))
    assert periods(cfg) == (93, 2, 62, False)
    first = epoch_training_hooks(cfg, 5, checkpointer, lambda: {}, 31)
    assert type(first[0]).__name__ == "ReseedHook" and isinstance(first[2], hooks.LRScheduler)


def test_train_from_a_finished_checkpoint_trains_nothing(caplog):
    calls = []

    class Trainer:
        def train(self, start, end):
            calls.append((start, end))

    with caplog.at_level(logging.INFO, logger="revvit_d2.training.engine"):
        train_from(Trainer(), 40, 40)
    assert calls == [] and "checkpoint is at iteration 40 >= max_iter 40" in caplog.text
    train_from(Trainer(), 10, 40)
    assert calls == [(10, 40)]


def test_set_num_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        set_num_threads(_train_cfg(tmp_path))  # unset: torch's default stays
        assert torch.get_num_threads() == before
        set_num_threads(_train_cfg(tmp_path, num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
