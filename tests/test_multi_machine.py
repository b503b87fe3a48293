"""Several machines, simulated by several launches on one host (CPU processes, gloo).

* what torchrun's and SLURM's environments mean (``launch_plan``, fake environments);
* the join (``revvit_d2.training.launch``): two launches of two processes each meet; every bad
  launch ends with one ``error:`` line per launch, exit status 1, no traceback, within
  ``--dist-timeout`` (6 s here when no peer comes, 20 s when peers start) plus the start-up of
  the interpreter: a peer that never shows up, machine 0 unreachable, a port already in use, launches that disagree on
  ``--num-machines`` or ``--num-gpus``, a machine rank taken twice or out of range,
  ``--dist-url auto`` or a URL that is not ``tcp://`` with several machines;
* the tools: ``tools/train_net.py`` and ``tools/run_video.py`` launched as machine 0 and
  machine 1 (``--num-gpus 1`` each) log the losses of one launch of two processes (and of
  torchrun's two processes), and machine 0 writes the checkpoint; with ``train.fsdp.enabled``
  too (skipped while the tools have no ``train.fsdp``).

The light launches use tests/_launch_worker.py (the tools' parser and launch, no model).
"""
import os
import re
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _runs import metrics_losses  # noqa: E402
from revvit_d2.training.launch import (  # noqa: E402
    LaunchError,
    LaunchPlan,
    first_slurm_host,
    launch,
    launch_plan,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_launch_worker.py"
TRAIN_NET = ROOT / "tools" / "train_net.py"
RUN_VIDEO = ROOT / "tools" / "run_video.py"
ENV = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
JOIN = 20  # --dist-timeout of the bad launches whose peers do start, seconds
ALONE = 6  # --dist-timeout of a launch whose peer never comes: the whole wait is this bound
STARTUP = 90  # allowance for starting an interpreter and importing detectron2 on a busy machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# The numbers: flags, torchrun, SLURM (fake environments)
# ------------------------------------------------------------------------------------------
TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
SLURM_PER_NODE = {"SLURM_JOB_ID": "4321", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
                  "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                  "SLURM_JOB_NODELIST": "gpu[07-08]"}
SLURM_PER_PROCESS = {"SLURM_JOB_ID": "4321", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
                     "SLURM_NODEID": "1", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
                     "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_ADDR": "gpu07",
                     "MASTER_PORT": "29400"}


def test_torchrun_environment_is_read_automatically():
    plan = launch_plan(environ=TORCHRUN)
    assert plan == LaunchPlan(num_processes=2, num_machines=2, machine_rank=1,
                              dist_url="tcp://10.1.2.3:29500", local_rank=1, agent_store=True,
                              source="torchrun")
    assert plan.world_size == 4
    # the flags' defaults, or the same numbers, are fine
    assert launch_plan(2, 2, 1, environ=TORCHRUN) == plan
    # without torchrun's run id the variables are not ours to read
    plain = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    assert launch_plan(4, 1, 0, "auto", environ=plain) == LaunchPlan(4, 1, 0, "auto")
    assert launch_plan(environ=plain, launcher="torchrun") == plan


def test_slurm_one_task_per_node_starts_the_processes():
    plan = launch_plan(4, launcher="slurm", environ=SLURM_PER_NODE)
    # the first node of the list, and a port of the job's own
    assert plan == LaunchPlan(num_processes=4, num_machines=2, machine_rank=1,
                              dist_url="tcp://gpu07:24321", local_rank=None, source="slurm")


def test_slurm_one_task_per_process():
    plan = launch_plan(launcher="slurm", environ=SLURM_PER_PROCESS)
    assert plan == LaunchPlan(num_processes=4, num_machines=2, machine_rank=1,
                              dist_url="tcp://gpu07:29400", local_rank=2, source="slurm")
    step = dict(SLURM_PER_PROCESS, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2",
                SLURM_PROCID="1", SLURM_LOCALID="0")  # srun's step, inside a larger job
    assert launch_plan(launcher="slurm", environ=step).num_processes == 1


def test_slurm_is_never_guessed():
    """A batch script running the tool without srun has the same variables as one task."""
    assert launch_plan(2, environ=SLURM_PER_PROCESS).source == "flags"


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[07-08]", "gpu07"), ("node001", "node001"), ("a[3,5-9],b1", "a3"),
    ("node[010-012],login", "node010"), ("n1,n2", "n1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_machines=2, machine_rank=2), r"--machine-rank 2 is out of range for "
                                           r"--num-machines 2 \(0 to 1\)"),
    (dict(num_machines=2, machine_rank=-1), r"--machine-rank -1 is out of range"),
    (dict(num_machines=0), r"--num-machines must be >= 1"),
    (dict(num_processes=0, num_machines=2, dist_url="tcp://h:1"),
     r"--num-gpus \(processes per machine\) must be >= 1"),
    (dict(num_processes=-1), r"--num-gpus \(processes per machine\) must be >= 1"),
    (dict(num_machines=2, dist_url="auto"), r"--dist-url auto picks a port on one machine"),
    (dict(num_machines=2), r"--num-machines 2 needs --dist-url tcp://HOST:PORT"),
    (dict(num_machines=2, dist_url="127.0.0.1:1234"), r"--dist-url must be tcp://HOST:PORT"),
    (dict(num_processes=2, dist_url="tcp://127.0.0.1"), r"--dist-url must be tcp://HOST:PORT"),
    (dict(num_machines=2, dist_url="tcp://h:port"), r"--dist-url must be tcp://HOST:PORT"),
    (dict(launcher="mpi"), r"unknown launcher 'mpi'"),
    (dict(launcher="torchrun", environ={}), r"\$WORLD_SIZE is not set"),
    (dict(num_machines=3, environ=TORCHRUN), r"--num-machines 3 disagrees with the torchrun "
                                             r"environment \(2\)"),
    (dict(num_processes=8, environ=TORCHRUN), r"--num-gpus 8 disagrees"),
    (dict(environ=dict(TORCHRUN, WORLD_SIZE="5")), r"WORLD_SIZE 5 is not a multiple of "
                                                   r"LOCAL_WORLD_SIZE 2"),
    (dict(launcher="slurm", environ=dict(SLURM_PER_PROCESS, SLURM_NTASKS="7")),
     r"7 tasks on 2 nodes"),
    (dict(launcher="slurm", environ=dict(SLURM_PER_PROCESS, SLURM_PROCID="3")),
     r"--distribution=block"),
    (dict(launcher="slurm", environ=dict(SLURM_PER_NODE, SLURM_NODEID="x")),
     r"\$SLURM_NODEID is not an integer: 'x'"),
])
def test_bad_plans_are_one_line_errors(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(LaunchError, match=message):
        launch_plan(**kwargs)


def test_one_machine_defaults_to_a_free_port():
    """detectron2's parser default is one fixed port per user, taken by a second run."""
    from revvit_d2.training.cli import tool_parser

    args = tool_parser("Doc.\n\nMore.", "cfg.py").parse_args(["--num-gpus", "2"])
    assert args.dist_url is None and args.dist_timeout == 300 and args.launcher == "auto"
    assert launch_plan(2, 1, 0, args.dist_url, environ={}).dist_url is None  # launch: auto


def test_one_process_runs_here():
    seen = []
    launch(seen.append, 1, args=("here",))
    launch(seen.append, 0, args=("no GPU",))  # detectron2's --num-gpus 0 (eval_imagenet)
    assert seen == ["here", "no GPU"]
    assert launch_plan(0, environ={}).world_size == 0


# ------------------------------------------------------------------------------------------
# The join, through the tools' parser and launch (tests/_launch_worker.py)
# ------------------------------------------------------------------------------------------
def _start(script, args, cwd=ROOT, env=None):
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=str(cwd),
                            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    proc.started = time.monotonic()
    return proc


def _finish(proc, timeout=900):
    """(exit status, stdout, stderr lines that are not blank, seconds)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"no end within {timeout} s (a hang):\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, [l for l in err.splitlines() if l.strip()], \
        time.monotonic() - proc.started


def _machine(rank, machines, url, *extra, timeout=JOIN, script=WORKER, env=None):
    return _start(script, ["--num-machines", machines, "--machine-rank", rank, "--dist-url", url,
                           "--dist-timeout", timeout, *extra], env=env)


def _assert_one_error(proc, pattern, bound=JOIN + STARTUP):
    code, out, err, seconds = _finish(proc)
    assert code == 1, (out[-2000:], err)
    assert "Traceback" not in "\n".join(err), err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and len(err) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert seconds < bound, f"{seconds:.0f} s: {errors[0]}"
    return errors[0]


@pytest.mark.slow
def test_two_launches_of_two_processes_join():
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = [_machine(r, 2, url, "--num-gpus", 2) for r in (1, 0)]  # machine 1 starts first
    outs = []
    for proc in procs:
        code, out, err, _ = _finish(proc)
        assert code == 0 and err == [], err
        outs.append(out)
    lines = sorted(line for out in outs for line in out.splitlines() if line.startswith("joined"))
    assert lines == [f"joined rank {r} of 4 local {r % 2} of 2" for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("tasks,nodes", [(2, 2), (2, 1)], ids=["task-per-node", "task-per-process"])
def test_srun_tasks_join(tasks, nodes):
    """Two srun tasks, faked on one host: one per node (each starts its process), or two on
    one node (each is a process)."""
    base = dict(ENV, SLURM_JOB_ID="77", SLURM_NTASKS=str(tasks), SLURM_NNODES=str(nodes),
                SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
    procs = []
    for task in range(tasks):
        node, local = (task, 0) if nodes == tasks else (0, task)
        env = dict(base, SLURM_PROCID=str(task), SLURM_NODEID=str(node), SLURM_LOCALID=str(local))
        procs.append(_start(WORKER, ["--launcher", "slurm", "--dist-timeout", 60], env=env))
    lines = []
    for proc in procs:
        code, out, err, _ = _finish(proc)
        assert code == 0 and err == [], err
        lines += [line for line in out.splitlines() if line.startswith("joined")]
    local = "local {} of 1" if nodes == tasks else "local {} of 2"
    assert sorted(lines) == [f"joined rank {r} of 2 " + local.format(0 if nodes == tasks else r)
                             for r in range(2)]


@pytest.mark.slow
def test_a_peer_that_never_shows_up():
    line = _assert_one_error(_machine(0, 2, f"tcp://127.0.0.1:{_free_port()}", timeout=ALONE),
                             r"machine 1 of 2 did not join at tcp://127\.0\.0\.1:\d+ within "
                             rf"{ALONE} s")
    assert "--dist-timeout" in line


@pytest.mark.slow
def test_machine_0_unreachable():
    _assert_one_error(_machine(1, 2, f"tcp://127.0.0.1:{_free_port()}", timeout=ALONE),
                      r"machine 0 did not answer at --dist-url tcp://127\.0\.0\.1:\d+ within "
                      rf"{ALONE} s")


@pytest.mark.slow
def test_a_port_in_use_by_another_program():
    """Machine 0 cannot host the rendezvous; machine 1 reaches a program that never answers
    (a TCPStore client would wait for it forever)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        url = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        first, second = _machine(0, 2, url, timeout=ALONE), _machine(1, 2, url, timeout=ALONE)
        _assert_one_error(first, r"port \d+ of --dist-url tcp://127\.0\.0\.1:\d+ is already in "
                                 r"use on this machine")
        _assert_one_error(second, r"machine 0 did not answer")


@pytest.mark.slow
@pytest.mark.parametrize("flag,values,pattern", [
    ("--num-machines", (2, 3), r"--num-machines differs between the launches: "),
    ("--num-gpus", (2, 1), r"--num-gpus \(processes per machine\) differs between the "
                           r"launches: "),
], ids=["num-machines", "num-gpus"])
def test_launches_that_disagree(flag, values, pattern):
    url = f"tcp://127.0.0.1:{_free_port()}"
    machines = {"--num-machines": values, "--num-gpus": (2, 2)}[flag]
    extra = {"--num-machines": ((), ()), "--num-gpus": (("--num-gpus", values[0]),
                                                        ("--num-gpus", values[1]))}[flag]
    procs = [_machine(r, machines[r], url, *extra[r]) for r in (0, 1)]
    for proc in procs:  # each launch names the problem, long before the timeout
        _assert_one_error(proc, pattern, bound=STARTUP)


@pytest.mark.slow
def test_a_machine_rank_taken_twice(tmp_path):
    """Two launches say --machine-rank 1: the second to reach machine 0 ends with the error;
    the first and machine 0 make the run, which stays up (REVVIT_TEST_HOLD) until the error
    is seen, so that the late launch always finds the rendezvous."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    hold = tmp_path / "release"
    env = dict(ENV, REVVIT_TEST_HOLD=str(hold))
    first = _machine(0, 2, url, timeout=60, env=env)
    twins = [_machine(1, 2, url, timeout=60, env=env) for _ in range(2)]
    deadline = time.monotonic() + 60 + STARTUP
    while all(t.poll() is None for t in twins) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [t for t in twins if t.poll() is not None]
    hold.touch()
    assert late, "neither launch of machine rank 1 ended"
    _assert_one_error(late[0], r"machine rank 1 joined twice at tcp://127\.0\.0\.1:\d+: give "
                               r"each launch its own --machine-rank \(0 to 1\)",
                      bound=60 + STARTUP)
    for proc in [first] + [t for t in twins if t is not late[0]]:  # these two make the run
        code, out, err, _ = _finish(proc)
        assert code == 0, err


@pytest.mark.parametrize("args,pattern", [
    (["--num-machines", 2, "--machine-rank", 2], r"--machine-rank 2 is out of range"),
    (["--num-machines", 2, "--machine-rank", 1, "--dist-url", "auto"],
     r"--dist-url auto picks a port on one machine"),
    (["--num-machines", 2, "--machine-rank", 1, "--dist-url", "http://h:1"],
     r"--dist-url must be tcp://HOST:PORT"),
])
def test_bad_flags_stop_before_any_process_starts(args, pattern):
    _assert_one_error(_start(WORKER, args), pattern, bound=STARTUP)


@pytest.mark.slow
def test_the_tools_report_a_missing_machine(tmp_path):
    """Through a tool (the join is the one launch code of both tools; run_video's two-machine
    runs are tested below)."""
    proc = _machine(0, 2, f"tcp://127.0.0.1:{_free_port()}", *DETECTION,
                    f"train.output_dir={tmp_path / 'out'}", script=TRAIN_NET, timeout=ALONE)
    _assert_one_error(proc, r"machine 1 of 2 did not join at tcp://127\.0\.0\.1:\d+ within "
                            rf"{ALONE} s")


def test_torchrun_and_slurm_flags_in_the_tools_help():
    for tool in (TRAIN_NET, RUN_VIDEO):
        out = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True,
                             text=True, env=ENV, timeout=300).stdout
        for needle in ("--num-machines", "--machine-rank", "--dist-url", "--dist-timeout",
                       "--launcher"):
            assert needle in out, (tool.name, needle)


# ------------------------------------------------------------------------------------------
# The tools
# ------------------------------------------------------------------------------------------
DETECTION = ["model.backbone.net.depth=2", "model.roi_heads.batch_size_per_image=32",
             "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
             "dataloader.evaluator=null", "train.max_iter=3", "train.log_period=1",
             "train.checkpointer.period=2", "train.seed=5", "train.device=cpu"]


_losses = metrics_losses


def _two_machines(tool, out_dir: Path, args, cwd=ROOT):
    """Machine 1 and machine 0 (one process each) of one run; returns machine 0's stdout."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = [_start(tool, ["--num-gpus", 1, "--num-machines", 2, "--machine-rank", rank,
                           "--dist-url", url, "--dist-timeout", 120, *args,
                           f"train.output_dir={out_dir}"], cwd) for rank in (1, 0)]
    results = [_finish(proc) for proc in procs]
    for code, out, err, _ in results:
        assert code == 0, (out[-3000:], err[-30:])
    assert not any(line.startswith("error:") for _, _, err, _ in results for line in err)
    return results[1][1]


def _one_launch(tool, out_dir: Path, args, cwd=ROOT):
    code, out, err, _ = _finish(_start(tool, ["--num-gpus", 2, *args,
                                              f"train.output_dir={out_dir}"], cwd))
    assert code == 0, (out[-3000:], err[-30:])
    return out


@pytest.fixture(scope="module")
def detection_reference(tmp_path_factory):
    """The losses of one launch of two processes."""
    out = tmp_path_factory.mktemp("one_launch")
    _one_launch(TRAIN_NET, out, DETECTION)
    return _losses(out)


@pytest.mark.slow
def test_train_net_on_two_machines_matches_one_launch(tmp_path, detection_reference):
    _two_machines(TRAIN_NET, tmp_path, DETECTION)
    assert _losses(tmp_path) == detection_reference
    assert sorted(detection_reference) == [0, 1, 2]
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert (tmp_path / "log.txt.rank1").is_file()  # machine 1 ran its own process


@pytest.mark.slow
def test_train_net_under_torchrun_matches_one_launch(tmp_path, detection_reference):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(TRAIN_NET), *DETECTION,
         f"train.output_dir={tmp_path}"], cwd=str(ROOT), env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc.started = time.monotonic()
    code, out, err, _ = _finish(proc)
    assert code == 0, (out[-3000:], err[-30:])
    assert "World size: 2" in out + "\n".join(err)
    assert _losses(tmp_path) == detection_reference


def _video_args(tmp_path: Path):
    from revvit_d2.data.synthetic.kinetics import make_synthetic_kinetics

    data = make_synthetic_kinetics(tmp_path / "ks", train_per_class=2, val_per_class=1,
                                   num_frames=16, fps=16, size=(64, 48))
    return [f"dataloader.train.data_path={data / 'train.csv'}",
            f"dataloader.train.video_path_prefix={data}",
            f"dataloader.test.data_path={data / 'val.csv'}", "dataloader.test.num_workers=0",
            "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=0",
            "train.max_iter=3", "train.log_period=1", "train.seed=5", "train.device=cpu"]


def _top1(out: str) -> str:
    line = [line for line in out.splitlines() if line.startswith("* Top-1")][-1]
    return line.split(" clips/s")[0]


@pytest.mark.slow
def test_run_video_on_two_machines_matches_one_launch(tmp_path):
    args = _video_args(tmp_path)
    one = _one_launch(RUN_VIDEO, tmp_path / "one", args)
    two = _two_machines(RUN_VIDEO, tmp_path / "two", args)
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    assert len(_losses(tmp_path / "one")) == 3
    assert _top1(two) == _top1(one)
    assert (tmp_path / "two" / "model_final.pth").is_file()


def _has_fsdp_key(tool: Path) -> bool:
    """Whether the tool's default config has ``train.fsdp`` (added by the FSDP tool support)."""
    import importlib.util

    old_warnings = os.environ.get("PYTHONWARNINGS")
    try:
        spec = importlib.util.spec_from_file_location(f"_{tool.stem}_for_fsdp", tool)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.load_config(Namespace(config_file=None, opts=[]))
    finally:  # importing a tool extends PYTHONWARNINGS (quiet_import_warnings)
        if old_warnings is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = old_warnings
    cfg = cfg[0] if isinstance(cfg, tuple) else cfg
    return cfg.train.get("fsdp") is not None


@pytest.mark.slow
@pytest.mark.parametrize("tool", [TRAIN_NET, RUN_VIDEO], ids=["train_net", "run_video"])
def test_fsdp_on_two_machines(tmp_path, tool):
    """Sharded training (``train.fsdp.enabled=True``) on two machines logs the losses of one
    DDP launch of two processes (the same sums in another order) and writes a checkpoint."""
    if not _has_fsdp_key(tool):
        pytest.skip("needs train.fsdp")
    args = DETECTION if tool == TRAIN_NET else _video_args(tmp_path)
    _one_launch(tool, tmp_path / "ddp", args)
    _two_machines(tool, tmp_path / "fsdp", args + ["train.fsdp.enabled=True"])
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert sorted(fsdp) == sorted(ddp) == [0, 1, 2]
    for it, row in fsdp.items():
        assert row == pytest.approx(ddp[it], rel=1e-4, abs=1e-6), it
    assert (tmp_path / "fsdp" / "last_checkpoint").is_file()
