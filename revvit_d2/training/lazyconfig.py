"""LazyConfig loading and strict ``key=value`` overrides for the tools, with one-line errors.

``LazyConfig.apply_overrides`` silently adds any key it is given, so a typo such as
``train.max_iters=10`` runs the default schedule. :func:`apply_overrides_strict` accepts a key
only if the config has it, or if its parent is a ``LazyCall`` node whose target takes that
argument (``model.backbone.net.drop_path_rate=0.2`` sets an argument the config file left at its
default); anything else is a :class:`ConfigError` naming the keys that would have been accepted.
"""
import inspect
import os
from typing import Iterable, List, Sequence

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

from ..utils.errors import UserError, one_line

__all__ = ["ConfigError", "apply_overrides_strict", "check_override_keys", "load_lazy_config"]

_MISSING = object()


class ConfigError(UserError, ValueError):
    """A config file or override the tools report as one ``error:`` line."""


def load_lazy_config(path: str, sections: Sequence[str] = ()):
    """``LazyConfig.load(path)``, checking that the file exists and defines `sections`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = LazyConfig.load(path)
    except Exception as e:  # noqa: BLE001 - a broken config file is a user error
        raise ConfigError(f"cannot load config {path}: {one_line(e)}") from None
    missing = [s for s in sections if s not in cfg]
    if missing:
        raise ConfigError(f"config {path} defines no {', '.join(repr(s) for s in missing)}")
    return cfg


def _target_arguments(node):
    """Argument names of the LazyCall target of `node`, or None when any name is accepted
    (``**kwargs``, or a signature that cannot be read)."""
    target = node.get("_target_")
    if isinstance(target, str):
        target = locate(target)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.kind is not p.VAR_POSITIONAL)


def _target_name(node) -> str:
    target = node.get("_target_")
    return target if isinstance(target, str) else getattr(target, "__qualname__", str(target))


def check_override_keys(cfg, overrides: Iterable[str]) -> List[str]:
    """Check ``key=value`` strings against `cfg` (see the module docstring); returns them."""
    checked = []
    for opt in overrides or []:
        if "=" not in opt or opt.startswith("-"):
            raise ConfigError(f"cannot parse override {opt!r}: expected key=value (options "
                              f"such as --resume go before the key=value overrides)")
        key = opt.split("=", 1)[0].strip()
        if key.startswith(("+", "~")):
            raise ConfigError(f"override {opt!r}: adding or deleting keys is not supported")
        checked.append(opt)
        if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        parent, name = key.rsplit(".", 1) if "." in key else (None, key)
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not OmegaConf.is_config(node):
            raise ConfigError(f"unknown config key '{key}' ('{parent}' is not in the config)")
        if OmegaConf.is_list(node):
            raise ConfigError(f"unknown config key '{key}' ('{parent}' is a list of {len(node)})")
        if "_target_" in node:
            accepted = _target_arguments(node)
            if accepted is None or name in accepted:
                continue
            known = f"{_target_name(node)} takes: {', '.join(accepted)}"
        else:
            known = f"known keys of '{parent or '<root>'}': {', '.join(sorted(node))}"
        raise ConfigError(f"unknown config key '{key}' ({known})")
    return checked


def apply_overrides_strict(cfg, overrides: Iterable[str]):
    """:func:`check_override_keys`, then ``LazyConfig.apply_overrides``; returns `cfg`."""
    checked = check_override_keys(cfg, overrides)
    try:
        return LazyConfig.apply_overrides(cfg, checked)
    except Exception as e:  # noqa: BLE001 - e.g. a value the override grammar cannot parse
        raise ConfigError(f"cannot apply overrides {checked}: {one_line(e)}") from None
