"""The memory-budget hybrid (``stored_blocks``), backward micro-chunks
(``rev_backward_chunk``) and the budget chooser: gradients against plain autograd, F/G call
counts, refusals, and the meta-device memory estimate against a real CPU trace."""
import pytest
import torch

import revvit_d2
from _helpers import step_gradients
from revvit_d2.modeling import budget
from revvit_d2.modeling.reversible import ReversibleBlock

NAMES = ["rev_vit_test", "rev_mvit_test"]


def _model(name, **kw):
    torch.manual_seed(0)  # same initial weights for every engine setting
    return revvit_d2.create_model(name, **dict(dict(drop_path_rate=0.3), **kw))


def _grads(model, x, seed=1):
    return step_gradients(model, x, seed)


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_stored_blocks_gradients_equal_plain_autograd_for_every_k(name):
    """Drop path and dropout active: the stored blocks draw the same numbers in the same
    order as the reversible forward, so every k gives plain autograd's gradients."""
    x = torch.randn(3, 3, 64, 64)
    plain = _grads(_model(name, dropout_rate=0.1, use_rev_backprop=False), x)
    depth = len(_model(name).reversible_blocks())
    for k in range(depth + 1):
        _assert_close(_grads(_model(name, dropout_rate=0.1, stored_blocks=k), x), plain)


def _calls(model, x):
    subs = [m for blk in model.reversible_blocks() for m in (blk.F, blk.G)]
    counts = {id(m): 0 for m in subs}
    hooks = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(id(m), counts[id(m)] + 1))
             for m in subs]
    try:
        _grads(model, x)
    finally:
        for h in hooks:
            h.remove()
    return [counts[id(m)] for m in subs]


@pytest.mark.parametrize("name", NAMES)
def test_stored_blocks_are_the_last_k_and_not_recomputed(name):
    model = _model(name, stored_blocks=2)
    depth = len(model.reversible_blocks())
    calls = _calls(model, torch.randn(2, 3, 64, 64))
    assert calls == [2] * 2 * (depth - 2) + [1] * 4  # F and G of each block, in order


def test_stored_blocks_validated():
    with pytest.raises(ValueError, match="stored_blocks must be an integer >= 0"):
        _model("rev_vit_test", stored_blocks=-1)
    with pytest.raises(ValueError, match="exceeds the model's 4 reversible blocks"):
        _model("rev_vit_test", stored_blocks=5)
    with pytest.raises(ValueError, match="rev_backward_chunk must be an integer >= 0"):
        _model("rev_vit_test", rev_backward_chunk=1.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk,extra", [
    (1, {}),
    (2, {"parallel_backward": True}),  # 5 samples: chunks of 2, 2, 1
    (3, {"rev_anchor_every": 2, "stored_blocks": 1}),
])
def test_backward_chunks_give_the_unchunked_gradients(name, chunk, extra):
    x = torch.randn(5, 3, 64, 64)
    whole = _grads(_model(name, **extra), x)
    _assert_close(_grads(_model(name, rev_backward_chunk=chunk, **extra), x), whole)
    plain = _grads(_model(name, use_rev_backprop=False), x)
    _assert_close(whole, plain)


def test_backward_chunks_refuse_dropout_with_one_line():
    model = _model("rev_vit_test", dropout_rate=0.1, rev_backward_chunk=2).train()
    with pytest.raises(ValueError) as err:
        model(torch.randn(4, 3, 64, 64))
    msg = str(err.value)
    assert "\n" not in msg and "rev_backward_chunk=2" in msg and "blocks.0" in msg
    model.eval()  # no active dropout in evaluation: allowed
    model(torch.randn(4, 3, 64, 64)).sum()


def test_backward_chunks_bound_the_working_set():
    """The largest graph alive in the backward is a chunk's, not the batch's: the biggest
    tensor autograd saves during the engine's recomputation has chunk rows."""
    rows = []

    def pack(t):
        rows.append(t.shape[0] if t.dim() == 3 else 0)
        return t

    model = _model("rev_vit_test", rev_backward_chunk=2).train()
    loss = model(torch.randn(6, 3, 64, 64)).sum()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss.backward()  # only the engine's recomputations save tensors during backward
    assert rows and max(rows) == 2


def _real_saved_bytes(model, shape):
    model.train()
    return budget.count_saved_bytes(model, torch.randn(shape))


@pytest.mark.parametrize("name", NAMES)
def test_fake_tensor_estimate_matches_a_real_cpu_trace(name):
    shape = (3, 64, 64)
    model = _model(name, stored_blocks=1)
    real = _real_saved_bytes(model, (2,) + shape) - _real_saved_bytes(model, (1,) + shape)
    # Within 1%: the fake CPU attention kernel may save a few small statistics differently
    # from the real one.
    assert real > 0
    assert budget.saved_bytes_per_image(model, shape) == pytest.approx(real, rel=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_estimate_grows_with_k_and_ends_at_plain_autograd(name):
    shape = (3, 64, 64)
    model = _model(name)
    peaks = budget.estimate_stored_blocks_memory(model, shape)
    depth = len(model.reversible_blocks())
    assert len(peaks) == depth + 1
    assert all(a <= b for a, b in zip(peaks, peaks[1:]))
    assert peaks[-1] > peaks[0]
    plain = _model(name, use_rev_backprop=False)
    assert peaks[-1] == budget.saved_bytes_per_image(plain, shape)
    assert model.engine.stored_blocks == 0  # the model itself is untouched


def test_choose_stored_blocks_picks_the_largest_k_that_fits():
    shape = (3, 64, 64)
    model = _model("rev_vit_test")
    peaks = budget.estimate_stored_blocks_memory(model, shape)
    mib = [p / 2**20 for p in peaks]
    assert budget.choose_stored_blocks(model, mib[-1], shape) == len(peaks) - 1
    assert budget.choose_stored_blocks(model, mib[2], shape) == max(
        k for k, m in enumerate(mib) if m <= mib[2])
    with pytest.raises(ValueError, match="below the fully reversible model's"):
        budget.choose_stored_blocks(model, mib[0] * 0.5, shape)
    chunked = _model("rev_vit_test", rev_backward_chunk=2)
    assert budget.estimate_stored_blocks_memory(chunked, shape, batch_size=8)[0] < peaks[0]
