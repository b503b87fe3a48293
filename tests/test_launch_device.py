"""Which device and backend the processes of a multi-process run get, on a machine with GPUs,
tested on any machine.

detectron2's ``launch`` gives every process a GPU and NCCL whenever CUDA is available, whatever
device the config trains on. ``revvit_d2.training.launch_on`` / ``launch_guarded`` start the
processes of a CPU run with ``CUDA_VISIBLE_DEVICES=""``, so they use gloo on any machine, and
refuse more CUDA processes than GPUs in one line. A GPU machine is simulated: in this process by
patching ``torch.cuda.is_available`` / ``device_count``; in subprocesses (and the processes they
spawn) by a ``sitecustomize`` module on ``PYTHONPATH`` that patches them the same way and, like
torch, shows no GPU to a process started with ``CUDA_VISIBLE_DEVICES=""``. Without the device
choice, those processes would pick NCCL and call ``torch.cuda.set_device`` on a machine that
has no GPU, and fail.
"""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from revvit_d2.training import cli  # noqa: E402
from revvit_d2.training.cli import ToolError, launch_on, processes_use_gpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_cli_worker.py"
FAKE_GPUS = textwrap.dedent("""
    # Written by tests/test_launch_device.py: this interpreter pretends to have
    # $REVVIT_FAKE_GPUS GPUs, none when started with CUDA_VISIBLE_DEVICES="" (as torch).
    import os

    import torch

    def _device_count():
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            return 0
        return int(os.environ["REVVIT_FAKE_GPUS"])

    torch.cuda.device_count = _device_count
    torch.cuda.is_available = lambda: _device_count() > 0
    torch.cuda.revvit_fake_gpus = int(os.environ["REVVIT_FAKE_GPUS"])
""")


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees n GPUs (0: none)."""
    def set_count(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    return set_count


@pytest.mark.parametrize("count,device,processes,expected", [
    (0, "cuda", 2, False),  # no CUDA: CPU processes whatever the config says (gloo)
    (0, None, 4, False),
    (4, "cpu", 2, False),  # a CPU run on a GPU machine: gloo, not NCCL
    (4, torch.device("cpu"), 8, False),  # more CPU processes than GPUs is fine
    (1, "cpu", 2, False),
    (4, "cuda", 2, True),
    (4, "cuda:1", 4, True),
    (4, None, 4, True),  # None and "auto": CUDA when available (detectron2's choice)
    (2, "auto", 2, True),
])
def test_processes_use_gpus_for_cuda_devices_only(gpus, count, device, processes, expected):
    gpus(count)
    assert processes_use_gpus(device, processes) is expected


@pytest.mark.parametrize("device", ["cuda", None, "auto"])
def test_more_cuda_processes_than_gpus_is_a_tool_error(gpus, device):
    gpus(1)
    with pytest.raises(ToolError, match=r"2 processes .* need one GPU each, but 1 GPU\(s\) are "
                                         r"visible; .*train\.device=cpu"):
        processes_use_gpus(device, 2)


@pytest.mark.parametrize("before", [None, "0,1,2,3"])
@pytest.mark.parametrize("device,processes,machines,hidden", [
    ("cpu", 2, 1, True),  # the spawned processes see no GPU: detectron2 picks gloo
    ("cpu", 1, 2, True),  # one process on each of two machines: still distributed
    ("cpu", 1, 1, False),  # one process in all: runs here, nothing to hide
    ("cuda", 2, 1, False),  # one GPU per process, NCCL
])
def test_launch_on_hides_the_gpus_from_cpu_processes(gpus, monkeypatch, before, device,
                                                      processes, machines, hidden):
    gpus(4)
    if before is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    seen = []

    def fake_launch(main_func, num, num_machines, machine_rank, dist_url, args):
        seen.append((os.environ.get("CUDA_VISIBLE_DEVICES"), num, num_machines, args))
        raise KeyboardInterrupt  # the environment is restored however launch ends

    monkeypatch.setattr(cli, "launch", fake_launch)
    with pytest.raises(KeyboardInterrupt):
        launch_on(device, print, processes, num_machines=machines, args=(1,))
    assert seen == [("" if hidden else before, processes, machines, (1,))]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tools_tell_launch_the_configured_device(tmp_path, monkeypatch):
    """What each tool's check hands to launch_guarded: the config's ``train.device``."""
    # importing a tool extends PYTHONWARNINGS (quiet_import_warnings): restored afterwards
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))
    train_net = _tool("train_net")
    args = types.SimpleNamespace(config_file=None, opts=[], num_gpus=2, num_machines=1)
    assert train_net.launch_device(args) == "cpu"  # the demo config trains on the CPU
    args.opts = ["train.device=cuda"]
    assert train_net.launch_device(args) == "cuda"
    args.num_gpus = 1
    assert train_net.launch_device(args) is None  # one process: nothing to launch

    run_video = _tool("run_video")
    videos = tmp_path / "val.csv"
    videos.write_text("clip.mp4 0\n")  # only the list is read before the launch
    args = types.SimpleNamespace(config_file=None, num_gpus=2, num_machines=1, eval_only=True,
                                 resume=False, opts=[f"dataloader.test.data_path={videos}",
                                                     f"train.output_dir={tmp_path / 'out'}"])
    assert run_video.check_inputs(args) == "auto"  # the demo: CUDA when available
    args.opts.append("train.device=cpu")
    assert run_video.check_inputs(args) == "cpu"


def _run(cmd, fake_gpus, tmp_path, timeout=300):
    """`cmd` in a subprocess (and the processes it spawns) on a machine with `fake_gpus` GPUs."""
    site = tmp_path / "fake_gpus"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAKE_GPUS)
    path = os.pathsep.join([str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                     if p])
    env = dict(os.environ, PYTHONPATH=path, REVVIT_FAKE_GPUS=str(fake_gpus), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", REVVIT_DATASETS=str(ROOT / "datasets"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(tmp_path))
    return proc, [line for line in proc.stderr.splitlines() if line.strip()]


def test_too_many_cuda_processes_is_one_line_before_any_process_starts(tmp_path):
    proc, lines = _run([sys.executable, str(WORKER), "succeeds", "2", "cuda"], 1, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "need one GPU each, but 1 GPU(s) are visible" in lines[0], lines
    assert "trained" not in proc.stdout


@pytest.mark.slow
def test_cpu_processes_use_gloo_on_a_gpu_machine(tmp_path):
    proc, _ = _run([sys.executable, str(WORKER), "backend", "2", "cpu"], 4, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the parent saw 4 GPUs, the processes none, and they talk over gloo (the two processes
    # share the pipe, so one's line may be cut by the other's: match the reports, not lines)
    reports = re.findall(r"rank \d+ backend \w+ cuda \w+ fake \d+", proc.stdout)
    assert sorted(reports) == [
        f"rank {r} backend gloo cuda False fake 4" for r in (0, 1)], proc.stdout


@pytest.mark.slow
def test_train_net_cpu_processes_on_a_gpu_machine(tmp_path):
    """The demo config trains on the CPU: its two processes reach the tool's own checks (gloo)
    on a machine with two GPUs, where detectron2 alone would have started them on NCCL."""
    missing = tmp_path / "no_such.pth"
    proc, lines = _run([sys.executable, str(ROOT / "tools" / "train_net.py"), "--num-gpus", "2",
                        f"train.init_checkpoint={missing}",
                        f"train.output_dir={tmp_path / 'out'}"], 2, tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert lines == [f"error: train.init_checkpoint not found: {missing}"], lines
