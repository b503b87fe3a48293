"""Write-once folders of generated data (the built-in synthetic datasets).

:func:`generate_once` is the protocol every built-in generator follows:

* a ``.complete`` marker holding the generation parameters is written last, so a folder with the
  same parameters is reused as it is (nothing is read or rewritten);
* other parameters, or a run that was killed (recognised by its ``.in_progress`` marker), make
  the generator rewrite everything it owns from scratch;
* a folder that holds the generator's outputs without either marker was not made here and is
  left alone (``FileExistsError``);
* the work runs under a file lock (``.lock``), so several processes (DDP ranks) can call it
  at once: one generates, the others wait and then reuse the result.
"""
import json
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from filelock import FileLock

__all__ = ["generate_once", "is_complete", "MARKER", "IN_PROGRESS", "LOCK"]

MARKER = ".complete"
IN_PROGRESS = ".in_progress"
LOCK = ".lock"


def is_complete(root: Path, params: Mapping, required: Sequence[str] = ()) -> bool:
    """Whether ``root`` holds a finished generation made with exactly ``params`` (and the
    ``required`` files below it still exist)."""
    root = Path(root)
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != dict(params):
            return False
    except ValueError:
        return False
    return all((root / name).exists() for name in required)


def generate_once(root: Path, params: Mapping, owned: Sequence[str], maker: str,
                  generate: Callable[[], None], required: Sequence[str] = ()) -> bool:
    """Run ``generate()`` unless ``root`` already holds its output for ``params``.

    Args:
        root: the output folder (created if needed).
        params: JSON-serialisable generation parameters; stored in the ``.complete`` marker.
        owned: names below ``root`` that the generator writes: removed before a fresh run, and
            their presence without a marker means the folder belongs to somebody else.
        maker: the generator's name, for the error message.
        generate: writes the outputs into ``root``.
        required: files below ``root`` without which a marked folder is regenerated.

    Returns:
        True if the data was generated now, False if a complete copy was reused.
    """
    root = Path(root)
    if is_complete(root, params, required):  # fast path: no lock to read a finished folder
        return False
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK)):
        if is_complete(root, params, required):  # another process finished it while we waited
            return False
        marker, in_progress = root / MARKER, root / IN_PROGRESS
        if not marker.exists() and not in_progress.exists():
            for name in owned:
                if (root / name).exists():
                    raise FileExistsError(
                        f"{root / name} exists but {root} was not made by {maker} (no {MARKER} "
                        f"or {IN_PROGRESS} marker); refusing to overwrite it")
        in_progress.write_text(json.dumps(dict(params)))
        marker.unlink(missing_ok=True)
        for name in owned:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        generate()
        marker.write_text(json.dumps(dict(params), sort_keys=True))
        in_progress.unlink()
    return True
