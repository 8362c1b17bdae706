"""Multi-process launch settings, the work-directory lock and checkpoint error lines, without training."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from capsjax import distributed
from capsjax.checkpoint import describe_error
from capsjax.workdir import WorkdirBusy, WorkdirLock

ROOT = Path(__file__).resolve().parents[1]


def test_launch_settings_from_flags_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(None, None, None, env) == ("h:1", 4, 3)
    assert distributed.settings("a:2", 2, 0, env) == ("a:2", 2, 0)  # flags win
    assert distributed.settings(None, None, None, {}) == (None, None, None)  # auto-detection (Slurm, TPU, ...)


@pytest.mark.parametrize(
    "flags, env, message",
    [
        ((None, 2, 0), {}, "needs --coordinator-address"),
        (("h:1", 2, None), {}, "give both --num-processes and --process-id"),
        (("h:1", 2, 2), {}, r"--process-id must be in \[0, 2\)"),
        (("h:1", 0, 0), {}, "--num-processes must be >= 1"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "must be integers"),
    ],
)
def test_bad_launch_settings_are_clear_errors(flags, env, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.settings(*flags, env)


def test_cli_reports_bad_launch_flags_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--preset", "smoke", "--workdir", str(tmp_path), "--num-processes", "2",
         "--process-id", "0"], env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and "--coordinator-address" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_lock_is_exclusive_and_released(tmp_path):
    with WorkdirLock(tmp_path):
        owner = json.loads((tmp_path / "LOCK").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / "LOCK").exists()
    WorkdirLock(tmp_path).acquire().release()


def test_lock_of_another_host_is_not_broken(tmp_path):
    (tmp_path / "LOCK").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(WorkdirBusy, match="delete .*LOCK"):
        WorkdirLock(tmp_path).acquire()


def test_half_written_lock_is_stale(tmp_path):
    (tmp_path / "LOCK").write_text('{"host": ')  # a process killed while writing it
    WorkdirLock(tmp_path).acquire().release()


def test_describe_error_drops_object_reprs():
    class Weird(Exception):
        pass

    err = Weird("<bound method pybind11_object.foo of <x at 0x7f>> failed")
    assert describe_error(err) == "Weird"
    assert describe_error(ValueError("shape mismatch\nmore")) == "ValueError: shape mismatch"


def test_config_rewrite_never_shows_a_reader_a_truncated_file(tmp_path):
    # On a multi-process resume, process 0 rewrites config.json while the others read it (CI once failed with
    # "config.json is not valid JSON"). An in-place rewrite truncates the file a reader has open; a replace doesn't.
    from capsjax.config import get_config, load_config, save_config

    path = tmp_path / "config.json"
    save_config(get_config("smoke"), path)
    old = path.read_text()
    with open(path) as reader:
        save_config(get_config("quick"), path)
        assert reader.read() == old
    assert load_config(path) == get_config("quick")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
