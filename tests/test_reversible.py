"""The reversible engine: exact gradients, RNG replay, frozen parameters, autocast, guards."""
import pytest
import torch

import revvit_d2
from revvit_d2.modeling import reversible
from revvit_d2.modeling.reversible import RevBackProp


def _pair(**kw):
    """The same tiny model twice: reversible backward and plain autograd (same init draws)."""
    kw = dict(dict(depth=8, drop_path_rate=0.3, dropout_rate=0.1, head_dropout_rate=0.1), **kw)
    torch.manual_seed(0)
    rev = revvit_d2.create_model("rev_vit_test", **kw)
    torch.manual_seed(0)
    plain = revvit_d2.create_model("rev_vit_test", use_rev_backprop=False, **kw)
    for (na, a), (nb, b) in zip(rev.named_parameters(), plain.named_parameters()):
        assert na == nb and torch.equal(a, b)
    return rev, plain


def _step(model, x, seed):
    model.train()
    torch.manual_seed(seed)
    logits = model(x)
    loss = logits.pow(2).mean() + logits.sum() * 1e-3
    loss.backward()
    return logits.detach()


def test_reversible_grads_equal_plain_autograd_with_drop_path_and_dropout():
    rev, plain = _pair()
    x = torch.randn(4, 3, 64, 64)
    out_rev = _step(rev, x, seed=123)
    out_plain = _step(plain, x, seed=123)
    torch.testing.assert_close(out_rev, out_plain, atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        assert a.grad is not None, f"{name} received no gradient"
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    # The randomness really is active: another seed gives other outputs.
    rev.zero_grad()
    assert not torch.allclose(_step(rev, x, seed=7), out_rev)


def test_drop_path_mask_is_shared_by_both_branches():
    torch.manual_seed(0)
    blk = reversible.ReversibleBlock(_Const(1.0), _Const(10.0), drop_path_rate=0.5).train()
    x = torch.zeros(64, 1, 1)
    y1, y2 = blk(x, x, (1, 1, 1))
    # F adds 1/keep or 0 to Y1 and G adds 10/keep or 0 to Y2, per sample: same mask means
    # y2 == 10 * y1 for every sample.
    torch.testing.assert_close(y2, 10 * y1)
    assert 0 < (y1 == 0).sum() < 64


class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, thw=None):
        return torch.full_like(x, self.value)


def test_backward_leaves_global_rng_as_forward_left_it():
    rev, _ = _pair()
    rev.train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)
    loss = rev(x).pow(2).mean()
    after_forward = torch.get_rng_state().clone()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_frozen_parameters_do_not_break_training():
    rev, plain = _pair()
    for model in (rev, plain):
        for p in list(model.patch_embed.parameters()) + [model.pos_embed]:
            p.requires_grad_(False)
        for blk in model.blocks[:3]:
            blk.requires_grad_(False)
        model.blocks[4].F.requires_grad_(False)  # F frozen, G trainable in the same block
    x = torch.randn(2, 3, 64, 64)
    _step(rev, x, seed=1)
    _step(plain, x, seed=1)
    for (name, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        if not a.requires_grad:
            assert a.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gradients_flow_through_autograd_not_into_grad_directly():
    """Parameter gradients are returned by the Function, so autograd.grad and hooks see them
    (DDP's reducer relies on these hooks)."""
    rev, _ = _pair(drop_path_rate=0.0, dropout_rate=0.0, head_dropout_rate=0.0)
    rev.train()
    hooked = []
    rev.blocks[0].F.attn.qkv.weight.register_hook(lambda g: hooked.append(g.norm()))
    loss = rev(torch.randn(2, 3, 64, 64)).pow(2).mean()
    params = [p for p in rev.parameters()]
    grads = torch.autograd.grad(loss, params)
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in params)  # nothing was accumulated behind autograd's back
    assert len(hooked) == 1


def test_no_grad_inference_uses_the_plain_path(monkeypatch):
    rev, _ = _pair()
    called = []
    monkeypatch.setattr(RevBackProp, "forward",
                        staticmethod(lambda *a, **k: called.append(1) or (_ for _ in ()).throw(
                            AssertionError("engine used under no_grad"))))
    rev.train()
    with torch.no_grad():
        rev(torch.randn(1, 3, 64, 64))
    rev.eval()
    with torch.no_grad():
        rev(torch.randn(1, 3, 64, 64))
    assert not called


def test_recomputation_runs_under_the_forward_autocast_state():
    rev, _ = _pair(drop_path_rate=0.0, dropout_rate=0.0, head_dropout_rate=0.0)
    rev.train()
    seen = []
    rev.blocks[0].G.register_forward_pre_hook(
        lambda m, i: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rev(torch.randn(2, 3, 64, 64)).float().pow(2).mean()
    loss.backward()
    # one call in the forward (no graph), one in the backward's recomputation (graph, autocast)
    assert seen == [(False, True), (True, True)]


def test_bf16_autocast_reversible_matches_fp32_plain():
    rev, plain = _pair(drop_path_rate=0.0, dropout_rate=0.0, head_dropout_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(rev, x, seed=0)
    _step(plain, x, seed=0)
    for (name, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        if b.grad.abs().max() < 1e-6:
            continue  # analytically ~zero gradients (key bias) are pure rounding noise
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten().float(), b.grad.flatten(), 0)
        assert cos > 0.99, (name, cos.item())


@pytest.mark.parametrize("use_rev", [True, False])
def test_check_finite_names_the_first_bad_block(use_rev):
    model = revvit_d2.create_model("rev_vit_test", depth=6, check_finite=True,
                                   use_rev_backprop=use_rev)
    with torch.no_grad():
        model.blocks[3].G.mlp.fc2.bias.fill_(float("inf"))
    model.train()
    with pytest.raises(FloatingPointError, match=r"blocks\.3 "):
        model(torch.randn(1, 3, 64, 64, requires_grad=True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_reversible_matches_plain(dtype):
    rev, plain = _pair(drop_path_rate=0.2, dropout_rate=0.0, head_dropout_rate=0.0)
    rev.cuda(), plain.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    for model in (rev, plain):
        with torch.autocast("cuda", dtype=dtype):
            _step(model, x, seed=3)
    for (name, a), (_, b) in zip(rev.named_parameters(), plain.named_parameters()):
        if b.grad.abs().max() < 1e-6:
            continue
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten().float(),
                                                    b.grad.flatten().float(), 0)
        assert cos > 0.999, (name, cos.item())


@pytest.mark.parametrize("name,shape", [("rev_vit_test", (3, 3, 64, 64)),
                                        ("rev_mvit_test", (3, 3, 64, 64))])
def test_parallel_backward_schedule_gives_the_sequential_gradients(name, shape):
    """The PaReprop schedule (inversion of block i-1 separate from block i's gradients) runs
    sequentially on the CPU; its gradients must equal the sequential reversible backward's."""
    kw = dict(drop_path_rate=0.2, dropout_rate=0.1)
    torch.manual_seed(0)
    seq = revvit_d2.create_model(name, **kw)
    torch.manual_seed(0)
    par = revvit_d2.create_model(name, parallel_backward=True, **kw)
    x = torch.randn(shape)
    for m in (seq, par):
        _step(m, x, seed=9)
    for (n, a), (_, b) in zip(par.named_parameters(), seq.named_parameters()):
        assert a.grad is not None, n
        bound = 1e-7 + 1e-4 * b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= bound, n


@pytest.mark.cuda
def test_parallel_backward_on_cuda_streams_matches_sequential():
    kw = dict(drop_path_rate=0.2, dropout_rate=0.1, depth=8)
    torch.manual_seed(0)
    seq = revvit_d2.create_model("rev_vit_test", **kw).cuda()
    torch.manual_seed(0)
    par = revvit_d2.create_model("rev_vit_test", parallel_backward=True, **kw).cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    for m in (seq, par):
        _step(m, x, seed=9)
    torch.cuda.synchronize()
    for (n, a), (_, b) in zip(par.named_parameters(), seq.named_parameters()):
        bound = 1e-6 + 1e-4 * b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= bound, n


def test_anchoring_every_k_blocks_keeps_the_gradients():
    """Re-anchoring stores the streams every k blocks: same gradients, k-block chunks."""
    rev, plain = _pair(depth=8)
    torch.manual_seed(0)
    anchored = revvit_d2.create_model("rev_vit_test", depth=8, drop_path_rate=0.3,
                                      dropout_rate=0.1, head_dropout_rate=0.1, rev_anchor_every=3)
    calls = []
    original = RevBackProp.forward

    def spy(ctx, x1, x2, spec, *params):
        calls.append(len(spec.blocks))
        return original(ctx, x1, x2, spec, *params)

    x = torch.randn(2, 3, 64, 64)
    _step(plain, x, seed=4)
    try:
        RevBackProp.forward = staticmethod(spy)
        _step(anchored, x, seed=4)
    finally:
        RevBackProp.forward = staticmethod(original)
    assert calls == [3, 3, 2]
    for (n, a), (_, b) in zip(anchored.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
