"""Sharded (FSDP2) training through the reversible engine: ``revvit_d2.shard_model``.

2 and 4 CPU processes (gloo) train tiny Rev-ViT, Rev-MViT (image and video) and the Detectron2
Rev-ViT backbone; their gradients after ``full_tensor()`` (and their weights after SGD / AdamW
steps) must equal one process's on the same global batch, each rank its slice and its seed, with
drop path and dropout, both backward schedules, re-anchoring and backward micro-chunks. The
workers live in tests/_fsdp_worker.py; one spawn per world size runs every case.
"""
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import revvit_d2
from revvit_d2.modeling import build_model

import _fsdp_worker as worker

TESTS = Path(__file__).resolve().parent
ATOL = 1e-6

CASES_2 = [c for c in worker.CASES if c != "vit_hsdp"]
# The cases run with 4 processes (a spawn of 4 takes ~50 s on 2 busy cores): both schedules of
# both models, re-anchoring, video, optimizer steps, and HSDP (a 2 x 2 mesh).
CASES_4 = ["vit_parallel_anchor", "mvit_parallel", "mvit_video_anchor", "vit_sgd", "mvit_adamw",
           "vit_hsdp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, cases, out_dir):
    out = out_dir / f"results{world}.pt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "_fsdp_worker.py"), str(rank),
                               str(world), str(port), str(out), ",".join(cases)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise AssertionError("a worker failed:\n" + "\n".join(log[-3000:] for log in logs))
    return torch.load(out)


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _spawn(2, CASES_2, tmp_path_factory.mktemp("fsdp2"))


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _spawn(4, CASES_4, tmp_path_factory.mktemp("fsdp4"))


def _results(request, world):
    return request.getfixturevalue(f"results{world}")


def _assert_same(got, ref, what):
    """Equal to ATOL, or to ATOL times the tensor's largest entry when that is above 1 (summing
    in another order moves a float32 gradient of size 8 by a few 1e-6)."""
    assert set(got) == set(ref), f"{what}: parameters differ: {set(got) ^ set(ref)}"
    for name in ref:
        scale = max(1.0, ref[name].abs().max().item())
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= ATOL * scale, f"{what} of {name}: differs by {diff:.3g} (scale {scale:.3g})"


_GRAD_CASES = [c for c in worker.CASES if worker.CASES[c][2] is None and not worker.CASES[c][4]]
_STEP_CASES = [c for c in worker.CASES if worker.CASES[c][2] is not None]
_PARAMS = ([pytest.param(2, c, id=f"2-{c}") for c in _GRAD_CASES if c in CASES_2]
           + [pytest.param(4, c, id=f"4-{c}", marks=pytest.mark.slow)
              for c in _GRAD_CASES if c in CASES_4])
_STEP_PARAMS = ([pytest.param(2, c, id=f"2-{c}") for c in _STEP_CASES]
                + [pytest.param(4, c, id=f"4-{c}", marks=pytest.mark.slow)
                   for c in _STEP_CASES if c in CASES_4])


@pytest.mark.parametrize("world,case", _PARAMS)
def test_sharded_gradients_equal_single_process(request, world, case):
    got = _results(request, world)[case]
    ref = worker.reference(case, world)
    _assert_same(got["grads"], ref["grads"], f"{case}, {world} processes: gradient")
    # inference under no_grad goes through the blocks' own forward (FSDP2's hooks gather)
    torch.testing.assert_close(got["eval_logits"], ref["eval_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world,case", _STEP_PARAMS)
def test_optimizer_steps_give_single_process_weights(request, world, case):
    got = _results(request, world)[case]
    ref = worker.reference(case, world)
    _assert_same(got["weights"], ref["weights"], f"{case}, {world} processes: weight")
    torch.testing.assert_close(got["eval_logits"], ref["eval_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_engine_gathers_and_releases_each_block(request, world):
    """While any F or G computes, at most 2 blocks hold gathered parameters (the parallel
    schedule keeps the block whose gradients it computes and the one it recomputes; a
    prefetch in flight is not registered yet), at least one does (F and G never run on shards),
    and no block stays gathered after the backward."""
    for case, r in _results(request, world).items():
        assert r["blocks"] > 0
        parallel = worker.CASES[case][1].get("parallel_backward", False)
        assert 1 <= r["peak"] <= (2 if parallel else 1), (case, r["peak"])
        assert r["left_gathered"] == 0, case
        assert r["grad_dtypes"] == ["torch.float32"], (case, r["grad_dtypes"])


def test_compiled_blocks_were_compiled_under_fsdp(results2):
    """The vit_compiled case (gradients: test_sharded_gradients_equal_single_process) ran F and
    G as compiled graphs on the gathered parameters, not eagerly; the uncompiled cases before it
    in the same process compiled nothing."""
    order = list(results2)
    first = order.index("vit_compiled")
    assert all(results2[c]["graphs"] == 0 for c in order[:first])
    assert results2["vit_compiled"]["graphs"] >= 2


def test_mixed_precision_bf16_params_fp32_reduction(results2):
    """bf16 parameters, fp32 reduction, autocast around the forward: the sharded gradients are
    fp32 and close to the fp32 single-process ones."""
    got = results2["vit_bf16"]
    assert got["grad_dtypes"] == ["torch.float32"]
    ref = worker.reference("vit_bf16", 2)["grads"]
    assert set(got["grads"]) == set(ref)
    errors = {}
    for name, g in ref.items():
        errors[name] = float((got["grads"][name] - g).norm() / g.norm().clamp_min(1e-6))
        assert errors[name] < 0.05, (name, errors[name])
    assert max(errors.values()) > 1e-4  # it did compute in bf16


# --- one process: bad input, and a world of one ----------------------------------------------

@pytest.fixture
def world_of_one():
    """A one-process gloo group in this process; yields its CPU mesh (the default mesh would
    be on the GPU when there is one)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _tiny():
    torch.manual_seed(0)
    return build_model("rev_vit_test", depth=2, embed_dim=32, drop_path_rate=0.1)


def test_world_of_one_matches_unsharded(world_of_one, rev_backward_calls):
    x = torch.randn(2, 3, 64, 64)
    ref = _tiny()
    torch.manual_seed(1)
    ref(x).pow(2).mean().backward()
    model = revvit_d2.shard_model(_tiny(), world_of_one)
    torch.manual_seed(1)
    model(x).pow(2).mean().backward()
    assert len(rev_backward_calls) == 2  # both through the reversible engine
    for name, p in ref.named_parameters():
        got = dict(model.named_parameters())[name].grad.full_tensor()
        torch.testing.assert_close(got, p.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_every_gather_but_the_first_of_each_pass_is_prefetched(world_of_one, parallel):
    """4 blocks in 4 re-anchored runs: only the first block of the forward and the last of the
    backward are gathered on demand; every other gather was started one block ahead, across
    the runs' boundaries too."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = build_model("rev_vit_test", depth=4, embed_dim=32, rev_anchor_every=1,
                        parallel_backward=parallel)
    revvit_d2.shard_model(model, world_of_one)
    on_demand = []

    def counting(blk, original, async_op=False):
        if not async_op and isinstance(next(blk.parameters()), DTensor):
            on_demand.append(blk)  # a synchronous gather that no prefetch started
        return original(async_op=async_op)

    for blk in model.blocks:
        blk.unshard = functools.partial(counting, blk, blk.unshard)
    model(torch.randn(2, 3, 64, 64)).pow(2).mean().backward()
    assert [list(model.blocks).index(b) for b in on_demand] == [0, 3]


def test_an_error_inside_the_engine_leaves_no_block_gathered(world_of_one):
    from torch.distributed.tensor import DTensor

    model = revvit_d2.shard_model(_tiny(), world_of_one)
    x = torch.randn(2, 3, 64, 64)
    handle = model.blocks[1].G.register_forward_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(x)
    assert all(isinstance(p, DTensor) for blk in model.blocks for p in blk.parameters())
    handle.remove()
    model.reset_iter_state()  # FSDP2's own recovery of the root after an exception
    model(x).pow(2).mean().backward()  # the next step works
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kwargs,message", [
    (dict(reshard_after_forward=False), "reshard_after_forward=False cannot apply"),
    (dict(reshard_after_forward=2), "reshard_after_forward=2 cannot apply"),
    (dict(reshard_after_froward=True), "fully_shard takes no argument 'reshard_after_froward'"),
    (dict(dp_mesh_dims=object()), "dp_mesh_dims"),
])
def test_refuses_settings_that_do_not_apply(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        revvit_d2.shard_model(_tiny(), **kwargs)
    assert "\n" not in str(info.value)


def test_refuses_cpu_offload():
    from torch.distributed.fsdp import CPUOffloadPolicy

    with pytest.raises(ValueError, match="offload_policy=CPUOffloadPolicy"):
        revvit_d2.shard_model(_tiny(), offload_policy=CPUOffloadPolicy())


def test_refuses_parameters_shared_across_blocks():
    model = _tiny()
    model.blocks[1].G = model.blocks[0].G
    with pytest.raises(ValueError, match=r"parameter blocks\.0\.G\.\S+ is shared with "
                                         r"blocks\.1\.G\.") as info:
        revvit_d2.shard_model(model)
    assert "\n" not in str(info.value)


def test_refuses_block_parameter_used_outside_its_block():
    model = _tiny()
    model.extra = torch.nn.Linear(2, 2)
    model.extra.weight = model.blocks[0].F.norm.weight
    with pytest.raises(ValueError, match="is shared with"):
        revvit_d2.shard_model(model)


def test_refuses_a_model_without_reversible_blocks():
    with pytest.raises(ValueError, match="Sequential contains no ReversibleBlock"):
        revvit_d2.shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_refuses_a_model_already_sharded(world_of_one):
    model = revvit_d2.shard_model(_tiny(), world_of_one)
    with pytest.raises(ValueError, match="already sharded"):
        revvit_d2.shard_model(model)


def test_needs_a_process_group_or_mesh():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        revvit_d2.shard_model(_tiny())


@pytest.mark.cuda
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_cuda_world_of_one_matches_unsharded(parallel):
    """On a GPU (NCCL, one process): the gathered blocks' F and G, the parallel schedule (which
    runs in order on the caller's stream when blocks are sharded) and the reduce-scatter."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        ref = build_model("rev_vit_test", depth=3, embed_dim=32, drop_path_rate=0.1,
                          dropout_rate=0.1, parallel_backward=parallel).cuda()
        torch.manual_seed(0)
        model = build_model("rev_vit_test", depth=3, embed_dim=32, drop_path_rate=0.1,
                            dropout_rate=0.1, parallel_backward=parallel).cuda()
        revvit_d2.shard_model(model)
        x = torch.randn(2, 3, 64, 64, device="cuda")
        for m in (ref, model):
            torch.manual_seed(1)
            m(x).pow(2).mean().backward()
        grads = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name].grad.full_tensor(), p.grad, atol=1e-5,
                                       rtol=1e-5)
    finally:
        dist.destroy_process_group()
