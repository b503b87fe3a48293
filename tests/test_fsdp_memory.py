"""benchmarks/fsdp_memory.py end to end on tiny widths (--smoke): 1 and 2 gloo processes; the
computed per-process states (parameters + gradients + AdamW state, from the local shards) of
2 processes are about half of 1 process's. Peak RSS is recorded, not checked (it is dominated
by the interpreter at tiny size); the full-size run is docs/results/fsdp_memory_cpu.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fsdp_memory.py"


@pytest.mark.slow
def test_fsdp_memory_smoke_two_processes_hold_half_the_states(tmp_path):
    out = tmp_path / "fm"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--models", "l", "--worlds", "1", "2",
           "--depths", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "states x0.5" in proc.stdout  # the ratio is printed

    data = json.loads((out.parent / "fm.json").read_text())
    one, two = (next(r for r in data["rows"] if r["world"] == n) for n in (1, 2))
    # the largest rank holds about half (FSDP2 splits dim 0; a 1-row tensor sits on one rank)
    assert 0.45 <= two["states_mib"] / one["states_mib"] <= 0.6, (two, one)
    assert two["states_ratio"] == pytest.approx(two["states_mib"] / one["states_mib"])
    # together the two ranks hold the unsharded states once (plus one AdamW step counter per
    # parameter tensor and rank)
    assert two["states_mib_sum"] == pytest.approx(one["states_mib"], rel=0.01)
    for kind in ("params", "grads", "optimizer"):
        assert 0.45 <= two["states_by_kind_mib"][kind] / one["states_by_kind_mib"][kind] <= 0.6
    ranks = [r for r in data["raw"] if r["world"] == 2]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sum(r["local_param_numel"] for r in ranks) == ranks[0]["n_params"]
    assert all(r["malloc_mmap_threshold"] == "65536" and r["peak_mib"] > r["baseline_mib"] > 0
               for r in data["raw"])
    assert one["losses_finite"] and two["losses_finite"]
    assert [c["counted"] == c["formula"] for c in data["parameter_checks"]] == [True]
    assert data["machine"]["cpu"] and data["settings"]["worlds"] == [1, 2]
    assert "| `rev_vit_l` |" in (out.parent / "fm.md").read_text()
    assert (out.parent / "fm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
