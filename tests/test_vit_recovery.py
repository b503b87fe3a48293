"""benchmarks/vit_recovery.py at toy size: a trained plain ViT, converted, fine-tunes with the
reversible backward (the engine's node is in the graph, its gradients equal plain autograd's,
the loss goes down), the batch stream is fixed by its seed, the beta schedule ends at the
ordinary Rev-ViT, and --smoke writes a well-formed result."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

pytest.importorskip("timm")

import revvit_d2  # noqa: E402
from revvit_d2.data.synthetic.imagenet import make_synthetic_imagefolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Toy sizes run much faster on one thread on a shared machine; the script's main sets the
    count too, so it is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vit_recovery",
                                                  ROOT / "benchmarks" / "vit_recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, bench):
    root = make_synthetic_imagefolder(tmp_path_factory.mktemp("shapes"), num_classes=4,
                                      train_per_class=8, val_per_class=2, image_size=(24, 32))
    return bench.load_split(root, "train", 16)


KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


def test_batch_stream_is_fixed_by_its_seed(bench, shapes):
    x, y, skipped = shapes
    assert x.shape == (32, 3, 16, 16) and not skipped
    a = list(bench.batches(x, y, 5, 8, seed=1))
    b = list(bench.batches(x, y, 5, 8, seed=1))
    c = list(bench.batches(x, y, 5, 8, seed=2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    assert all(xb.shape == (8, 3, 16, 16) for xb, _ in a)


def test_trained_plain_vit_converted_fine_tunes_with_the_reversible_backward(bench, shapes):
    x, y, _ = shapes
    plain = bench.build_plain(KW, seed=0)
    bench.train(plain, (x, y), 30, 2e-3, 3, seed=1, batch=8, weight_decay=0.05)
    model = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), KW, rewire="re2tal")
    probe = x[:4]

    check = bench.reversibility(model, probe)
    assert check["reversible_backward_used"] and check["param_grad_max_rel_err"] < 1e-4
    assert model.use_rev_backprop  # restored after the comparison with plain autograd
    model.use_rev_backprop = False  # the detector can say no
    assert not bench.uses_reversible_backward(model.train(), probe)
    model.use_rev_backprop = True

    def loss():
        model.eval()
        with torch.no_grad():
            return nnf.cross_entropy(model(x), y).item()

    before = loss()
    bench.train(model, (x, y), 15, 1e-3, 1, seed=2, batch=8, weight_decay=0.05)
    assert loss() < before
    assert bench.reversibility(model, probe)["param_grad_max_rel_err"] < 1e-4


def test_beta_schedule_ends_at_the_ordinary_rev_vit(bench):
    torch.manual_seed(0)
    plain = bench.build_plain(KW, seed=0)
    model = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), KW, rewire="dr2net", beta=0.7)
    on_step = bench.beta_schedule(0.7, ramp_steps=4)
    on_step(model, 0)
    assert model.dual_residual == pytest.approx((0.3, 0.7))
    on_step(model, 2)
    assert model.dual_residual == pytest.approx((0.15, 0.85))
    on_step(model, 4)
    assert model.dual_residual is None and all(b.F.dual is None for b in model.blocks)


def test_smoke_run_writes_a_well_formed_result(bench, tmp_path):
    out = tmp_path / "recovery"
    bench.main(["--smoke", "--betas", "0.7", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    runs = [r["run"] for r in data["rows"]]
    assert runs == ["plain", "re2tal@conversion", "re2tal+ft", "dr2net(beta=0.7)@conversion",
                    "dr2net(beta=0.7)+ft", "dr2net(beta=0.7->1)@conversion",
                    "dr2net(beta=0.7->1)+ft", "rev_scratch", "plain+ft"]
    assert all(0 <= r["top1"] <= 100 for r in data["rows"])
    for r in data["rows"]:
        if r["run"].endswith("+ft") and r["run"] != "plain+ft":
            for key in ("rev_check_start", "rev_check_end"):
                assert r[key]["reversible_backward_used"]
                assert r[key]["param_grad_max_rel_err"] < 1e-3
    by = {r["run"]: r for r in data["rows"]}
    assert by["dr2net(beta=0.7->1)+ft"]["final_alpha_beta"] == [0.0, 1.0]
    assert by["dr2net(beta=0.7)+ft"]["final_alpha_beta"] == pytest.approx([0.3, 0.7])
    assert set(data["verdict"]) >= {"best_converted", "gap_to_plain_ft", "above_rev_scratch"}
    assert data["machine"]["threads"] >= 1 and "vit_recovery.py" in data["command"]
    md = out.with_suffix(".md").read_text()
    assert "| re2tal+ft | 2 |" in md and "| plain+ft | 2 |" in md
