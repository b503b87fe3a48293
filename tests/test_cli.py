"""revvit_d2.training.cli: the error report every tool shares, through detectron2's launch with one and
with two processes (CPU processes with gloo, also on a machine with GPUs: the worker launches
for the CPU device): an expected error is one ``error:`` line printed once and exit status 1; a
process killed by a signal is one line too; an unexpected exception keeps its traceback. How the
device and backend are chosen: tests/test_launch_device.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from revvit_d2.training.cli import ToolError  # noqa: E402
from revvit_d2.utils.errors import one_line  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_cli_worker.py"


def _run(kind, num):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(WORKER), kind, str(num)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(WORKER.parent))
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()], proc


def test_one_line():
    assert one_line(ToolError("a\n   b")) == "a b"
    assert one_line(FileNotFoundError("missing.pth\nmore")) == "FileNotFoundError: missing.pth"
    assert one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("num", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_expected_error_is_one_line_once(num):
    code, lines, proc = _run("expected", num)
    assert code == 1, proc.stderr
    assert lines == ["error: no such dataset: shapes_val (registered: shapes_train)"], proc.stderr


@pytest.mark.slow
def test_killed_process_is_reported_in_one_line():
    code, lines, proc = _run("killed", 2)
    assert code == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "SIGKILL" in lines[0], lines


@pytest.mark.parametrize("num", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_unexpected_exception_keeps_its_traceback(num):
    code, _, proc = _run("unexpected", num)
    assert code != 0
    assert "Traceback" in proc.stderr and "a bug, not an input error" in proc.stderr


def test_success_is_exit_status_0():
    code, lines, proc = _run("succeeds", 1)
    assert code == 0 and lines == [] and "trained" in proc.stdout, proc.stderr
