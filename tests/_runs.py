"""Tool runs in subprocesses, shared by the tests that start, kill and compare them
(test_resume.py, test_fsdp_tools.py, test_multi_machine.py) and by those that check a bad
input's one error line (test_bad_input.py, test_train_imagenet.py, test_own_data_videos.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import pytest


def assert_one_error_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    """The finished tool run `proc` failed with exit status 1 and exactly one line on stderr, an
    ``error: `` line containing `needle`, and no traceback anywhere; returns that line."""
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[max(0, both.find("Traceback") - 800):][:3000]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


def start_tool(tool, args, cwd, env) -> subprocess.Popen:
    """`tool` with `args` in its own session (so that its processes can be killed together),
    stdout and stderr in one pipe."""
    return subprocess.Popen([sys.executable, str(tool), *map(str, args)], cwd=str(cwd), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, progress: Callable[[], int], after: int,
              timeout: float = 600) -> int:
    """SIGKILL `proc` (and the rest of its session: other processes, data-loader workers) once
    ``progress()`` (e.g. the iteration of the last checkpoint) is `after` or more; returns
    ``progress()`` after the kill."""
    deadline = time.monotonic() + timeout
    while progress() < after:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned processes of the killed one
    except ProcessLookupError:
        pass
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return progress()


def metrics_losses(out_dir: Path) -> Dict[int, Dict[str, float]]:
    """{iteration: {loss name: value}} from a run's metrics.json; a later line for the same
    iteration (written again after a resume) replaces the earlier one."""
    rows = {}
    for line in (Path(out_dir) / "metrics.json").read_text().splitlines():
        row = json.loads(line)
        losses = {k: v for k, v in row.items() if k.startswith("loss") or k == "total_loss"}
        if losses:
            rows[row["iteration"]] = losses
    return rows


def assert_losses_repeat(full: Path, resumed: Path, killed_at: int, max_iter: int) -> None:
    """The resumed run logged the uninterrupted run's losses at every iteration after the kill."""
    a, b = metrics_losses(full), metrics_losses(resumed)
    after = list(range(killed_at + 1, max_iter))
    assert after and all(i in a and i in b for i in after), (sorted(a), sorted(b))
    for i in after:
        assert b[i] == a[i], f"iteration {i}: resumed {b[i]} vs uninterrupted {a[i]}"
