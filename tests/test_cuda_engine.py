"""The reversible engine where a GPU can make it go wrong (issue #13, GPU readiness):

* the block inputs the sequential backward rebuilds equal the forward's true inputs, for every
  block, in fp32 and under bf16 and fp16 autocast, eager and with ``compile_blocks=True``. The
  forward runs F and G without grad and the backward recomputes them with grad; on a GPU,
  ``scaled_dot_product_attention`` may pick another kernel in each mode (and Inductor builds a
  graph per mode). A difference of more than a rounding fails (:data:`TOLERANCE`), naming the
  kernels each pass ran; a smaller one passes with a warning naming them;
* dropout and drop path are replayed exactly: gradients equal plain autograd's with the same
  seed, and the backward leaves the CPU and CUDA generators as the forward left them.

Every test takes the device as a parameter; the CUDA one is marked ``cuda`` (skipped without a
GPU, tests/conftest.py), the CPU one proves that the test's logic works (with
``compile_blocks=True`` it is marked ``slow``: Inductor's C++ compilation takes about 30 s).
"""
import warnings

import pytest
import torch
import torch._dynamo

import revvit_d2
from revvit_d2.modeling import reversible
from revvit_d2.modeling.reversible import ReversibleBlock

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DEPTH = 8

#: Largest relative error ``||rebuilt - true|| / ||true||`` allowed for a rebuilt block input
#: (rev_vit_test at depth 8, 64x64 images, drop path and dropout). The backward inverts the
#: blocks from the top, so block i's rebuilt inputs carry the rounding of the 8 - i inversions
#: above it: the error grows with depth (docs/results/reconstruction_error.md), and these bounds
#: are for depth 8 only. Each inversion subtracts F and G recomputed in the compute dtype, so the
#: natural scale is one rounding of that dtype (unit roundoff u: fp32 6e-8, fp16 4.9e-4, bf16
#: 3.9e-3) at every element of every branch, summed over the blocks above: simulated on the CPU
#: (:data:`ROUNDING`, each recomputed branch perturbed by u times its size) the worst block is
#: off by 9.5e-5 (fp16) and 7.5e-4 (bf16). The bounds are twice that: a kernel that differs
#: between the no-grad forward and the recomputation by a rounding (which costs no more than the
#: inversion's own rounding) passes; one that differs by more, or a wrong replay of the RNG,
#: the mask or the autocast state (O(1) errors), fails. Measured without perturbation on the
#: CPU: fp32 6e-8, fp16 1.2e-5, bf16 3e-8 (5.3e-5 with the math attention backend). fp32 cannot
#: tell kernels apart (a rounding is 6e-8); its bound is 16x the measured error.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1.5e-3}
#: Unit roundoff of each compute dtype.
ROUNDING = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    # Tiny tensors on a busy 2-core machine: one thread. Compiled graphs are process-wide:
    # start and leave each test without them, and fail rather than fall back to eager.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    fail = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    yield
    torch._dynamo.config.fail_on_recompile_limit_hit = fail
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _model(device, **kw):
    torch.manual_seed(0)  # the same initial weights for every engine setting
    kw = dict(dict(depth=DEPTH, drop_path_rate=0.2, dropout_rate=0.1, head_dropout_rate=0.0), **kw)
    return revvit_d2.create_model("rev_vit_test", **kw).to(device).train()


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def _loss(model, x, dtype, seed):
    torch.manual_seed(seed)  # the same dropout and drop-path draws for every engine setting
    with _autocast(x.device, dtype):
        logits = model(x).float()
    return logits.pow(2).mean() + logits.sum() * 1e-3


def _blocks(model):
    return [b for b in model.modules() if isinstance(b, ReversibleBlock)]


# The engine's internals this file hooks into. The sequential backward rebuilds a block's inputs
# in two functions of `reversible`, each returning (the recomputed branch, one rebuilt stream).
# Re-point these names when the engine is refactored; nothing else here depends on them.
_REBUILDERS = (("recompute_g", "x2"), ("recompute_f", "x1"))


def _spy_rebuilt_inputs(monkeypatch, perturb=None):
    """{block: {"x1": X1, "x2": X2}}, filled with copies of the inputs that the reversible
    backward rebuilds, block by block. ``perturb(out)``, if given, is subtracted from each
    rebuilt input after it is recorded, as if the recomputed branch ``out`` had come out of
    another kernel (to show that the check catches that)."""
    rebuilt = {}
    for name, stream in _REBUILDERS:
        def spy(blk, *args, _original=getattr(reversible, name), _stream=stream):
            branch, x = _original(blk, *args)
            rebuilt.setdefault(blk, {})[_stream] = x.detach().clone()
            if perturb is not None:
                x = x - perturb(branch.out.detach())
            return branch, x

        monkeypatch.setattr(reversible, name, spy)
    return rebuilt


def _true_inputs(model, x, dtype, seed):
    """{block: {"x1": X1, "x2": X2}}: every block's inputs in a plain-autograd step of the same
    model (``use_rev_backprop=False``: the blocks are called one by one), same seed."""
    inputs = {}

    def hook(blk, args):
        inputs[blk] = {"x1": args[0].detach().clone(), "x2": args[1].detach().clone()}

    handles = [b.register_forward_pre_hook(hook) for b in _blocks(model)]
    model.use_rev_backprop = False
    try:
        _loss(model, x, dtype, seed).backward()
    finally:
        model.use_rev_backprop = True
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return inputs


def _sdpa_kernels(fn):
    """Run fn() under the profiler; the attention kernels (aten ops) it called, by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    names.discard("aten::scaled_dot_product_attention")  # the dispatcher, not a kernel
    return sorted(names) or ["none recorded"]


def _sdpa_settings(device):
    """The backends ``torch.nn.attention.sdpa_kernel`` leaves enabled (CUDA)."""
    if torch.device(device).type != "cuda":
        return "CPU"
    b = torch.backends.cuda
    flags = dict(flash=b.flash_sdp_enabled(), mem_efficient=b.mem_efficient_sdp_enabled(),
                 math=b.math_sdp_enabled(), cudnn=b.cudnn_sdp_enabled())
    return "enabled: " + ", ".join(k for k, v in flags.items() if v)


def _rebuild_cases():
    for device in ("cpu", "cuda"):
        for dtype in DTYPES:
            for compiled in (False, True):
                marks = [pytest.mark.cuda] if device == "cuda" else []
                if compiled and device == "cpu":
                    marks.append(pytest.mark.slow)  # Inductor's C++ compilation: minutes
                name = f"{device}-{str(dtype)[6:]}-{'compiled' if compiled else 'eager'}"
                yield pytest.param(device, dtype, compiled, marks=marks, id=name)


def _rebuild_errors(monkeypatch, model, x, dtype, perturb=None):
    """``({"block i x1": relative error, ...}, {pass: attention kernels})``: every rebuilt block
    input against the input a plain-autograd step of the same model (same weights, same seed:
    same dropout and drop-path draws) fed that block, and the kernels each pass ran."""
    true = _true_inputs(model, x, dtype, seed=7)
    plain_kernels = _sdpa_kernels(lambda: _loss(model, x, dtype, seed=7))  # not back-propagated
    rebuilt = _spy_rebuilt_inputs(monkeypatch, perturb)
    loss = []
    rev_forward = _sdpa_kernels(lambda: loss.append(_loss(model, x, dtype, seed=7)))
    rev_backward = _sdpa_kernels(lambda: loss[0].backward())
    monkeypatch.undo()
    blocks = _blocks(model)
    assert len(true) == len(blocks) == DEPTH
    assert set(rebuilt) == set(blocks) and all(set(r) == {"x1", "x2"} for r in rebuilt.values())
    errors = {}
    for i, blk in enumerate(blocks):
        for s in ("x1", "x2"):
            t, r = true[blk][s], rebuilt[blk][s]
            assert r.shape == t.shape and r.dtype == t.dtype, (i, s)
            errors[f"block {i} {s}"] = ((r.float() - t.float()).norm() / t.float().norm()).item()
    kernels = {"plain forward (grad on)": plain_kernels, "reversible forward (no grad)":
               rev_forward, "its backward's recomputation (grad on)": rev_backward}
    return errors, kernels


@pytest.mark.parametrize("device, dtype, compiled", list(_rebuild_cases()))
def test_rebuilt_inputs_equal_forward_inputs(monkeypatch, device, dtype, compiled):
    """Every block's rebuilt (X1, X2) within :data:`TOLERANCE` of its true inputs. Drop path and
    dropout are active, so a wrong replay shows too. On failure the message names the attention
    kernels each pass ran and the backends that were enabled."""
    model = _model(device, compile_blocks=compiled)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64, device=device)
    errors, kernels = _rebuild_errors(monkeypatch, model, x, dtype)
    report = ("; ".join(f"{k}: {', '.join(v)}" for k, v in kernels.items())
              + f"; SDPA backends {_sdpa_settings(device)}")
    forward, recomputed = (kernels[k] for k in list(kernels)[1:])
    if [k for k in recomputed if not k.endswith("_backward")] != forward:
        # within tolerance, but what the issue asks to know from a GPU run
        warnings.warn(f"{device}, {dtype}, compile_blocks={compiled}: the recomputation ran "
                      f"other attention kernels than the forward ({report})")
    worst, tol = max(errors, key=errors.get), TOLERANCE[dtype]
    assert errors[worst] <= tol, (
        f"{device}, {dtype}, compile_blocks={compiled}: rebuilt input {worst} is off by "
        f"{errors[worst]:.2e} (relative) > {tol:.0e}; all: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + f". Attention kernels: {report}. If the kernels differ between the reversible "
          f"forward and the recomputation, pin one backend for both passes "
          f"(torch.nn.attention.sdpa_kernel).")


@pytest.mark.parametrize("roundings, caught", [(1, False), (4, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rebuild_check_catches_a_kernel_mismatch(monkeypatch, dtype, roundings, caught):
    """What the tolerance lets through (CPU): every recomputed branch perturbed by `roundings`
    units of the compute dtype's rounding, as if the recomputation ran another kernel than the
    forward. One rounding passes (it costs no more than the inversion's own rounding), four fail.
    """
    model = _model("cpu")
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    generator = torch.Generator().manual_seed(0)

    def another_kernel(out):
        sign = torch.randint(0, 2, out.shape, generator=generator).mul(2).sub(1)
        return sign * out.float().abs() * (roundings * ROUNDING[dtype])

    errors, _ = _rebuild_errors(monkeypatch, model, x, dtype, perturb=another_kernel)
    assert (max(errors.values()) > TOLERANCE[dtype]) is caught, max(errors.values())


def _rng_states(device):
    states = [torch.get_rng_state()]
    if torch.device(device).type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_and_drop_path_replay_against_plain_autograd(device, parallel):
    """Reversible backward (sequential and PaReprop schedules) vs plain autograd of the same
    model with dropout and drop path, same seed: equal gradients for every parameter and the
    input; the forward draws as many random numbers on both sides, and the backward (which
    replays the draws under restored RNG state) leaves the CPU and CUDA generators untouched."""
    kw = dict(embed_dim=128, num_heads=4, drop_path_rate=0.3, dropout_rate=0.2)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 64, 64, device=device)
    grads, after_forward = {}, {}
    for key, engine in (("rev", dict(parallel_backward=parallel)),
                        ("plain", dict(use_rev_backprop=False))):
        model = _model(device, **kw, **engine)
        xr = x.clone().requires_grad_(True)
        loss = _loss(model, xr, torch.float32, seed=3)
        after_forward[key] = _rng_states(device)
        loss.backward()
        after_backward = _rng_states(device)
        assert all(torch.equal(a, b) for a, b in zip(after_forward[key], after_backward)), \
            f"{key}: the backward moved a random generator"
        grads[key] = {n: p.grad for n, p in model.named_parameters()}
        grads[key]["input"] = xr.grad
        if key == "plain":  # the draws matter: another seed gives another loss
            with torch.no_grad():
                assert _loss(model, x, torch.float32, seed=4).item() != loss.item()
    assert all(torch.equal(a, b) for a, b in zip(after_forward["rev"], after_forward["plain"]))
    for n, ref in grads["plain"].items():
        got = grads["rev"][n]
        assert got is not None, n
        # CPU: the same kernels, float32 rounding of the reordered arithmetic only. CUDA:
        # kernels may differ between the no-grad forward and the recomputation (and TF32 in the
        # patch embedding's convolution): a bound relative to the gradient's scale.
        bound = 1e-6 + (1e-4 if device == "cpu" else 1e-3) * ref.abs().max().item()
        assert (got - ref).abs().max().item() <= bound, n
