"""The parallel (PaReprop) backward: no F or G evaluated more often than in the sequential
backward, the same gradients as the sequential backward and as plain autograd, and (CUDA) the
two-stream hand-overs hold when one stream is delayed."""
import pytest
import torch

import revvit_d2
from _helpers import step_gradients
from revvit_d2.modeling import parallel
from revvit_d2.modeling.reversible import ReversibleBlock

KW = dict(drop_path_rate=0.3, dropout_rate=0.1)


def _model(name, **kw):
    torch.manual_seed(0)  # same initial weights for every engine setting
    return revvit_d2.create_model(name, **dict(KW, **kw))


def _sub_blocks(model):
    return [m for blk in model.blocks if isinstance(blk, ReversibleBlock) for m in (blk.F, blk.G)]


def _calls_per_sub_block(model, x):
    counts = {id(m): 0 for m in _sub_blocks(model)}
    handles = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(id(m), counts[id(m)] + 1))
               for m in _sub_blocks(model)]
    try:
        step_gradients(model, x, seed=1)
    finally:
        for h in handles:
            h.remove()
    return list(counts.values())


@pytest.mark.parametrize("anchor", [0, 3])
@pytest.mark.parametrize("name", ["rev_vit_test", "rev_mvit_test"])
def test_parallel_backward_evaluates_f_and_g_no_more_than_sequential(name, anchor):
    x = torch.randn(2, 3, 64, 64)
    seq = _calls_per_sub_block(_model(name, rev_anchor_every=anchor), x)
    par = _calls_per_sub_block(_model(name, rev_anchor_every=anchor, parallel_backward=True), x)
    plain = _calls_per_sub_block(_model(name, use_rev_backprop=False), x)
    assert plain == [1] * len(plain)
    assert seq == [2] * len(seq)  # the forward, and one recomputation in the backward
    assert par == seq


@pytest.mark.parametrize("anchor", [0, 3])
@pytest.mark.parametrize("name", ["rev_vit_test", "rev_mvit_test"])
def test_parallel_backward_gradients_equal_sequential_and_plain(name, anchor):
    """Drop path and dropout active; every parameter's and the input's gradient. On the CPU the
    parallel schedule does the sequential backward's arithmetic in another order: equal bits."""
    x = torch.randn(3, 3, 64, 64)
    par = step_gradients(_model(name, rev_anchor_every=anchor, parallel_backward=True), x, seed=9)
    seq = step_gradients(_model(name, rev_anchor_every=anchor), x, seed=9)
    plain = step_gradients(_model(name, use_rev_backprop=False), x, seed=9)
    assert par.keys() == seq.keys() == plain.keys()
    for n in par:
        assert par[n] is not None, n
        assert torch.equal(par[n], seq[n]), n
        torch.testing.assert_close(par[n], plain[n], atol=1e-6, rtol=1e-4, msg=n)


def test_parallel_schedule_recomputes_one_block_ahead(monkeypatch):
    """Block i-1's recomputation is issued before block i's gradient step (what the side
    stream overlaps on a GPU), and each block is recomputed exactly once."""
    order = []
    recompute, gradient = parallel._recompute_block, parallel._gradient_step

    def spy_recompute(spec, records, autocast, i, y1, y2):
        order.append(("recompute", i))
        return recompute(spec, records, autocast, i, y1, y2)

    def spy_gradient(cur, dy1, dy2, grads):
        order.append(("gradient", len([e for e in order if e[0] == "gradient"])))
        return gradient(cur, dy1, dy2, grads)

    monkeypatch.setattr(parallel, "_recompute_block", spy_recompute)
    monkeypatch.setattr(parallel, "_gradient_step", spy_gradient)
    model = _model("rev_vit_test", parallel_backward=True)
    step_gradients(model, torch.randn(2, 3, 64, 64), seed=0)
    n = len(model.blocks)
    expected = [("recompute", n - 1)]
    for k, i in enumerate(range(n - 1, -1, -1)):
        if i > 0:
            expected.append(("recompute", i - 1))
        expected.append(("gradient", k))
    assert order == expected


@pytest.mark.cuda
@pytest.mark.parametrize("delayed", ["side", "main"])
def test_cuda_two_stream_race_against_plain_autograd(monkeypatch, delayed):
    """Delay one stream's work (recomputation and gradient steps) by a spin kernel, with tensors
    large enough that a missing wait or a reused buffer shows; the gradients must still equal
    plain autograd's, and the CUDA generator is left as the forward left it."""
    side = parallel.side_stream(torch.device("cuda"))
    main = torch.cuda.current_stream()

    def delay():
        current = torch.cuda.current_stream()
        if current == (side if delayed == "side" else main):
            torch.cuda._sleep(2_000_000)  # ~1 ms of spinning on that stream

    recompute, gradient = parallel._recompute_block, parallel._gradient_step

    def slow_recompute(*a):
        delay()
        return recompute(*a)

    def slow_gradient(*a):
        delay()
        return gradient(*a)

    monkeypatch.setattr(parallel, "_recompute_block", slow_recompute)
    monkeypatch.setattr(parallel, "_gradient_step", slow_gradient)
    kw = dict(depth=8, embed_dim=256, num_heads=4, drop_path_rate=0.2, dropout_rate=0.1)
    par = _model("rev_vit_test", parallel_backward=True, **kw).cuda().train()
    plain = _model("rev_vit_test", use_rev_backprop=False, **kw).cuda().train()
    x = torch.randn(16, 3, 64, 64, device="cuda")
    grads = {}
    for key, model in (("par", par), ("plain", plain)):
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        logits = model(xr)
        after_forward = torch.cuda.get_rng_state()
        (logits.pow(2).mean() + logits.sum() * 1e-3).backward()
        assert torch.equal(torch.cuda.get_rng_state(), after_forward)
        grads[key] = dict(model.named_parameters(), input=xr)
    torch.cuda.synchronize()
    for n, p in grads["par"].items():
        ref = grads["plain"][n].grad
        bound = 1e-5 + 1e-3 * ref.abs().max().item()
        assert (p.grad - ref).abs().max().item() <= bound, n


@pytest.mark.cuda
def test_cuda_one_side_stream_per_device_reused():
    model = _model("rev_vit_test", parallel_backward=True, rev_anchor_every=3, depth=8).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    step_gradients(model, x, seed=0)
    stream = parallel.side_stream(torch.device("cuda"))
    streams = dict(parallel._SIDE_STREAMS)
    step_gradients(model, x, seed=1)  # three anchor chunks, a second backward call
    assert len(streams) == 1 and parallel._SIDE_STREAMS == streams
    assert parallel.side_stream(torch.device("cuda")) is stream
