"""Plumbing shared by the command-line tools (``tools/*.py``): error reporting, the parser,
config loading and import-time warnings.

An expected failure (missing data, a bad config key, a checkpoint of another model...) is one
``error:`` line on stderr and exit status 1, never a traceback; with several processes started
by detectron2's ``launch`` only the main process prints it. Unexpected exceptions keep their
traceback. Plain Python: detectron2 is imported only when a launched run needs it.
"""
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Type

__all__ = ["EXIT_ERROR", "ToolError", "one_line", "print_error", "run_guarded", "launch_guarded",
           "quiet_import_warnings", "tool_parser", "load_tool_config"]

EXIT_ERROR = 1


class ToolError(Exception):
    """An expected failure, reported as one line on stderr (no traceback)."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: a ToolError's whole message, whitespace collapsed;
    any other exception as ``TypeName: first line of its message``."""
    if isinstance(e, ToolError):
        return " ".join(str(e).split())
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def print_error(e: BaseException) -> None:
    """``error: <one line>`` on stderr, after whatever stdout still holds."""
    sys.stdout.flush()
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


def run_guarded(main: Callable, args, expected: Tuple[Type[BaseException], ...] = (ToolError,)):
    """``main(args)`` inside each process that ``launch`` starts: an ``expected`` exception
    becomes one stderr line (from the main process only) and ``SystemExit(EXIT_ERROR)``."""
    try:
        return main(args)
    except expected as e:
        from detectron2.utils import comm

        sys.stdout.flush()
        if comm.is_main_process():
            print_error(e)
        sys.exit(EXIT_ERROR)


def launch_guarded(main: Callable, args,
                   expected: Tuple[Type[BaseException], ...] = (ToolError,)) -> int:
    """detectron2's ``launch`` of ``run_guarded(main, args, expected)`` with the usual options
    (``args.num_gpus``, ``num_machines``, ``machine_rank``, ``dist_url``); returns the exit
    status: 0, or EXIT_ERROR after the error line has been printed once. A launched process
    killed by a signal (or out of memory) is reported as one line too; one that raised an
    unexpected exception keeps its traceback (re-raised)."""
    from detectron2.engine import launch

    # After one launched process fails, torch logs a warning for each sibling it terminates;
    # the failure itself is reported (our error line, or the child's traceback).
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        launch(run_guarded, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url,
               args=(main, args, expected))
    except SystemExit as e:  # one process: run_guarded's status
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001
        # Several processes: one that exited with EXIT_ERROR has printed its error line.
        if type(e).__name__ == "ProcessExitedException":
            if getattr(e, "exit_code", None) != EXIT_ERROR:  # killed (a signal, out of memory)
                sys.stdout.flush()
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        raise
    return 0


def quiet_import_warnings() -> None:
    """Silence the notices that are noise for a tool's user: torch.jit.script(_method)
    deprecations raised while detectron2 and pytorchvideo import, and detectron2's environment
    report saying a CPU machine has no CUDA runtime. ``PYTHONWARNINGS`` carries the filter into
    spawned processes (``launch``, DataLoader workers), which do not inherit this interpreter's
    filters."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    quiet = "ignore::FutureWarning:torch.jit._script"
    current = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in current.split(","):
        os.environ["PYTHONWARNINGS"] = f"{current},{quiet}" if current else quiet


def tool_parser(doc: str, default_config: str):
    """detectron2's ``default_argument_parser`` described by a tool's docstring (its first line;
    the rest is the epilog), with the default config file named in ``--config-file``'s help."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=doc.split("\n\n", 1)[1])
    parser.description = doc.split("\n", 1)[0]
    for action in parser._actions:
        if action.dest == "config_file":
            action.help = f"path to a LazyConfig file (default: {default_config})"
    return parser


def load_tool_config(config_file: Optional[str], default_config: str, sections: Sequence[str],
                     opts: Sequence[str], repo_root: Optional[Path] = None,
                     prepare: Optional[Callable] = None):
    """Load a tool's LazyConfig: ``config_file`` or ``default_config`` (a relative path that is
    not a file here is also looked up below ``repo_root``), check that it defines ``sections``,
    call ``prepare(cfg)`` (defaults, option shortcuts), then apply the ``key=value`` overrides
    strictly. A config error becomes a :class:`ToolError`. Returns ``(cfg, path)``."""
    from revvit_d2.d2.lazyconfig import ConfigError, apply_overrides_strict, load_lazy_config

    path = str(config_file or default_config)
    if repo_root is not None and not os.path.isfile(path) and not os.path.isabs(path) \
            and (Path(repo_root) / path).is_file():
        path = str(Path(repo_root) / path)
    try:
        cfg = load_lazy_config(path, tuple(sections))
        if prepare is not None:
            prepare(cfg)
        return apply_overrides_strict(cfg, list(opts)), path
    except ConfigError as e:
        raise ToolError(str(e)) from None
