"""benchmarks/memory_model.py: the simulated memory (FakeTensorMode + MemTracker) of tiny
models. The reversible model's per-image memory does not grow with depth while the plain one's
does; the simulation equals the same step on real CPU tensors counted by the same tracker; the
report is written. The full-size figures and the comparison with the committed peak-RSS
measurements are the run recorded in docs/results/memory_model.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_model.py"
sys.path.insert(0, str(SCRIPT.parent))
import memory_model  # noqa: E402

TINY = dict(embed_dim=64, num_heads=2, img_size=64)
BATCHES = (2, 4)


def _per_image(mode, depth, dtype="float32", fake=True, optimizer=True):
    build = memory_model.vit_builder("rev_vit_test", dict(TINY, depth=depth), mode,
                                     num_classes=10)
    return memory_model.per_image(build, memory_model.classification_inputs(64, 10),
                                  memory_model.classification_loss, BATCHES, dtype,
                                  optimizer=optimizer, fake=fake)


def test_reversible_flat_in_depth_plain_grows():
    rev = [_per_image("reversible", d)["mib_per_image"] for d in (2, 8)]
    plain = [_per_image("plain", d)["mib_per_image"] for d in (2, 8)]
    assert abs(rev[1] - rev[0]) <= 0.02 * rev[0], rev
    assert plain[1] > 2.5 * plain[0], plain
    assert plain[1] > 3 * rev[1], (plain, rev)


@pytest.mark.skipif(not memory_model.engine_has("stored_blocks"), reason="no hybrid engine")
def test_hybrid_between_reversible_and_plain():
    """At large batches (where the stored blocks' activations decide the peak) the hybrid with
    half the blocks stored sits between the reversible and the plain model."""
    def mib(mode, **extra):
        build = memory_model.vit_builder("rev_vit_test", dict(TINY, depth=4), mode,
                                         num_classes=10, **extra)
        return memory_model.per_image(build, memory_model.classification_inputs(64, 10),
                                      memory_model.classification_loss, (32, 64),
                                      optimizer=False)["mib_per_image"]

    rev, hybrid, plain = mib("reversible"), mib("reversible", stored_blocks=2), mib("plain")
    assert rev < hybrid < plain, (rev, hybrid, plain)


def test_constant_part_is_params_grads_and_adamw_state():
    res = _per_image("reversible", 2)
    kinds = res["constant_by_kind_mib"]
    assert kinds["Parameter"] > 0
    assert kinds["Gradient"] == pytest.approx(kinds["Parameter"])
    assert kinds["Optstate"] == pytest.approx(2 * kinds["Parameter"], rel=0.01)  # two moments
    assert res["optimizer_step_peak_mib"] >= res["constant_mib"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["reversible", "plain", "checkpoint"])
def test_simulation_equals_real_cpu_run(mode, dtype):
    """The fake step and the real one, both counted by torch's MemTracker, agree: the fake
    tensors take the same code paths (attention kernel, engine backward) as real ones."""
    sim = _per_image(mode, 3, dtype, fake=True)
    real = _per_image(mode, 3, dtype, fake=False)
    assert sim["mib_per_image"] == pytest.approx(real["mib_per_image"], rel=0.02)
    assert sim["constant_mib"] == pytest.approx(real["constant_mib"], rel=0.02)


def test_smoke_writes_report(tmp_path):
    out = tmp_path / "mm"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--no-detectors",
                           "--sides", "plain", "reversible", "--dtypes", "float32",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    sides = {r["side"]: r["mib_per_image"] for r in result["vit"]}
    assert sides["reversible"] < sides["plain"]
    assert result["validation"] and all(abs(r["ratio"] - 1) < 0.10 for r in result["validation"])
    assert "simulated" in out.with_suffix(".md").read_text()
