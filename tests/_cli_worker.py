"""Launched by tests/test_cli.py and tests/test_launch_device.py in a fresh interpreter:
``python _cli_worker.py KIND N [DEVICE]`` runs ``revvit_d2.training.launch_guarded`` with N
processes for DEVICE (default ``cpu``: gloo on any machine; ``auto``: CUDA when available) whose
main function does KIND."""
import os
import signal
import sys
import types

from _helpers import say
from revvit_d2.training.cli import ToolError, launch_guarded


def expected(args):
    raise ToolError("no such dataset: shapes_val\n    (registered: shapes_train)")


def killed(args):
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def unexpected(args):
    raise RuntimeError("a bug, not an input error")


def succeeds(args):
    print("trained")


def backend(args):
    """One line per process: what it was given (``revvit_fake_gpus``: see test_launch_device)."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    used = dist.get_backend() if dist.is_initialized() else None
    say(f"rank {comm.get_rank()} backend {used} cuda {torch.cuda.is_available()} "
        f"fake {getattr(torch.cuda, 'revvit_fake_gpus', None)}")


if __name__ == "__main__":
    kind, num = sys.argv[1], int(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    args = types.SimpleNamespace(num_gpus=num, num_machines=1, machine_rank=0, dist_url="auto")
    # launch() pickles the main function by module name: import it as `_cli_worker`
    import _cli_worker

    sys.exit(launch_guarded(getattr(_cli_worker, kind), args, check=lambda _: device))
