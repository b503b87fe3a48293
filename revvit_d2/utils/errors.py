"""What a command-line user sees when something goes wrong: one line, never a traceback.

An expected failure (missing data, a bad config key, a checkpoint of another model...) is a
:class:`UserError` (or is wrapped into one) and is printed by :func:`print_error` as one
``error:`` line on stderr; the tools then exit with :data:`EXIT_ERROR`. Unexpected exceptions
keep their traceback. :func:`quiet_import_warnings` removes the import-time notices of torch,
detectron2 and pytorchvideo that are noise for a tool's user (call it before importing them).
"""
import logging
import os
import sys
import warnings

__all__ = ["EXIT_ERROR", "UserError", "one_line", "print_error", "quiet_import_warnings"]

#: Exit status of a tool that stopped on an expected failure.
EXIT_ERROR = 1


class UserError(Exception):
    """An expected failure whose message is written for the user; shown as the message alone."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: a :class:`UserError`'s whole message with whitespace
    collapsed; any other exception as ``TypeName: first line of its message``."""
    if isinstance(e, UserError):
        return " ".join(str(e).split())
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def print_error(e: BaseException) -> None:
    """``error: <one line>`` on stderr, after whatever stdout still holds."""
    sys.stdout.flush()
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


def quiet_import_warnings() -> None:
    """Silence the notices that are noise for a tool's user: torch.jit.script(_method)
    deprecations raised while detectron2 and pytorchvideo import, pkg_resources' deprecation,
    and detectron2's environment report saying a CPU machine has no CUDA runtime.
    ``PYTHONWARNINGS`` carries the filter into spawned processes (``launch``, DataLoader
    workers), which do not inherit this interpreter's filters."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"detectron2\..*")
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    quiet = "ignore::FutureWarning:torch.jit._script"
    current = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in current.split(","):
        os.environ["PYTHONWARNINGS"] = f"{current},{quiet}" if current else quiet
