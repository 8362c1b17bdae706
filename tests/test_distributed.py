"""Multi-process launch settings, the work-directory lock and checkpoint error lines, without training."""

import json
import os
import socket
import subprocess
import sys
import time
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


class FakeCheckpoints:  # what a roll-back does to the checkpoints folder, without Orbax
    def __init__(self, workdir, keep):
        self.dir = Path(workdir) / "checkpoints"
        self.dir.mkdir(exist_ok=True)

    def delete_after(self, step):
        doomed = [p for p in self.dir.iterdir() if step is None or int(p.name) > step]
        for p in doomed:
            p.rmdir()
        return sorted(int(p.name) for p in doomed)

    def close(self):
        pass


def test_every_process_reads_the_resume_state_before_process_0_rolls_back(tmp_path, monkeypatch):
    # A run that diverged before its first safe checkpoint restarts from scratch: process 0 deletes every checkpoint.
    # If it did so before process 1 had looked, process 1 saw a fresh run, skipped the roll-back barrier and the two
    # processes waited on different barriers. Simulated here: process 0 runs first, and whenever it waits at a barrier,
    # process 1 runs to its end (its own barriers are then no-ops).
    import dataclasses

    import jax

    from capsjax import workdir as workdir_mod
    from capsjax.config import get_config, save_config

    old = get_config("smoke")
    save_config(old, tmp_path / "config.json")
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / workdir_mod.DIVERGED).write_text(json.dumps({"step": 3, "safe_step": None, "learning_rate": 1e-3}))

    monkeypatch.setattr(workdir_mod, "Checkpoints", FakeCheckpoints)
    process, waited = [0], []

    def barrier(name):
        waited.append((process[0], name))
        if process[0] == 0 and not any(p == 1 for p, _ in waited):
            process[0] = 1
            workdir_mod.apply_resume_rules(new, tmp_path)
            process[0] = 0

    monkeypatch.setattr(jax, "process_index", lambda: process[0])
    monkeypatch.setattr(workdir_mod.distributed, "barrier", barrier)
    new = dataclasses.replace(old, optim=dataclasses.replace(old.optim, learning_rate=old.optim.learning_rate / 2))
    workdir_mod.apply_resume_rules(new, tmp_path)
    assert sorted(name for p, name in waited if p == 0) == sorted(name for p, name in waited if p == 1)
    assert not (tmp_path / workdir_mod.DIVERGED).exists() and not any((tmp_path / "checkpoints").iterdir())


def test_a_checkpoint_another_process_cant_read_is_given_up_by_every_process(tmp_path, monkeypatch):
    # Each process restored the newest checkpoint it could read on its own: one that a single process failed to read
    # (a read error, a file system showing hosts different listings) left the processes training from different steps.
    import jax.numpy as jnp

    from capsjax.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path)
    for step in (1, 2):
        checkpoints.save(step, {"w": jnp.full((3,), float(step))})
    votes = []

    def all_processes(flag):  # this process read the checkpoint (flag), another one could not read step 2
        votes.append(flag)
        return flag and len(votes) > 1

    monkeypatch.setattr(distributed, "all_processes", all_processes)
    lines = []
    state, step = checkpoints.restore_newest_intact({"w": jnp.zeros(3)}, log=lines.append)
    checkpoints.close()
    assert step == 1 and float(state["w"][0]) == 1.0 and votes == [True, True]
    assert len(lines) == 1 and "unreadable in another process" in lines[0]
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged").iterdir()] == ["2"]


def _diverged_workdir(workdir, optim_recorded=True):
    """A run whose loss blew up at step 5 with the smoke preset's optimizer; checkpoint 3 is from before."""
    from capsjax.config import get_config, save_config, to_dict
    from capsjax.workdir import DIVERGED

    blown = get_config("smoke")
    save_config(blown, workdir / "config.json")
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    note = {"step": 5, "safe_step": 3, "learning_rate": blown.optim.learning_rate}
    if optim_recorded:
        note["optim"] = to_dict(blown.optim)
    (workdir / DIVERGED).write_text(json.dumps(note))
    return blown


def _lower_rate(config):
    import dataclasses

    optim = dataclasses.replace(config.optim, learning_rate=config.optim.learning_rate / 2)
    return dataclasses.replace(config, optim=optim)


def test_a_crash_inside_the_roll_back_does_not_refuse_the_remedy(tmp_path, monkeypatch):
    # Process 0 rewrites config.json with the new settings, then removes diverged.json. A crash in between left the
    # new settings in config.json beside the marker, and rerunning the same (lower-rate) command was refused as
    # "the settings that diverged".
    from capsjax import workdir as workdir_mod
    from capsjax.config import ConfigError, save_config

    monkeypatch.setattr(workdir_mod, "Checkpoints", FakeCheckpoints)
    blown = _diverged_workdir(tmp_path)
    remedy = _lower_rate(blown)
    save_config(remedy, tmp_path / "config.json")  # the crash: config.json rewritten, diverged.json still there
    # the settings that blew up stay refused, and the message names their rate (not config.json's new one)
    with pytest.raises(ConfigError, match=f"with learning rate {blown.optim.learning_rate:g}; rerun with a lower"):
        workdir_mod.apply_resume_rules(blown, tmp_path)
    assert workdir_mod.apply_resume_rules(remedy, tmp_path) == remedy
    assert not (tmp_path / workdir_mod.DIVERGED).exists()
    # a marker written before the optimizer was recorded in it: the settings of config.json are the ones that blew up
    other = tmp_path / "old"
    other.mkdir()
    blown = _diverged_workdir(other, optim_recorded=False)
    with pytest.raises(ConfigError, match="lower --learning-rate"):
        workdir_mod.apply_resume_rules(blown, other)
    assert workdir_mod.apply_resume_rules(_lower_rate(blown), other) == _lower_rate(blown)


def test_resume_rules_before_the_first_checkpoint_and_for_a_finished_run(tmp_path, monkeypatch):
    import dataclasses

    from capsjax import workdir as workdir_mod
    from capsjax.config import ConfigError, get_config, save_config

    monkeypatch.setattr(workdir_mod, "Checkpoints", FakeCheckpoints)
    # diverged before its first checkpoint: the same settings would blow up the same way (the run replays exactly)
    blown = _diverged_workdir(tmp_path)
    (tmp_path / "checkpoints" / "3").rmdir()
    with pytest.raises(ConfigError, match="lower --learning-rate"):
        workdir_mod.apply_resume_rules(blown, tmp_path)
    # a checkpoints folder holding only a save cut short is no run to resume: other settings start a new one
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000000").mkdir(parents=True)
    save_config(get_config("smoke"), fresh / "config.json")
    assert workdir_mod.apply_resume_rules(get_config("quick"), fresh) == get_config("quick")
    # (a finished run resumed for more epochs: tests/test_train.py)
    done = tmp_path / "done"
    (done / "checkpoints" / "9").mkdir(parents=True)
    save_config(get_config("smoke"), done / "config.json")
    more = dataclasses.replace(get_config("smoke"), epochs=get_config("smoke").epochs + 1)
    workdir_mod.apply_resume_rules(more, done)
    with pytest.raises(ConfigError, match="other settings"):
        workdir_mod.apply_resume_rules(get_config("quick"), done)


def test_a_resume_on_other_training_data_is_refused(tmp_path):
    # data_dir may change on resume (the files moved); data in another order (another source) made the held-out
    # examples part of the training data without a word.
    import dataclasses

    from capsjax import data as datalib
    from capsjax import workdir as workdir_mod
    from capsjax.config import ConfigError, get_config

    config = dataclasses.replace(get_config("smoke"), train_examples=64, validation_examples=16)
    datasets = datalib.load_datasets(config)
    assert datasets.fingerprint() == datalib.load_datasets(config).fingerprint()  # the same data, the same print
    workdir_mod.apply_resume_rules(config, tmp_path, datasets.fingerprint())  # a new run records it
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    workdir_mod.apply_resume_rules(config, tmp_path, datasets.fingerprint())
    images, labels = datasets.train
    shuffled = dataclasses.replace(datasets, train=(images[::-1], labels[::-1]))
    with pytest.raises(ConfigError, match="data differ from those the run"):
        workdir_mod.apply_resume_rules(config, tmp_path, shuffled.fingerprint())


@pytest.mark.parametrize("damaged", ["data.json", "diverged.json"])
def test_a_damaged_record_of_the_run_is_an_error_naming_the_file(tmp_path, damaged):
    # a data.json or diverged.json that isn't JSON stopped train.py with "JSONDecodeError: Expecting value ..." and
    # no word of which file or what to do
    from capsjax import workdir as workdir_mod
    from capsjax.config import ConfigError, get_config, save_config

    save_config(get_config("smoke"), tmp_path / "config.json")
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / damaged).write_text('{"fingerprint": ')
    with pytest.raises(ConfigError, match=f"{damaged} is not valid JSON .*; (restore it|it records where)"):
        workdir_mod.apply_resume_rules(get_config("smoke"), tmp_path, "abc")


def test_a_lock_left_on_another_host_is_taken_over_only_when_its_run_is_idle(tmp_path):
    # the notebook's DRIVE mode: a recycled Colab runtime leaves a lock of another host, which acquire() can't judge
    lock = WorkdirLock(tmp_path)
    (tmp_path / "LOCK").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert lock.take_over_idle(600) is None and (tmp_path / "LOCK").exists()  # its run wrote a moment ago
    old = time.time() - 3600
    for name in ("LOCK", "metrics.jsonl"):
        os.utime(tmp_path / name, (old, old))
    assert lock.take_over_idle(600)["host"] == "elsewhere" and not (tmp_path / "LOCK").exists()
    lock.acquire().release()
    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "x"}))
    os.utime(tmp_path / "LOCK", (old, old))
    assert lock.take_over_idle(600) is None  # this host's: acquire() judges it by its pid


def test_preemption_sync_ids_count_this_launchs_steps(monkeypatch):
    # JAX stops at the id after the largest id any process has passed: a notice that came before the first call (while
    # the data loaded or the step compiled) set it to 1, which a resumed run, calling with its global step, never met
    from jax.experimental import multihost_utils

    ids = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step_id: ids.append(step_id) or False)
    signal = distributed.StopSignal()
    signal.multi = True  # as in a multi-process run
    for step in (1201, 1202, 1203):  # resumed at step 1200
        assert signal.at_step(step) is False
    assert ids == [1, 2, 3]

