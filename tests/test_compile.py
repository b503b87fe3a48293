"""torch.compile of the F and G sub-blocks under the reversible engine (issue #6): compiled and
eager models give the same outputs and gradients, the engine's recomputation runs the compiled
code, and Rev-MViT's stages stay within Dynamo's recompile limit.

The fast tests use the "aot_eager" backend (Dynamo + AOTAutograd with eager kernels: exact
comparisons, seconds of compile time); the inductor test is marked slow (C++ compilation)."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import revvit_d2
from revvit_d2.modeling.reversible import ReversibleBlock, compile_subblocks


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiled code and recompile counts are process-wide: start and leave each test clean.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spinning on a busy 2-core machine
    torch._dynamo.reset()
    fail = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a silent eager fallback fails
    yield
    torch._dynamo.config.fail_on_recompile_limit_hit = fail
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _model(name, compile_kwargs=None, **kw):
    kw = dict(dict(drop_path_rate=0.2, dropout_rate=0.1), **kw)
    torch.manual_seed(0)
    model = revvit_d2.create_model(name, **kw).train()
    return compile_subblocks(model, **compile_kwargs) if compile_kwargs is not None else model


def _run(model, x, steps=2):
    """Two training steps (the second runs on cached graphs); outputs and grads of the last."""
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = model(x)
        out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(a, b, rtol):
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=rtol)
    for n, g in b[1].items():
        assert a[1][n] is not None, n
        bound = 1e-7 + rtol * g.abs().max().item()  # key biases have ~0 gradients: global scale
        assert (a[1][n] - g).abs().max().item() <= bound, n


@pytest.mark.parametrize("name", ["rev_vit_test", "rev_mvit_test"])
def test_compiled_subblocks_equal_eager(name):
    """Drop path and dropout active: the engine replays the compiled F/G's randomness."""
    x = torch.randn(2, 3, 64, 64)
    eager = _run(_model(name), x)
    compiled_model = _model(name, dict(backend="aot_eager"))
    compiled = _run(compiled_model, x)
    assert counters["stats"]["unique_graphs"] >= 2  # F and G really were compiled
    _assert_same(compiled, eager, rtol=1e-5)
    assert list(compiled_model.state_dict()) == list(_model(name).state_dict())


def test_backward_recomputes_through_the_compiled_subblocks():
    model = _model("rev_vit_test", dict(backend="aot_eager"), depth=2)
    x = torch.randn(2, 3, 64, 64)
    _run(model, x, steps=1)
    torch._dynamo.reset()  # drop the cached graphs: whatever runs compiled now compiles anew
    counters.clear()
    out = model(x)
    forward_graphs = counters["stats"]["unique_graphs"]  # F and G without grad
    assert forward_graphs >= 2
    out.pow(2).mean().backward()
    # backward: F and G recomputed with grad, one new graph each, shared by both blocks
    assert counters["stats"]["unique_graphs"] == forward_graphs + 2


@pytest.mark.parametrize("name", ["rev_vit_test", "rev_mvit_test"])
def test_compile_blocks_option(name):
    model = revvit_d2.create_model(name, compile_blocks=True)
    blocks = [b for b in model.blocks if isinstance(b, ReversibleBlock)]
    assert blocks and all(b.F._compiled_call_impl is not None
                          and b.G._compiled_call_impl is not None for b in blocks)
    assert model.patch_embed._compiled_call_impl is None  # only the sub-blocks


@pytest.mark.slow
def test_inductor_compiled_subblocks_match_eager_and_plain():
    """The default backend (inductor, C++ kernels on the CPU). Its dropout draws differ from
    eager's, so with dropout the reference is the compiled plain-autograd model (same compiled
    sub-blocks, no reversible backward); without dropout it is the eager model."""
    x = torch.randn(2, 3, 64, 64)
    compiled = _run(_model("rev_vit_test", {}), x)
    plain = _run(_model("rev_vit_test", {}, use_rev_backprop=False), x)
    _assert_same(compiled, plain, rtol=1e-4)
    compiled = _run(_model("rev_vit_test", {}, dropout_rate=0.0), x)
    eager = _run(_model("rev_vit_test", dropout_rate=0.0), x)
    _assert_same(compiled, eager, rtol=1e-4)
