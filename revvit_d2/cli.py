"""Error reporting shared by the command-line tools (``tools/*.py``).

An expected failure (missing data, a bad config key, a checkpoint of another model...) is one
``error:`` line on stderr and exit status 1, never a traceback; with several processes started
by detectron2's ``launch`` only the main process prints it. Unexpected exceptions keep their
traceback. Plain Python: detectron2 is imported only when a launched run needs it.
"""
import logging
import sys
from typing import Callable, Tuple, Type

__all__ = ["EXIT_ERROR", "ToolError", "one_line", "print_error", "run_guarded", "launch_guarded"]

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
