"""Peak-RSS measurement shared by the CPU memory benchmarks (memory_vs_depth.py,
detector_memory.py): one fresh child process per measurement, glibc's mmap threshold pinned so
that peak RSS tracks the peak of live tensors (why: memory_vs_depth.py's docstring), the child's
result read back as the last line of its stdout (one JSON object).
"""
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def maxrss_kib() -> int:
    """High-water mark of this process's resident set (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_in_child(argv, threads: int, prog: str, tag: str) -> dict:
    """Run ``argv`` in a fresh process with MALLOC_ENV and ``threads`` OpenMP/MKL threads and
    return the JSON object on its last stdout line; on failure exit with one line naming ``tag``
    and the child's last error line.

    The calling process must be small when it starts children: Linux keeps ``ru_maxrss``
    across ``execve``, so a child reports at least the peak RSS its parent had reached."""
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run(argv, env=env, cwd=str(ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        sys.exit(f"{prog}: child failed ({tag}): {last}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"{prog}: child printed no result ({tag})")


def dispatch(argv, parse_args, run_child, run_parent) -> int:
    """A benchmark's ``main``: with ``--child`` run one measurement and print it as one JSON
    line (what measure_in_child reads back), otherwise run the parent."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return 0
    return run_parent(args, argv)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kib = None
    return dict(
        cpu=cpu, cores=os.cpu_count(), load_average_1_5_15=[round(v, 2) for v in os.getloadavg()],
        mem_total_gib=round(mem_kib / 2**20, 1) if mem_kib else None,
        platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def measured_on(info: dict, command: str, wall_seconds=None, detail: str = "",
                raw: str = "", machine: str = "") -> str:
    """The footer of a benchmark report: where, with what, when, by which command, how long,
    and how loaded the machine was (the 1-minute load average at the start, when recorded, and
    at the end). `detail` goes inside the machine's parentheses after the cores ("2 torch
    threads"), `raw` names the JSON with the raw numbers, `machine` replaces the CPU name (a
    GPU's)."""
    inside = ", ".join(x for x in (f"{info['cores']} cores", detail) if x)
    load = [f"{info['load_average_1min_at_start']} at the start"] \
        if info.get("load_average_1min_at_start") is not None else []
    load.append(f"{info['load_average_1_5_15'][0]} at the end")
    took = f"total {wall_seconds:.0f} s; " if wall_seconds is not None else ""
    text = (f"Measured on {machine or info['cpu']} ({inside}), torch {info['torch']}, "
            f"{info['date']}, by `{command}` ({took}1-minute load average {', '.join(load)}).")
    return text + (f" Raw numbers: `{raw}`." if raw else "")


def command_line(script, argv) -> str:
    """The command that reproduces this run, with the script path relative to the cwd."""
    script = Path(script).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in argv])
