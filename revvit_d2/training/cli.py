"""What the command-line tools share: the parser, config loading, building a config node, and
detectron2's ``launch`` with one-line error reports.

An expected failure (a :class:`~revvit_d2.utils.errors.UserError`, e.g. :class:`ToolError` or a
:class:`~revvit_d2.training.lazyconfig.ConfigError`) is one ``error:`` line on stderr and exit
status 1, never a traceback; with several processes started by ``launch`` only the main process
of each machine prints it. Unexpected exceptions keep their traceback. A tool calls
:func:`~revvit_d2.utils.errors.quiet_import_warnings` before importing this module (it imports
detectron2).

The device decides what the launched processes see: detectron2's ``launch`` gives each process a
GPU and the NCCL backend whenever CUDA is available, even for a model that the config puts on
the CPU. :func:`launch_on` (and :func:`launch_guarded`, given the device by the tool's check)
starts CPU processes with ``CUDA_VISIBLE_DEVICES=""``, so that they use gloo on any machine.

The launch itself is :func:`revvit_d2.training.launch.launch`: detectron2's, with a join bounded
by ``--dist-timeout`` (a wrong ``--dist-url``, a missing machine, launches that disagree are one
line) and the numbers read from torchrun's or SLURM's environment (``--launcher``;
docs/distributed.md).
"""
import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Type, Union

import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from ..utils.errors import EXIT_ERROR, UserError, one_line, print_error
from .launch import DEFAULT_JOIN_TIMEOUT, LaunchError, launch, launch_plan
from .lazyconfig import apply_overrides_strict, load_lazy_config

__all__ = ["EXIT_ERROR", "ToolError", "build", "invoke_tool", "launch_guarded", "launch_on",
           "load_tool_config", "one_line", "print_error", "processes_use_gpus", "run_guarded",
           "tool_parser"]


class ToolError(UserError):
    """An expected failure of a tool, reported as one line on stderr (no traceback)."""


def run_guarded(main: Callable, args, expected: Tuple[Type[BaseException], ...] = (UserError,)):
    """``main(args)`` inside each process that ``launch`` starts: an ``expected`` exception
    becomes one stderr line (from the first process of each machine: each launch reports it)
    and ``SystemExit(EXIT_ERROR)``."""
    try:
        return main(args)
    except expected as e:
        sys.stdout.flush()
        if comm.get_local_rank() == 0:
            print_error(e)
        sys.exit(EXIT_ERROR)


def processes_use_gpus(device: Union[str, torch.device, None], num_processes: int) -> bool:
    """Whether the `num_processes` processes per machine that detectron2's ``launch`` starts
    for `device` get a GPU each (and NCCL), rather than none (and gloo).

    `device` is the device the processes train on: ``"cpu"`` (or any non-CUDA device), a CUDA
    device, or ``None`` / ``"auto"`` for "CUDA when available". CUDA processes need one GPU
    each: more processes than visible GPUs is a :class:`ToolError` (detectron2 would fail an
    ``assert`` in every process)."""
    if device is not None and str(device) != "auto" and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    count = torch.cuda.device_count()
    if num_processes > count:
        raise ToolError(f"{num_processes} processes per machine on CUDA need one GPU each, but "
                        f"{count} GPU(s) are visible; choose the CPU device (e.g. "
                        f"train.device=cpu) for CPU processes with the gloo backend")
    return True


@contextlib.contextmanager
def _gpus_hidden(hide: bool):
    """``CUDA_VISIBLE_DEVICES=""`` in this process's environment meanwhile, which the processes
    it spawns inherit (this process keeps the devices it has seen)."""
    if not hide:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def launch_on(device: Union[str, torch.device, None], main_func: Callable, num_processes: int,
              num_machines: int = 1, machine_rank: int = 0, dist_url: Optional[str] = None,
              args: tuple = (), **launch_kwargs):
    """:func:`revvit_d2.training.launch.launch` (detectron2's arguments after `device`, and its
    `launch_kwargs`: ``join_timeout``, ``local_rank``, ``agent_store``) with processes for
    `device` (:func:`processes_use_gpus`): several CPU processes see no GPU and use gloo, and
    are not compared with the GPU count; CUDA processes get a GPU each and NCCL. One process in
    all runs `main_func` here, as with detectron2."""
    gpus = processes_use_gpus(device, num_processes)
    started = launch_kwargs.get("local_rank") is not None
    if started:  # by torchrun / srun: too late to hide the GPUs, the backend follows `device`
        launch_kwargs["use_gpus"] = gpus
    with _gpus_hidden(num_processes * num_machines > 1 and not gpus and not started):
        launch(main_func, num_processes, num_machines=num_machines, machine_rank=machine_rank,
               dist_url=dist_url, args=args, **launch_kwargs)


def launch_guarded(main: Callable, args,
                   expected: Tuple[Type[BaseException], ...] = (UserError,),
                   check: Optional[Callable] = None) -> int:
    """detectron2's ``launch`` of ``run_guarded(main, args, expected)`` with the usual options
    (``args.num_gpus``, ``num_machines``, ``machine_rank``, ``dist_url``, or what
    ``args.launcher``'s environment says: :func:`~revvit_d2.training.launch.launch_plan`) and
    a join bounded by ``args.dist_timeout`` (a failed join is one line); returns the exit
    status: 0, or EXIT_ERROR after the error line has been printed once, or 130 after Ctrl-C.
    ``check(args)``, when given, runs first in this process: the cheap checks of a tool, so
    that a bad input is reported once, before any process starts or any file is written. It
    returns the device the processes will train on (e.g. the config's ``train.device``), or
    None for "CUDA when available": several processes for a CPU device use gloo on any machine
    (:func:`launch_on`); too few GPUs for the processes is one error line too.
    A launched process killed by a signal (or out of memory) is reported as one line too; one
    that raised an unexpected exception keeps its traceback (re-raised)."""
    # After one launched process fails, torch logs a warning for each sibling it terminates;
    # the failure itself is reported (our error line, or the child's traceback).
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        try:
            plan = launch_plan(args.num_gpus, args.num_machines, args.machine_rank,
                               args.dist_url, getattr(args, "launcher", "auto"))
            args.num_gpus, args.num_machines = plan.num_processes, plan.num_machines
            args.machine_rank, args.dist_url = plan.machine_rank, plan.dist_url
            device = check(args) if check is not None else None
            processes_use_gpus(device, args.num_gpus)  # too few GPUs: one line, here
        except expected + (ToolError, LaunchError) as e:
            print_error(e)
            return EXIT_ERROR
        launch_on(device, run_guarded, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url,
                  args=(main, args, expected),
                  join_timeout=float(getattr(args, "dist_timeout", DEFAULT_JOIN_TIMEOUT)),
                  local_rank=plan.local_rank, agent_store=plan.agent_store)
    except SystemExit as e:  # one process: run_guarded's status
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001
        # Several processes: one that exited with EXIT_ERROR has printed its error line.
        if type(e).__name__ == "ProcessExitedException":
            if getattr(e, "exit_code", None) != EXIT_ERROR:  # killed (a signal, out of memory)
                sys.stdout.flush()
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        raise
    return 0


def invoke_tool(parser: argparse.ArgumentParser, main: Callable, check: Callable,
                argv: Optional[Sequence[str]] = None) -> int:
    """The entry point of the classification tools (``tools/train_imagenet.py``,
    ``tools/run_video.py``): parse `argv`, send INFO log lines to stdout as
    ``[HH:MM:SS name] LEVEL message``, and :func:`launch_guarded` ``main`` after ``check``.
    Returns the exit status."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s %(name)s] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    return launch_guarded(main, args, check=check)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def tool_parser(doc: str, default_config: str):
    """detectron2's ``default_argument_parser`` described by a tool's docstring (its first line;
    the rest is the epilog), with the default config file named in ``--config-file``'s help,
    ``--dist-url`` defaulting to a free port of this machine (required with several machines)
    and two options of :func:`launch_guarded`: ``--dist-timeout`` and ``--launcher``."""
    parser = default_argument_parser(epilog=doc.split("\n\n", 1)[1])
    parser.description = doc.split("\n", 1)[0]
    parser.add_argument("--dist-timeout", type=_positive_seconds, default=DEFAULT_JOIN_TIMEOUT,
                        metavar="SECONDS",
                        help="how long the processes of a distributed run wait for each other "
                             "to join before one error line (default: %(default)g)")
    parser.add_argument("--launcher", choices=("auto", "torchrun", "slurm", "none"),
                        default="auto",
                        help="where --num-machines, --machine-rank, --dist-url and the "
                             "processes per machine come from: the flags (none), torchrun's "
                             "or SLURM's environment (auto: torchrun's when it started this "
                             "process; docs/distributed.md)")
    for action in parser._actions:
        if action.dest == "config_file":
            action.help = f"path to a LazyConfig file (default: {default_config})"
        if action.dest == "dist_url":
            # detectron2's default is a fixed port per user: a second run of the same user on
            # the machine would find it taken. One machine: a free port; several: required.
            action.default = None
            action.help = ("tcp://HOST:PORT of machine 0, the same for every launch; required "
                           "with --num-machines > 1 (default: a free port on this machine)")
    return parser


def load_tool_config(config_file: Optional[str], default_config: str, sections: Sequence[str],
                     opts: Sequence[str], repo_root: Optional[Path] = None,
                     prepare: Optional[Callable] = None):
    """Load a tool's LazyConfig: ``config_file`` or ``default_config`` (a relative path that is
    not a file here is also looked up below ``repo_root``), check that it defines ``sections``,
    call ``prepare(cfg)`` (defaults, option shortcuts), then apply the ``key=value`` overrides
    strictly. A config error is a :class:`~revvit_d2.training.lazyconfig.ConfigError` (a
    UserError: one line). Returns ``(cfg, path)``."""
    path = str(config_file or default_config)
    if repo_root is not None and not os.path.isfile(path) and not os.path.isabs(path) \
            and (Path(repo_root) / path).is_file():
        path = str(Path(repo_root) / path)
    cfg = load_lazy_config(path, tuple(sections))
    if prepare is not None:
        prepare(cfg)
    return apply_overrides_strict(cfg, list(opts)), path


def build(cfg_node, what: str):
    """``instantiate(cfg_node)``; a node that cannot be built is one :class:`ToolError` line
    (``cannot build <what>: <TypeName>: <first line>``). detectron2's own "Error when
    instantiating" log line is silenced meanwhile: it would repeat ours."""
    inst_logger = logging.getLogger("detectron2.config.instantiate")
    level = inst_logger.level
    inst_logger.setLevel(logging.CRITICAL)
    try:
        return instantiate(cfg_node)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a config the user wrote
        raise ToolError(f"cannot build {what}: {one_line(e)}") from e
    finally:
        inst_logger.setLevel(level)
