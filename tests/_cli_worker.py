"""Launched by tests/test_cli.py in a fresh interpreter: ``python _cli_worker.py KIND N`` runs
``revvit_d2.training.launch_guarded`` with N processes whose main function does KIND."""
import os
import signal
import sys
import types

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


if __name__ == "__main__":
    kind, num = sys.argv[1], int(sys.argv[2])
    args = types.SimpleNamespace(num_gpus=num, num_machines=1, machine_rank=0, dist_url="auto")
    # launch() pickles the main function by module name: import it as `_cli_worker`
    import _cli_worker

    sys.exit(launch_guarded(getattr(_cli_worker, kind), args))
