"""DDP with the reversible backward: 2 CPU processes (gloo, also on a machine with GPUs) started
by detectron2's launch match one process with the same global batch, with the default bucketed
all-reduce (no find_unused_parameters, no static_graph)."""
import socket

import pytest
import torch

from revvit_d2.training.cli import launch_on

import _ddp_worker as worker


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    # launch_on("cpu"): detectron2's launch with processes that see no GPU, so that it picks
    # gloo for the CPU models here (NCCL and one GPU per process where CUDA is available)
    launch_on("cpu", worker.ddp_main, 2, num_machines=1, machine_rank=0,
              dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(str(out),))
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2

    images, labels = worker.classifier_batch()
    single = worker.classifier_grads(worker.build_classifier(), images, labels)
    assert set(single) == set(ddp["classifier"])
    for name, g in single.items():
        torch.testing.assert_close(ddp["classifier"][name], g, atol=1e-6, rtol=1e-5, msg=name)

    batch = worker.detector_batch()
    single_det = worker.detector_grads(worker.build_detector(), batch + batch)
    assert set(single_det) == set(ddp["detector"])
    for name, g in single_det.items():
        torch.testing.assert_close(ddp["detector"][name], g, atol=1e-6, rtol=1e-4, msg=name)
