#!/usr/bin/env python
"""Train and test reversible video transformers on Kinetics-layout data (LazyConfig).

Example (official Rev-MViT-B 16x4 checkpoint, 5 clips x 1 crop test on Kinetics-400 val; with
no argument at all the tool runs the built-in demo, configs/Kinetics/rev_mvit_test_synthetic.py:
it generates a synthetic motion dataset, trains the tiny Rev-MViT on the CPU and tests it):

    python tools/run_video.py --config-file configs/Kinetics/rev_mvit_b_16x4.py --eval-only train.init_checkpoint=REV_MVIT_B_16x4.pyth

Training: ``--num-gpus N`` processes (one per GPU; on a machine without CUDA, N CPU processes
with the gloo backend), ``--resume`` continues from ``<train.output_dir>/last_checkpoint``
(model, optimizer, LR schedule position, iteration). Overrides are ``key=value`` pairs after the
options (``train.epochs=10``, ``dataloader.train.data_path=...``). The last line printed starts
with ``* Top-1``; expected errors (missing data, a bad config key, a checkpoint of another model)
print one ``error:`` line on stderr and exit with status 1.
"""
import logging
import os
import sys
from pathlib import Path

from revvit_d2.cli import (
    EXIT_ERROR,
    ToolError,
    launch_guarded,
    load_tool_config,
    print_error,
    quiet_import_warnings,
    tool_parser,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/Kinetics/rev_mvit_test_synthetic.py"

logger = logging.getLogger("run_video")


def build_parser():
    parser = tool_parser(__doc__, DEFAULT_CONFIG)
    for action in parser._actions:
        if action.dest == "num_gpus":
            action.help = ("processes per machine: one per GPU, or CPU processes (gloo) when "
                           "CUDA is not available")
    return parser


# ------------------------------------------------------------------------------------------
# Config and data checks (run once, before any process is launched)
# ------------------------------------------------------------------------------------------
def load_config(args):
    from revvit_d2.d2.determinism import add_seed_keys

    return load_tool_config(args.config_file, DEFAULT_CONFIG,
                            ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
                            args.opts, REPO_ROOT, prepare=lambda cfg: add_seed_keys(cfg.train))


def prepare_data(cfg, eval_only: bool):
    """Check the configured video lists; generate the built-in synthetic dataset when a list
    is its default location and it does not exist yet."""
    from revvit_video.data import read_video_list
    from revvit_d2.data.synthetic.kinetics import default_synthetic_root, make_synthetic_kinetics

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
def setup(args):
    from detectron2.engine import default_setup
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    import torch

    from revvit_d2.d2.determinism import set_deterministic

    cfg, _ = load_config(args)
    default_setup(cfg, args)
    set_deterministic(bool(cfg.train.deterministic))
    threads = cfg.train.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    output_dir = cfg.train.get("output_dir")
    for name in ("revvit_video", "revvit_d2", "run_video"):
        setup_logger(output_dir, distributed_rank=comm.get_rank(), name=name)
    return cfg


def get_device(cfg):
    import torch

    want = str(cfg.train.get("device", "auto"))
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ToolError("train.device is 'cuda' but CUDA is not available")
    if want == "cuda":
        from detectron2.utils import comm

        return torch.device("cuda", comm.get_local_rank())
    return torch.device(want)


def amp_dtype(cfg, device):
    import torch

    amp = cfg.train.get("amp") or {}
    if not amp.get("enabled", False):
        return None
    if device.type != "cuda":
        logger.info("train.amp.enabled is ignored on %s (autocast is used on CUDA only)", device)
        return None
    name = str(amp.get("dtype", "float16"))
    if name not in ("float16", "bfloat16"):
        raise ToolError(f"train.amp.dtype must be float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def build_model(cfg, device):
    from detectron2.config import instantiate

    inst_logger = logging.getLogger("detectron2.config.instantiate")
    level = inst_logger.level
    inst_logger.setLevel(logging.CRITICAL)  # its "Error when instantiating" repeats ours
    try:
        model = instantiate(cfg.model)
    except (KeyError, TypeError, ValueError) as e:
        raise ToolError(f"cannot build the model: {e}") from None
    finally:
        inst_logger.setLevel(level)
    return model.to(device)


def load_weights(model, path, load_head=True):
    from revvit_d2 import CheckpointMismatchError
    from revvit_video.hub import load_video_checkpoint

    try:
        report = load_video_checkpoint(model, os.path.expanduser(str(path)), load_head=load_head)
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    except (CheckpointMismatchError, KeyError) as e:
        raise ToolError(f"checkpoint {path} does not fit the model: {e}") from None
    logger.info("loaded weights from %s (%d trunk tensors, head %s)", path,
                len(report["loaded"]), "loaded" if report["head"] else "not loaded")


def build_test_loader(cfg):
    from detectron2.config import instantiate

    try:
        return instantiate(cfg.dataloader.test)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ToolError(f"dataloader.test: {e}") from None


def do_test(cfg, model, device, final=False):
    """Multi-view test on dataloader.test; prints the summary on the main process when
    `final`. Returns the results (main process) or {}."""
    from detectron2.utils import comm
    from revvit_video.engine import evaluate_multiview

    loader = build_test_loader(cfg)
    net = getattr(model, "module", model)
    res = evaluate_multiview(net, loader, device, amp_dtype(cfg, device),
                             log_period=int(cfg.train.get("log_period", 20)))
    if not comm.is_main_process():
        return {}
    data = cfg.dataloader.test.data_path
    if res["videos"] == 0:
        raise ToolError(f"no video of {data} could be read ({res['skipped']} skipped)")
    test = cfg.dataloader.test
    logger.info("test on %s: top-1 %.3f top-5 %.3f over %d videos (%d views), %d skipped, %d "
                "with fewer than %d views", data, res["top1"], res["top5"], res["videos"],
                res["views"], res["skipped"], res["incomplete"], loader.views_per_video)
    if final:
        sys.stdout.flush()
        clips, crops = int(test.num_clips), int(test.num_crops)
        print(f"Evaluated {res['videos']} videos ({res['views']} views: {clips} clip"
              f"{'s' if clips != 1 else ''} x {crops} crop{'s' if crops != 1 else ''} per video, "
              f"softmax averaged) of {data}; {res['skipped']} skipped as unreadable, "
              f"{res['incomplete']} with fewer views")
        print(f"* Top-1 {res['top1']:.3f} Top-5 {res['top5']:.3f} videos {res['videos']} "
              f"skipped {res['skipped']} clips/s {res['clips_per_s']:.1f}", flush=True)
    return {k: v for k, v in res.items() if k in ("top1", "top5", "videos", "skipped")}


def do_train(args, cfg, device):
    from detectron2.config import instantiate
    from detectron2.engine import create_ddp_model, hooks
    from detectron2.utils import comm
    from detectron2.utils.events import JSONWriter
    from revvit_d2.d2.checkpoint import last_checkpoint_file
    from revvit_d2.d2.determinism import ReseedHook, SeedState, resolve_seed, saved_run_state
    from revvit_video.engine import AtomicCheckpointer, VideoMetricPrinter, VideoTrainer

    model = build_model(cfg, device)
    logger.info("model: %s, %d parameters", type(model).__name__,
                sum(p.numel() for p in model.parameters()))
    try:
        train_loader = instantiate(cfg.dataloader.train)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ToolError(f"dataloader.train: {e}") from None
    ipe = train_loader.iters_per_epoch
    max_iter = cfg.train.get("max_iter") or int(round(float(cfg.train.epochs) * ipe))
    world = comm.get_world_size()
    logger.info("training data: %d videos, %d clips per iteration (%d per process), %d iterations "
                "per epoch, %d iterations (%.1f epochs)", train_loader.num_videos,
                train_loader.batch_size * world, train_loader.batch_size, ipe, max_iter,
                max_iter / ipe)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, broadcast_buffers=False,
                             device_ids=[device.index] if device.type == "cuda" else None)
    trainer = VideoTrainer(model, train_loader, optimizer, device, amp_dtype(cfg, device),
                           label_smoothing=float(cfg.train.get("label_smoothing", 0.0)),
                           clip_grad_l2norm=cfg.train.get("clip_grad_l2norm"), world_size=world)
    output_dir = cfg.train.output_dir
    resume_from = saved_seed = None
    if args.resume:
        try:
            resume_from = last_checkpoint_file(output_dir)
            saved_seed = saved_run_state(resume_from)[0] if resume_from else None
        except Exception as e:  # noqa: BLE001 - a damaged tag or file is the user's to fix
            raise ToolError(f"cannot resume from {output_dir}: {type(e).__name__}: {e}") from None
    seed = resolve_seed(cfg.train.seed, saved_seed)
    checkpointer = AtomicCheckpointer(model, output_dir, trainer=trainer,
                                      save_to_disk=comm.is_main_process(), seed=SeedState(seed))
    ckpt_cfg = cfg.train.get("checkpointer") or {}
    period = int(ckpt_cfg.get("period") or ipe)
    eval_period = int(cfg.train.get("eval_period") or 0)
    log_period = int(cfg.train.get("log_period", 20))
    trainer.register_hooks([
        ReseedHook(seed),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, period, max_to_keep=ckpt_cfg.get("max_to_keep"))
        if comm.is_main_process() else None,
        hooks.EvalHook(eval_period, lambda: do_test(cfg, model, device), eval_after_train=False)
        if eval_period else None,
    ])

    start_iter = 0
    if resume_from:
        try:
            # model, optimizer, grad scaler, iteration, data position
            checkpointer.load(resume_from)
        except (RuntimeError, KeyError, OSError) as e:
            raise ToolError(f"cannot resume from {resume_from}: {e}") from None
        start_iter = trainer.iter + 1
        logger.info("resuming from %s at iteration %d (epoch %.2f)", resume_from, start_iter,
                    start_iter / ipe)
    else:
        if args.resume:
            logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
        init = cfg.train.get("init_checkpoint")
        if init:
            load_weights(getattr(model, "module", model), init,
                         load_head=not cfg.train.get("init_skip_head", False))
    # The writers open metrics.json: only once the weights are in (a bad checkpoint leaves no
    # file). Each line holds the medians over its own log period, so a resumed run writes the
    # lines of an uninterrupted one (log_period=1: the raw losses).
    if comm.is_main_process():
        trainer.register_hooks([hooks.PeriodicWriter(
            [VideoMetricPrinter(max_iter, ipe),
             JSONWriter(os.path.join(output_dir, "metrics.json"), window_size=log_period)],
            period=log_period)])
    train_loader.start_iter = start_iter
    if start_iter < max_iter:
        from revvit_video.data import NoReadableVideoError

        try:
            trainer.train(start_iter, max_iter)
        except NoReadableVideoError as e:
            raise ToolError(str(e)) from None
    else:
        logger.info("checkpoint is at iteration %d >= max_iter %d: nothing to train",
                    start_iter, max_iter)
    return do_test(cfg, model, device, final=True)


def main(args):
    cfg = setup(args)
    device = get_device(cfg)
    if args.eval_only:
        from revvit_video.engine import AtomicCheckpointer

        model = build_model(cfg, device)
        checkpointer = AtomicCheckpointer(model, cfg.train.output_dir)
        init = cfg.train.get("init_checkpoint")
        if args.resume and checkpointer.has_checkpoint():
            init = checkpointer.get_checkpoint_file()
        if init:
            load_weights(model, init)
        else:
            logger.warning("no checkpoint (train.init_checkpoint is not set): testing randomly "
                           "initialised weights, accuracy will be at chance level")
        return do_test(cfg, model, device, final=True)
    return do_train(args, cfg, device)


def invoke_main(argv=None) -> int:
    quiet_import_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s %(name)s] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.num_gpus < 1:
            raise ToolError(f"--num-gpus must be >= 1, got {args.num_gpus}")
        cfg, path = load_config(args)  # fail fast, once, before processes are launched
        prepare_data(cfg, args.eval_only)
        from revvit_d2.d2.checkpoint import check_start_checkpoint

        try:
            check_start_checkpoint(cfg.train.output_dir, cfg.train.get("init_checkpoint"),
                                   args.resume)
        except FileNotFoundError as e:
            raise ToolError(str(e)) from None
        args.config_file = path
        return launch_guarded(main, args)
    except ToolError as e:
        print_error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(invoke_main())
