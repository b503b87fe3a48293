"""Launched by tests/test_multi_machine.py in a fresh interpreter: one machine's launch of a
run whose processes print their rank once they have joined.

    python _launch_worker.py --num-machines 2 --machine-rank R --dist-url tcp://127.0.0.1:PORT \
        [--num-gpus N] [--dist-timeout SECONDS] [--launcher ...]

The options are the tools' (revvit_d2.training.tool_parser), the launch is theirs
(launch_guarded with CPU processes), without a model: what is tested is the join alone.
With REVVIT_TEST_HOLD=FILE in the environment the joined processes stay (the run, and machine
0's rendezvous, stay up) until FILE exists, for at most 300 s.
"""
import os
import sys
import time

from revvit_d2.utils.errors import quiet_import_warnings

quiet_import_warnings()  # before detectron2 imports

from _helpers import say  # noqa: E402
from revvit_d2.training.cli import launch_guarded, tool_parser  # noqa: E402


def joined(args):
    from detectron2.utils import comm

    say(f"joined rank {comm.get_rank()} of {comm.get_world_size()} local "
        f"{comm.get_local_rank()} of {comm.get_local_size()}")
    hold = os.environ.get("REVVIT_TEST_HOLD")
    deadline = time.monotonic() + 300
    while hold and not os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.2)
    comm.synchronize()


if __name__ == "__main__":
    args = tool_parser(__doc__, "none").parse_args()
    # launch() pickles the main function by module name: import it as `_launch_worker`
    import _launch_worker

    sys.exit(launch_guarded(_launch_worker.joined, args, check=lambda _: "cpu"))
