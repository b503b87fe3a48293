"""Where the built-in (generated) datasets live."""
import os
from pathlib import Path

__all__ = ["default_datasets_root"]


def default_datasets_root() -> Path:
    """``$REVVIT_DATASETS``, or ``./datasets`` (relative to the current directory)."""
    return Path(os.environ.get("REVVIT_DATASETS", "datasets"))
