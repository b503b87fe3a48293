"""Our models reproduce the official implementations (golden files in tests/data/oracle).

Built through the public entry points from the config stored in each file, loaded with the
converters, then compared: eval logits (pre-softmax) to 1e-5, and every parameter and input
gradient, computed through our reversible backward, to atol 1e-6 / rtol 1e-4.
"""
import pytest
import torch

import revvit_d2

from _helpers import load_oracle

CASES = {
    "slowfast_revvit_tiny.pt": (
        lambda d, **kw: revvit_d2.build_from_slowfast_cfg(d["config"], **kw),
        revvit_d2.convert_slowfast_state_dict,
    ),
    "slowfast_revmvit_tiny_image.pt": (
        lambda d, **kw: revvit_d2.build_from_slowfast_cfg(d["config"], **kw),
        revvit_d2.convert_slowfast_state_dict,
    ),
    "slowfast_revmvit_tiny_video.pt": (
        lambda d, **kw: revvit_d2.build_from_slowfast_cfg(d["config"], **kw),
        revvit_d2.convert_slowfast_state_dict,
    ),
    "mmpretrain_revvit_tiny.pt": (
        lambda d, **kw: revvit_d2.build_from_mmpretrain_cfg(d["model_config"], **kw),
        revvit_d2.convert_mmpretrain_state_dict,
    ),
}


def _build_loaded(name, **kw):
    data = load_oracle(name)
    build, _ = CASES[name]
    model = build(data, **kw)
    report = revvit_d2.load_pretrained(model, data["state_dict"])
    assert not report["missing"] and not report["unexpected"]
    assert sum(p.numel() for p in model.parameters()) == data["num_params"]
    return data, model


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_logits_match_official(name):
    data, model = _build_loaded(name)
    model.eval()
    with torch.no_grad():
        logits = model(data["input"])
    torch.testing.assert_close(logits, data["logits_eval"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reversible_gradients_match_official(name, rev_backward_calls):
    data, model = _build_loaded(name)
    _, convert = CASES[name]
    calls = rev_backward_calls
    model.train()
    x = data["input"].clone().requires_grad_(True)
    logits = model(x)
    loss = logits.float().pow(2).mean()
    loss.backward()
    assert calls, "the reversible backward was not used"

    torch.testing.assert_close(logits.detach(), data["logits_train"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), data["loss"], atol=1e-7, rtol=1e-4)
    ref = convert(data["grads"])
    named = dict(model.named_parameters())
    assert set(ref) == set(named)
    for key, param in named.items():
        assert param.grad is not None, key
        torch.testing.assert_close(param.grad, ref[key], atol=1e-6, rtol=1e-4, msg=key)
    # Input gradients are ~1e-5: compare relative to their scale.
    scale = data["input_grad"].abs().max().item()
    torch.testing.assert_close(x.grad, data["input_grad"], atol=1e-6 * scale + 1e-12, rtol=1e-3)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n.startswith("slowfast")])
def test_intermediate_streams_match_official(name):
    """Localises a mismatch: every reversible block's Y1/Y2 and every transition's output."""
    data, model = _build_loaded(name)
    model.eval()
    seen = {}

    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
    with torch.no_grad():
        model(data["input"])
    inter = data["intermediates_eval"]
    for i in range(len(model.blocks)):
        if f"rev_backbone.layers.{i}.Y_1" in inter:
            torch.testing.assert_close(seen[i][0], inter[f"rev_backbone.layers.{i}.Y_1"],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(seen[i][1], inter[f"rev_backbone.layers.{i}.Y_2"],
                                       atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(seen[i][0], inter[f"rev_backbone.layers.{i}.out"],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_autograd_builds_the_same_model(name):
    data, rev = _build_loaded(name)
    _, plain = _build_loaded(name, use_rev_backprop=False)
    assert [n for n, _ in rev.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = data["input"]
    for m in (rev, plain):
        m.train()
        m(x).pow(2).mean().backward()
    for (n, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-4, msg=n)
