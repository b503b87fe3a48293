"""Mixed precision through the reversible backward (issue #6): fp16 and bf16 autocast gradients
against fp32 plain autograd at depth 24, and fp16 training with a GradScaler, including steps
whose gradients overflow. Each test runs on the CPU (autocast "cpu" supports both half types)
and on CUDA (marked ``cuda``, skipped without a GPU)."""
import pytest
import torch

import revvit_d2

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: on a busy 2-core machine two OpenMP threads spin against each
    # other and a step takes seconds instead of tens of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(device, use_rev_backprop=True, depth=24, **kw):
    kw = dict(dict(drop_path_rate=0.2, dropout_rate=0.0, head_dropout_rate=0.0), **kw)
    torch.manual_seed(0)  # same init for every call
    return revvit_d2.create_model("rev_vit_test", depth=depth, use_rev_backprop=use_rev_backprop,
                                  **kw).to(device).train()


def _loss(model, x, dtype, seed):
    torch.manual_seed(seed)  # same drop-path masks for every model
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    logits = logits.float()
    return logits.pow(2).mean() + logits.sum() * 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_reversible_grads_match_fp32_plain_at_depth_24(device, dtype):
    """Per parameter tensor, cosine >= 0.999 between the reversible backward under autocast and
    fp32 plain autograd, for every parameter (drop path active)."""
    rev, ref = _model(device), _model(device, use_rev_backprop=False)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, device=device)
    _loss(rev, x, dtype, seed=3).backward()
    _loss(ref, x, None, seed=3).backward()
    cosines = []
    for (n, a), (_, b) in zip(rev.named_parameters(), ref.named_parameters()):
        if not b.grad.any():  # a block whose drop-path mask dropped the whole batch
            assert not a.grad.any(), n
            continue
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten().double(),
                                                    b.grad.flatten().double(), 0)
        cosines.append((cos.item(), n))
    assert len(cosines) > 250 and min(cosines)[0] >= 0.999, min(cosines)


def _train(model, batches, scaler, lr=0.05):
    """fp16 autocast SGD steps with the scaler; per step: (scale used, step taken?)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    log = []
    for i, x in enumerate(batches):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        scale = scaler.get_scale()
        scaler.scale(_loss(model, x, torch.float16, seed=i)).backward()
        scaler.step(opt)
        scaler.update()
        # a skipped step leaves every parameter bit-identical
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        log.append((scale, moved))
    return log


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_skips_overflowing_steps_and_training_continues(device):
    """The scaler starts at 2**24, so the first scaled gradients overflow fp16 inside the
    reversible backward; step 5 has an inf in its input. The scaler must skip those steps
    (parameters untouched), halving its scale after each skip, and the reversible model must
    follow plain autograd under the same fp16 recipe step for step: a skipped step leaves
    nothing corrupted behind (streams, RNG, drop-path masks)."""
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 64, 64, device=device) for _ in range(7)]
    batches[5][0, 0, 5, 5] = float("inf")
    models = {"rev": _model(device, depth=8), "plain": _model(device, False, depth=8)}
    logs = {}
    for name, model in models.items():
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 24, growth_interval=1000)
        logs[name] = _train(model, batches, scaler)
    log = logs["rev"]
    assert logs["plain"] == log
    assert not log[0][1] and not log[5][1], log  # overflow at 2**24; inf input
    assert sum(taken for _, taken in log) >= 2, log  # a smaller scale fits: training goes on
    for (s0, taken), (s1, _) in zip(log, log[1:]):
        assert s1 == (s0 if taken else s0 / 2), log
    for (n, a), (_, b) in zip(models["rev"].named_parameters(), models["plain"].named_parameters()):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_training_tracks_fp32(device):
    """A few fp16 + GradScaler steps through the reversible backward stay close to fp32
    training of the same model with plain autograd (same data, same drop-path masks)."""
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 64, 64, device=device) for _ in range(3)]
    rev, ref = _model(device, depth=8), _model(device, False, depth=8)
    log = _train(rev, batches, torch.amp.GradScaler(device, init_scale=2.0 ** 10))
    assert all(taken for _, taken in log)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for i, x in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        _loss(ref, x, None, seed=i).backward()
        opt.step()
    start = _model(device, False, depth=8)
    for (n, a), (_, b), (_, p0) in zip(rev.named_parameters(), ref.named_parameters(),
                                       start.named_parameters()):
        update_rev, update_ref = (a - p0).flatten().double(), (b - p0).flatten().double()
        if update_ref.abs().max() == 0:
            continue
        cos = torch.nn.functional.cosine_similarity(update_rev, update_ref, 0).item()
        assert cos >= 0.999, (n, cos)
