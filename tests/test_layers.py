"""The import rules of docs/architecture.md, enforced.

Two checks: a static one that reads every import statement of the two packages (function-level
imports included) and compares it with the table of allowed layers, and a dynamic one that makes
detectron2 (and pytorchvideo) unimportable in a fresh interpreter and imports what must still
work without them.
"""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"revvit_d2": ROOT / "revvit_d2", "revvit_video": ROOT / "video"}

# Layer of a project module (first matching prefix wins).
LAYER_OF = [
    ("revvit_d2.utils", "utils"),
    ("revvit_d2.modeling", "modeling"),
    ("revvit_d2.data", "data"),
    ("revvit_d2.training", "training"),
    ("revvit_d2.d2", "d2"),
    ("revvit_d2", "core_api"),  # checkpoint, official, factory and the package itself
    ("revvit_video.engine", "video_engine"),
    ("revvit_video", "video"),
]

_BASE = {"utils", "modeling", "core_api"}
ALLOWED_PROJECT = {
    "utils": {"utils"},
    "modeling": {"modeling"},
    "core_api": _BASE,
    "data": {"utils", "data"},
    "training": _BASE | {"data", "training"},
    "d2": _BASE | {"data", "training", "d2"},
    "video": _BASE | {"data", "video"},
    "video_engine": _BASE | {"data", "training", "video", "video_engine"},
}
# Third-party packages only some layers may use.
RESTRICTED = {
    "detectron2": {"training", "d2", "video_engine"},
    "pytorchvideo": {"video", "video_engine"},
}


def layer_of(module: str) -> str:
    for prefix, layer in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise KeyError(module)


def _module_name(package: str, root: Path, path: Path) -> Tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = [package] + list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def iter_modules() -> Iterator[Tuple[str, bool, Path]]:
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            name, is_pkg = _module_name(package, root, path)
            yield name, is_pkg, path


def imports_of(name: str, is_pkg: bool, path: Path) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any nesting level."""
    here = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # `from . import x` / `from pkg import submodule` name modules too.
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names
                      if _is_project_module(f"{target}.{a.name}")]
    return found


def _is_project_module(module: str) -> bool:
    package, _, rest = module.partition(".")
    if package not in PACKAGES or not rest:
        return False
    path = PACKAGES[package].joinpath(*rest.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations() -> List[str]:
    bad = []
    for name, is_pkg, path in iter_modules():
        layer = layer_of(name)
        shown = path.relative_to(PACKAGES[name.split(".")[0]].parent)
        for line, target in imports_of(name, is_pkg, path):
            top = target.split(".")[0]
            where = f"{shown}:{line} ({layer})"
            if top in PACKAGES:
                if layer_of(target) not in ALLOWED_PROJECT[layer]:
                    bad.append(f"{where} imports {target} ({layer_of(target)})")
            elif top in RESTRICTED and layer not in RESTRICTED[top]:
                bad.append(f"{where} imports {target}")
    return bad


def test_every_module_has_a_layer():
    names = [name for name, _, _ in iter_modules()]
    assert len(names) > 20
    for name in names:
        layer_of(name)  # raises KeyError for a module outside the table


def test_imports_follow_the_layers():
    found = violations()
    assert not found, "imports against docs/architecture.md:\n" + "\n".join(found)


def test_the_checker_sees_a_back_edge(tmp_path, monkeypatch):
    """The static check catches a function-level import from the core into a wrapping."""
    fake = tmp_path / "revvit_d2"
    (fake / "modeling").mkdir(parents=True)
    (fake / "d2").mkdir()
    for pkg in (fake, fake / "modeling", fake / "d2"):
        (pkg / "__init__.py").write_text("")
    (fake / "modeling" / "bad.py").write_text(
        "def f():\n    from ..d2 import backbone\n    import detectron2\n")
    (fake / "d2" / "backbone.py").write_text("")
    monkeypatch.setitem(PACKAGES, "revvit_d2", fake)
    monkeypatch.setitem(PACKAGES, "revvit_video", tmp_path / "none")
    found = violations()
    assert any("modeling/bad.py:2" in v and "revvit_d2.d2" in v for v in found), found
    assert any("modeling/bad.py:3" in v and "detectron2" in v for v in found), found


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked by the test")
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("ok")
"""


def _modules_under(sub: str) -> List[str]:
    return [name for name, _, _ in iter_modules() if name == sub or name.startswith(sub + ".")]


@pytest.mark.parametrize("blocked,modules", [
    (("detectron2",),
     ["revvit_d2", "revvit_d2.checkpoint", "revvit_d2.official"]
     + _modules_under("revvit_d2.modeling")
     + _modules_under("revvit_d2.utils")
     + _modules_under("revvit_d2.data")
     + ["revvit_video", "revvit_video.models", "revvit_video.hub", "revvit_video.data",
        "revvit_video.transforms"]),
    (("detectron2", "pytorchvideo"),
     ["revvit_d2"] + _modules_under("revvit_d2.modeling")
     + _modules_under("revvit_d2.data")),
], ids=["without-detectron2", "without-detectron2-and-pytorchvideo"])
def test_imports_without_the_wrapped_libraries(blocked, modules):
    code = _BLOCKER.format(blocked=set(blocked), modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
