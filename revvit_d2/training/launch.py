"""Starting the processes of a run on one or several machines, with a bounded join.

detectron2's ``launch`` (``engine/launch.py``) spawns ``--num-gpus`` processes per machine and
lets each call ``init_process_group(init_method=dist_url, timeout=30 min)``. On several
machines that wait is the only bound: a peer that never starts, a wrong ``--dist-url``, a
``--num-machines`` that differs between the launches, or a port held by something else is a
hang of up to 30 minutes (or forever: a TCPStore client that reaches a port held by a program
that is not a TCPStore waits for its answer without a timeout), then a C++ traceback. What
differs here, and why:

* **the join** (:func:`rendezvous`): every process meets the others on a ``TCPStore`` at the
  ``--dist-url`` (machine 0's first process hosts it), checks that all launches agree on the
  number of machines and of processes per machine and that no machine rank is taken twice, and
  waits at most ``join_timeout`` seconds (``--dist-timeout``) for the rest. Each failure is a
  :class:`LaunchError`: one ``error:`` line naming the problem, exit status 1. The process
  group is then created on that store (``init_process_group(store=...)``) with detectron2's
  30-minute timeout for the collectives (an evaluation on the main process may take long);
* **processes already started** by torchrun or by ``srun`` (one task per process): this process
  is one of them (``local_rank``) and runs the same steps without spawning;
* **the backend** follows the device the run trains on (``use_gpus``), not only
  ``torch.cuda.is_available()``: a CPU run on a GPU machine uses gloo.

:func:`launch_plan` reads torchrun's and SLURM's environment into the same numbers as the
flags (``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--num-gpus``). Launching and
the options are described in docs/distributed.md.
"""
import contextlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..utils.errors import EXIT_ERROR, UserError, print_error

__all__ = ["DEFAULT_JOIN_TIMEOUT", "LaunchError", "LaunchPlan", "first_slurm_host", "launch",
           "launch_plan", "parse_dist_url", "rendezvous"]

logger = logging.getLogger(__name__)

#: Seconds a process waits for the others to join (``--dist-timeout``).
DEFAULT_JOIN_TIMEOUT = 300.0


class LaunchError(UserError):
    """The processes of a run cannot be started or cannot meet: one line, exit status 1."""


@dataclass(frozen=True)
class LaunchPlan:
    """Where this launch stands among the processes of a run.

    Args:
        num_processes: processes per machine (``--num-gpus``).
        num_machines: machines (``--num-machines``).
        machine_rank: this machine's rank (``--machine-rank``).
        dist_url: ``tcp://HOST:PORT`` of machine 0 (or ``auto``, ``file://PATH``).
        local_rank: None when this launch starts its machine's processes; the rank of this
            process on its machine when a launcher (torchrun, srun) started them all.
        agent_store: torchrun's agent already hosts the store at ``dist_url``: every process
            is a client.
        source: where the numbers came from: ``"flags"``, ``"torchrun"`` or ``"slurm"``.
    """
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: Optional[str] = None
    local_rank: Optional[int] = None
    agent_store: bool = False
    source: str = "flags"

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


# ------------------------------------------------------------------------------------------
# The numbers: flags, torchrun, SLURM
# ------------------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        if environ.get(name, "").strip():
            try:
                return int(environ[name])
            except ValueError:
                raise LaunchError(f"${name} is not an integer: {environ[name]!r}") from None
    raise LaunchError(f"${names[0]} is not set")


def _free_port() -> int:
    """A port that is free now on this machine (another program may take it before the
    rendezvous does: then the join reports it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _tcp_url(host: str, port) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,9],gpu1`` -> ``node03`` (what
    ``scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`` prints)."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist or "")
    if not match:
        raise LaunchError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _torchrun_plan(environ: Mapping[str, str]) -> LaunchPlan:
    world = _int(environ, "WORLD_SIZE")
    per_machine = _int(environ, "LOCAL_WORLD_SIZE")
    rank, local = _int(environ, "RANK"), _int(environ, "LOCAL_RANK")
    if per_machine < 1 or world % per_machine:
        raise LaunchError(f"torchrun: WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE "
                          f"{per_machine}: every machine needs the same --nproc-per-node")
    machine = _int(environ, "GROUP_RANK") if environ.get("GROUP_RANK") else rank // per_machine
    if rank != machine * per_machine + local:
        raise LaunchError(f"torchrun: RANK {rank} is not GROUP_RANK {machine} x "
                          f"LOCAL_WORLD_SIZE {per_machine} + LOCAL_RANK {local}")
    url = _tcp_url(environ.get("MASTER_ADDR") or "127.0.0.1", _int(environ, "MASTER_PORT"))
    return LaunchPlan(per_machine, world // per_machine, machine, url, local,
                      agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                      source="torchrun")


def _slurm_plan(environ: Mapping[str, str], num_processes: int) -> LaunchPlan:
    tasks = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node = _int(environ, "SLURM_NODEID")
    host = environ.get("MASTER_ADDR") or first_slurm_host(
        environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    # A port of the job's own (two jobs on one node do not collide), unless MASTER_PORT says.
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else \
        20000 + _int(environ, "SLURM_JOB_ID") % 20000
    url = _tcp_url(host, port)
    if tasks == nodes:  # one task per machine: it starts --num-gpus processes
        return LaunchPlan(num_processes, nodes, node, url, source="slurm")
    if tasks % nodes:
        raise LaunchError(f"SLURM: {tasks} tasks on {nodes} nodes: use the same "
                          f"--ntasks-per-node on every node")
    per_node, local = tasks // nodes, _int(environ, "SLURM_LOCALID")
    rank = _int(environ, "SLURM_PROCID")
    if rank != node * per_node + local:
        raise LaunchError(f"SLURM: task {rank} is not node {node} x {per_node} tasks per node "
                          f"+ local id {local}: use srun's default --distribution=block")
    return LaunchPlan(per_node, nodes, node, url, local, source="slurm")


def launch_plan(num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
                dist_url: Optional[str] = None, launcher: str = "auto",
                environ: Optional[Mapping[str, str]] = None) -> LaunchPlan:
    """The :class:`LaunchPlan` of this process from the flags or from its launcher's
    environment (`environ`, default ``os.environ``), checked (:class:`LaunchError`).

    `launcher`: ``"auto"`` reads torchrun's variables when torchrun started this process
    (``TORCHELASTIC_RUN_ID``), else the flags; ``"torchrun"`` and ``"slurm"`` read those
    variables (``SLURM_NTASKS``, ``SLURM_NNODES``, ``SLURM_NODEID``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``; ``MASTER_ADDR`` and
    ``MASTER_PORT`` override the first node and the job's port); ``"none"`` uses the flags.
    SLURM is never guessed: a batch script that runs the tool without ``srun`` has the same
    variables as one task of a step. With one SLURM task per node, each starts `num_processes`
    processes; with more, each task is one process. Flags other than their defaults that
    disagree with the environment are an error."""
    environ = os.environ if environ is None else environ
    if launcher == "auto":
        launcher = "torchrun" if environ.get("TORCHELASTIC_RUN_ID") else "none"
    if launcher == "torchrun":
        plan = _torchrun_plan(environ)
    elif launcher == "slurm":
        plan = _slurm_plan(environ, num_processes)
    elif launcher == "none":
        plan = LaunchPlan(num_processes, num_machines, machine_rank, dist_url)
    else:
        raise LaunchError(f"unknown launcher {launcher!r}: auto, torchrun, slurm or none")
    if plan.source != "flags":
        given = (("--num-gpus", num_processes, 1, plan.num_processes),
                 ("--num-machines", num_machines, 1, plan.num_machines),
                 ("--machine-rank", machine_rank, 0, plan.machine_rank))
        for flag, value, default, wanted in given:
            if value != default and value != wanted:
                raise LaunchError(f"{flag} {value} disagrees with the {plan.source} "
                                  f"environment ({wanted}); leave it out")
    _check(plan)
    return plan


def parse_dist_url(url: str) -> Tuple[str, int]:
    """``(host, port)`` of a ``tcp://HOST:PORT`` URL (:class:`LaunchError` otherwise)."""
    parsed = urlparse(url or "")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None or port == 0:
        raise LaunchError(f"--dist-url must be tcp://HOST:PORT with machine 0's address and a "
                          f"free port (or file://PATH), got {url!r}")
    return parsed.hostname, port


def _check(plan: LaunchPlan) -> None:
    if plan.num_machines == 1 and plan.num_processes == 0 and plan.local_rank is None:
        return  # detectron2's --num-gpus 0: one process, here (e.g. a CPU evaluation)
    if plan.num_processes < 1:
        raise LaunchError(f"--num-gpus (processes per machine) must be >= 1, got "
                          f"{plan.num_processes}")
    if plan.num_machines < 1:
        raise LaunchError(f"--num-machines must be >= 1, got {plan.num_machines}")
    if not 0 <= plan.machine_rank < plan.num_machines:
        raise LaunchError(f"--machine-rank {plan.machine_rank} is out of range for "
                          f"--num-machines {plan.num_machines} (0 to {plan.num_machines - 1})")
    if plan.world_size == 1:
        return
    url = plan.dist_url or "auto"
    if plan.dist_url is None and plan.num_machines > 1:
        raise LaunchError(f"--num-machines {plan.num_machines} needs --dist-url "
                          f"tcp://HOST:PORT: machine 0's address and a free port there, the "
                          f"same for every launch")
    if url == "auto":
        if plan.num_machines > 1:
            raise LaunchError(f"--dist-url auto picks a port on one machine; with "
                              f"--num-machines {plan.num_machines} give every launch machine "
                              f"0's tcp://HOST:PORT")
    elif not url.startswith("file://"):
        parse_dist_url(url)


# ------------------------------------------------------------------------------------------
# The join
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _c10d_messages_hidden():
    """c10d writes each connection retry and timeout to stderr from C++ (with a stack of
    frames), which an environment variable read at start-up could only silence for the whole
    run: meanwhile, stderr goes to a file, replayed when the join fails unexpectedly."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        replay = True
        try:
            yield
            replay = False
        except LaunchError:
            replay = False
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if replay:
                held.seek(0)
                sys.stderr.buffer.write(held.read())
                sys.stderr.flush()


def _connect(host: str, port: int, is_master: bool, world_size: int, seconds: float, url: str):
    """The TCPStore at ``host:port``: hosted here when `is_master`, else a client of it,
    within `seconds`. A client that reaches a port held by another program would wait for its
    answer forever: the connection is made on a thread given the same deadline."""
    result = {}

    def connect():
        try:
            result["store"] = dist.TCPStore(host, port, world_size, is_master,
                                            timedelta(seconds=seconds), wait_for_workers=False,
                                            multi_tenant=True)
        except Exception as e:  # noqa: BLE001 - classified below
            result["error"] = e

    thread = threading.Thread(target=connect, name="revvit-rendezvous", daemon=True)
    thread.start()
    thread.join(seconds + 5.0)  # the client's retries overrun its timeout a little
    if "store" in result:
        return result["store"]
    error = result.get("error")
    text = " ".join(str(error).split()) if error is not None else ""
    if is_master and ("EADDRINUSE" in text or "address already in use" in text):
        raise LaunchError(f"port {port} of --dist-url {url} is already in use on this machine "
                          f"(another run?): choose a free port")
    if is_master and error is not None:
        raise LaunchError(f"cannot listen on port {port} of --dist-url {url}: "
                          f"{text.splitlines()[0] if text else type(error).__name__}")
    if error is None or isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        raise LaunchError(f"machine 0 did not answer at --dist-url {url} within {seconds:g} s: "
                          f"is it started with this --dist-url, and is the port open? "
                          f"(--dist-timeout to wait longer)")
    raise error


def _describe(info: dict) -> str:
    return f"machine {info['machine_rank']} ({info['host']})"


def _agree(mine: dict, theirs: dict) -> None:
    for key, flag in (("num_machines", "--num-machines"),
                      ("num_processes", "--num-gpus (processes per machine)")):
        if mine[key] != theirs[key]:
            raise LaunchError(f"{flag} differs between the launches: {mine[key]} on "
                              f"{_describe(mine)}, {theirs[key]} on {_describe(theirs)}")


def _join(store, plan: LaunchPlan, slot: str, me: dict, url: str, join_timeout: float,
          left: Callable[[], float]) -> None:
    if store.add(f"taken/{slot}", 1) > 1:
        raise LaunchError(f"machine rank {plan.machine_rank} joined twice at {url}: give each "
                          f"launch its own --machine-rank (0 to {plan.num_machines - 1})")
    store.set(f"info/{slot}", json.dumps(me))
    slots = [f"{m}/{p}" for m in range(plan.num_machines) for p in range(plan.num_processes)]
    for other in slots:  # machine 0's first: a mismatch is found before anyone is missing
        try:
            store.wait([f"info/{other}"], timedelta(seconds=left()))
        except (dist.DistStoreError, RuntimeError):
            if not store.check([f"info/{other}"]):
                missing = sorted({int(s.split("/")[0]) for s in slots
                                  if not store.check([f"info/{s}"])})
                names = ", ".join(map(str, missing))
                raise LaunchError(f"machine{'s' if len(missing) > 1 else ''} {names} of "
                                  f"{plan.num_machines} did not join at {url} within "
                                  f"{join_timeout:g} s: start every machine with the same "
                                  f"--dist-url and --num-machines {plan.num_machines} "
                                  f"(--dist-timeout to wait longer)") from None
            raise
        theirs = json.loads(store.get(f"info/{other}"))
        if other == "0/0" and slot != "0/0":
            store.set(f"checked/{slot}", "1")  # machine 0 may leave now: we have seen its plan
        try:
            _agree(me, theirs)
        except LaunchError:
            if slot == "0/0":  # the other reads our plan, and names the problem too, first
                with contextlib.suppress(dist.DistError, RuntimeError):
                    store.wait([f"checked/{other}"], timedelta(seconds=min(left(), 10.0)))
            raise


def rendezvous(plan: LaunchPlan, local_rank: int, join_timeout: float = DEFAULT_JOIN_TIMEOUT):
    """Meet the other processes of `plan` at its ``tcp://`` dist_url; returns the store for
    ``init_process_group``. Within about `join_timeout` seconds, or a :class:`LaunchError`
    naming the problem: the rendezvous is unreachable or its port is taken, the launches
    disagree on ``--num-machines`` or ``--num-gpus``, a machine rank is taken twice, or
    machines did not join."""
    host, port = parse_dist_url(plan.dist_url)
    url = plan.dist_url
    rank = plan.machine_rank * plan.num_processes + local_rank
    deadline = time.monotonic() + join_timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    with _c10d_messages_hidden():
        store = _connect(host, port, rank == 0 and not plan.agent_store, plan.world_size,
                         join_timeout, url)
        prefix = "revvit/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(prefix, store)
        me = {"num_machines": plan.num_machines, "num_processes": plan.num_processes,
              "machine_rank": plan.machine_rank, "host": socket.gethostname()}
        slot = f"{plan.machine_rank}/{local_rank}"
        try:
            _join(store, plan, slot, me, url, join_timeout, left)
        except (dist.DistError, RuntimeError) as e:  # machine 0's process left meanwhile
            if rank == 0 and not plan.agent_store:
                raise
            raise LaunchError(f"machine 0 left the rendezvous at {url} during the join (its "
                              f"launch says why): {' '.join(str(e).split())[:200]}") from None
    return store


# ------------------------------------------------------------------------------------------
# The processes
# ------------------------------------------------------------------------------------------
def _worker(local_rank: int, main_func: Callable, plan: LaunchPlan, args: tuple,
            timeout: timedelta, join_timeout: float, use_gpus: Optional[bool]):
    """detectron2's ``_distributed_worker`` with the bounded join (:func:`rendezvous`) and the
    backend chosen by `use_gpus` (None: CUDA when available)."""
    gpus = torch.cuda.is_available() if use_gpus is None else use_gpus
    rank = plan.machine_rank * plan.num_processes + local_rank
    if gpus:  # before the process group: NCCL binds each rank to its device from the start
        torch.cuda.set_device(local_rank)
    try:
        if plan.dist_url.startswith("file://"):
            dist.init_process_group("NCCL" if gpus else "GLOO", init_method=plan.dist_url,
                                    world_size=plan.world_size, rank=rank, timeout=timeout)
        else:
            store = rendezvous(plan, local_rank, join_timeout)
            # Joined: from now on the store serves the process groups (detectron2 creates some
            # lazily, at a gather), with the collectives' patience, not the join's.
            store.set_timeout(timeout)
            dist.init_process_group("NCCL" if gpus else "GLOO", store=store,
                                    world_size=plan.world_size, rank=rank, timeout=timeout)
    except LaunchError as e:
        if local_rank == 0:  # one line per machine
            print_error(e)
        sys.stdout.flush()
        sys.stderr.flush()
        # A connection thread may still wait on a silent port: leave without joining it.
        os._exit(EXIT_ERROR)
    comm.create_local_process_group(plan.num_processes)
    comm.synchronize()  # detectron2: prevents a timeout after init_process_group
    main_func(*args)


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1,
           machine_rank: int = 0, dist_url: Optional[str] = None, args: tuple = (),
           timeout: timedelta = DEFAULT_TIMEOUT, *, join_timeout: float = DEFAULT_JOIN_TIMEOUT,
           local_rank: Optional[int] = None, agent_store: bool = False,
           use_gpus: Optional[bool] = None):
    """detectron2's ``launch`` (same arguments; `timeout` bounds the collectives) whose
    processes join within `join_timeout` seconds or stop with one error line and exit status
    1 (:func:`rendezvous`). `local_rank` (with `agent_store`): this process is already one of
    the processes, started by torchrun or srun; it runs `main_func` here without spawning.
    `use_gpus`: NCCL and one GPU per process, or gloo (None: CUDA when available)."""
    plan = LaunchPlan(num_gpus_per_machine, num_machines, machine_rank, dist_url, local_rank,
                      agent_store)
    _check(plan)
    if plan.world_size <= 1:
        return main_func(*args)
    if plan.dist_url in (None, "auto"):
        plan = replace(plan, dist_url=f"tcp://127.0.0.1:{_free_port()}")
    if plan.num_machines > 1 and plan.dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs, and its "
                       "join is not bounded by --dist-timeout. Prefer tcp://")
    work = (main_func, plan, args, timeout, join_timeout, use_gpus)
    if local_rank is not None:
        return _worker(local_rank, *work)
    mp.start_processes(_worker, nprocs=plan.num_processes, args=work, daemon=False)
