"""The write-once protocol shared by the built-in dataset generators
(revvit_d2.data.generated.generate_once)."""
import json
import multiprocessing as mp

import pytest

from revvit_d2.data.generated import IN_PROGRESS, MARKER, generate_once


def _writer(root, calls):
    def generate():
        calls.append(1)
        (root / "out").mkdir()
        (root / "out" / "data.txt").write_text("x")
    return generate


def test_generates_once_and_reuses(tmp_path):
    calls = []
    params = {"seed": 0}
    assert generate_once(tmp_path, params, ["out"], "maker", _writer(tmp_path, calls)) is True
    assert json.loads((tmp_path / MARKER).read_text()) == params
    assert not (tmp_path / IN_PROGRESS).exists()
    assert generate_once(tmp_path, params, ["out"], "maker", _writer(tmp_path, calls)) is False
    assert calls == [1]
    # other parameters: rewritten from scratch (the old output is removed first)
    assert generate_once(tmp_path, {"seed": 1}, ["out"], "maker", _writer(tmp_path, calls))
    assert calls == [1, 1]


def test_killed_run_and_missing_required_file_are_redone(tmp_path):
    calls = []
    params = {"seed": 0}
    generate_once(tmp_path, params, ["out"], "maker", _writer(tmp_path, calls))
    (tmp_path / MARKER).unlink()
    (tmp_path / IN_PROGRESS).write_text("{}")  # what a killed run leaves
    assert generate_once(tmp_path, params, ["out"], "maker", _writer(tmp_path, calls))
    (tmp_path / "out" / "data.txt").unlink()
    assert generate_once(tmp_path, params, ["out"], "maker", _writer(tmp_path, calls),
                         required=["out/data.txt"])
    assert calls == [1, 1, 1] and (tmp_path / "out" / "data.txt").is_file()


def test_a_foreign_folder_is_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="was not made by maker"):
        generate_once(tmp_path, {}, ["out"], "maker", _writer(tmp_path, []))
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def _slow_generate(root, log):
    def generate():
        import time
        with open(log, "a") as f:
            f.write("start\n")
        time.sleep(0.5)
        (root / "out").mkdir()
    return generate


def _call(root, log, queue):
    queue.put(generate_once(root, {"seed": 0}, ["out"], "maker", _slow_generate(root, log)))


def test_concurrent_callers_generate_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    log = tmp_path / "log.txt"
    root = tmp_path / "data"
    procs = [ctx.Process(target=_call, args=(root, log, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True]
    assert log.read_text() == "start\n"
