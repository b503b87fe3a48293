#!/usr/bin/env python
"""The summary of one ``benchmarks/gpu_check.sh`` run: ``gpu_check.json`` and ``gpu_check.md``.

Usage (called by gpu_check.sh): ``gpu_check_report.py OUT SMOKE WALL_SECONDS``. Reads the step
table ``OUT/steps.tsv`` (name, status, seconds, exit code) and the results each step wrote,
names the machine (``machine.gpu``: the CUDA device, or null in the CPU smoke run) and exits 1
when a step failed, timed out or left no result.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# step name -> the result files it must leave (relative to OUT)
EXPECTED = {
    "memory_speed": ["memory_speed.json", "memory_speed.md", "memory_speed.png"],
    "pytest_cuda": ["pytest_cuda.xml"],
    "largest_batch": ["largest_batch.json", "largest_batch.md"],
    "detector": ["detector_memory.json", "detector_memory.md"],
    "compile": ["compile_speed.json", "compile_speed.md"],
    "fsdp_memory": ["fsdp_memory.json", "fsdp_memory.md", "fsdp_memory.png"],
}


def _tests(xml_path: Path) -> dict:
    """passed / failed / skipped counts from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    if not xml_path.exists():
        return {}
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in
                                        ("tests", "failures", "errors", "skipped"))
    return dict(passed=total - failures - errors - skipped, failed=failures + errors,
                skipped=skipped)


def main(argv):
    out, smoke, wall = Path(argv[0]), argv[1] == "1", int(argv[2])
    from memory_speed import machine  # the benchmarks' own machine record

    import torch

    info = machine(torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    info.setdefault("gpu", None)
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, seconds, rc = line.split("\t")
        missing = [f for f in EXPECTED.get(name, []) if not (out / f).exists()]
        if status == "ok" and missing:
            status = "no result"
        steps.append(dict(name=name, status=status, seconds=int(seconds), exit_code=int(rc),
                          log=f"{name}.log", missing=missing))
    tests = _tests(out / "pytest_cuda.xml")
    summary = dict(machine=info, smoke=smoke, wall_seconds=wall, steps=steps, cuda_tests=tests)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    where = info["gpu"] or f"{info['cpu']} (CPU smoke run: GPU_CHECK_SMOKE=1, tiny sizes)"
    lines = [f"# GPU check: {where}", "",
             f"torch {info['torch']}, {info['date']}, total {wall} s, by "
             f"`{'GPU_CHECK_SMOKE=1 ' if smoke else ''}bash benchmarks/gpu_check.sh`.", "",
             "| step | status | seconds | results |", "|---|---|---:|---|"]
    for s in steps:
        files = ", ".join(f"[{f}]({f})" for f in EXPECTED.get(s["name"], [])
                          if f not in s["missing"] and f.endswith(".md"))
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {files} |")
    if tests:
        lines += ["", f"CUDA-marked tests: {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['skipped']} skipped (pytest_cuda.log)."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_check.md").read_text())
    bad = [s["name"] for s in steps if s["status"] != "ok"]
    if bad:
        print(f"gpu_check: steps not ok: {', '.join(bad)} (logs in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
