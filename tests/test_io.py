"""Durable files (fastattn._io), the stop-at-step-boundaries protocol (fastattn._training) and the
CLI argument types (fastattn._args): atomic writes, partial JSONL lines, checkpoints that name
themselves, the output-directory lock, signals turned into a flag."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import default_sigint  # noqa: F401  (fixture)

from fastattn import _args, _io
from fastattn._training import ResumeMismatch, StopRequest, check_resume


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "a.json"
    _io.atomic_write_json(p, {"v": 1})
    with pytest.raises(RuntimeError), _io.atomic_write(p, "w") as f:
        f.write('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]  # no temp file left
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_io._UMASK)  # not mkstemp's 0600


def test_two_writers_never_share_a_temp_file(tmp_path):
    p = tmp_path / "x"
    with _io.atomic_write(p) as f1, _io.atomic_write(p) as f2:
        assert f1.name != f2.name
        f1.write(b"one")
        f2.write(b"two")
    assert p.read_bytes() == b"one"  # the first to finish (inner context) is replaced by the outer


def test_jsonl_partial_last_line(tmp_path, capsys):
    p = tmp_path / "m.jsonl"
    for i in range(3):
        _io.append_jsonl(p, {"step": i})
    with open(p, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in _io.read_jsonl(p)] == [0, 1, 2]
    assert "partial last line" in capsys.readouterr().err
    _io.append_jsonl(p, {"step": 4})  # never glued onto the partial line
    assert [r["step"] for r in _io.read_jsonl(p)] == [0, 1, 2, 4]
    assert p.read_bytes().endswith(b"}\n")
    assert _io.trim_jsonl(p, lambda r: r["step"] < 2) == [{"step": 0}, {"step": 1}]
    assert p.read_text().count("\n") == 2


def test_jsonl_damage_in_the_middle_names_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(_io.CorruptFile, match=r"m\.jsonl, line 2"):
        _io.read_jsonl(p)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict", "empty"])
def test_corrupt_checkpoint_names_file_and_fresh(tmp_path, damage):
    p = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(100)}, "step": 3}, p)
    data = p.read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 10,
                   "empty": b""}.get(damage, data))
    if damage == "not_a_dict":
        torch.save([1, 2], p)
    with pytest.raises(_io.CorruptFile) as e:
        _io.load_checkpoint(p, required=("model", "step"))
    assert str(p) in str(e.value) and "--fresh" in str(e.value)
    assert isinstance(e.value, ValueError)


_HOLDER = textwrap.dedent("""
    import sys, time
    from fastattn._io import DirLock
    with DirLock(sys.argv[1], command="holder-process"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_dir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                         env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(_io.DirLocked, match=rf"PID {p.pid} .*holder-process"):
            _io.DirLock(tmp_path).acquire()
    finally:
        p.kill()  # kill -9: no clean-up, the lock file stays behind
        p.wait()
    assert (tmp_path / _io.LOCK_NAME).exists()
    with _io.DirLock(tmp_path, command="second"):
        assert "stale lock" in capsys.readouterr().err
        assert json.loads((tmp_path / _io.LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(_io.DirLocked):  # not reentrant: a second job in this process too
            _io.DirLock(tmp_path).acquire()
    assert not (tmp_path / _io.LOCK_NAME).exists()


@pytest.mark.usefixtures("default_sigint")
def test_stop_request_is_a_flag_then_an_abort():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.check() and stop.signum == signal.SIGTERM  # no exception: just a flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal aborts at once
            for _ in range(1000):  # (delivered at the next bytecode boundary)
                pass
    assert signal.getsignal(signal.SIGINT) is previous


def test_stop_request_leaves_an_ignored_signal_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop.check()
    finally:
        signal.signal(signal.SIGINT, old)


def test_check_resume_lists_every_difference(tmp_path, capsys):
    saved = {"seed": 0, "lr": 1e-3, "batch_size": 8, "max_steps": 10}
    with pytest.raises(ResumeMismatch, match=r"seed: 0 in the checkpoint, 1 now.*lr: 0\.001 .*0\.002"):
        check_resume("ck.pt", saved, {**saved, "seed": 1, "lr": 2e-3}, ["max_steps"])
    check_resume("ck.pt", saved, {**saved, "max_steps": 20}, ["max_steps"])
    assert "max_steps changed from 10 to 20" in capsys.readouterr().err


@pytest.mark.parametrize("kind,value,ok", [
    (_args.positive_int, "0", False), (_args.positive_int, "-5", False), (_args.positive_int, "3", True),
    (_args.positive_int, str(2 ** 63), False), (_args.nonneg_int, "0", True),
    (_args.probability, "0", False), (_args.probability, "1", True), (_args.probability, "1.5", False),
    (_args.probability, "nan", False), (_args.nonneg_float, "-1", False), (_args.nonneg_float, "inf", False),
    (_args.finite_float, "nan", False), (_args.finite_float, "-2.5", True), (_args.dropout_rate, "1", False),
    (_args.seed, "-1", False), (_args.int_list(0), "1,,3", True), (_args.int_list(1), "0,2", False),
    (_args.int_list(0), ",", False), (_args.float_list, "0,nan", False),
])
def test_argument_types(kind, value, ok):
    import argparse

    if ok:
        kind(value)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(value)
