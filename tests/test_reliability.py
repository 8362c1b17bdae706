"""The trainer under faults: the best checkpoint, resumes, the work-directory lock, preemption, divergence, damaged
checkpoints, metrics.jsonl, changed settings, small inputs, and logging without a terminal. Each test here failed on
the trainer before its rewrite."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from capsjax import data as datalib
from capsjax.checkpoint import CheckpointError, Checkpoints
from capsjax.config import ConfigError, get_config
from capsjax.steps import OptimConfig
from capsjax.train import TrainingDiverged, train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test trains (and often resumes) a run
# 96 training images at batch 32: 3 steps per epoch; checkpoints every 3 steps fall on every epoch's end.
SMALL = dataclasses.replace(
    get_config("smoke"), train_examples=96, validation_examples=32, epochs=3, checkpoint_every_steps=3,
    log_every_steps=1, progress=False, tensorboard=False, safe_checkpoint_margin=0, test_every_epoch=False,
)  # fmt: skip
TIMING = ("images_per_s", "epoch_time_s", "train_time_s", "timed_steps")  # what a resume may change


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _validated(workdir):
    """{step: validation accuracy} from metrics.jsonl."""
    return {r["step"]: r["accuracy"] for r in _records(workdir) if r["split"] == "validation"}


def _best(workdir, config=SMALL):
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    try:
        return checkpoints.best_step(), {s: checkpoints.metrics(s) for s in checkpoints.all_steps()}
    finally:
        checkpoints.close()


def _params(workdir, which="latest"):
    from capsjax.evaluate import load_run

    return jax.device_get(load_run(workdir, which, log=lambda _: None).params)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# ---- defect 1: an epoch-end save that coincides with a periodic one keeps the epoch's validation
def test_epoch_end_checkpoint_holds_its_validation_and_best_survives_resume(tmp_path):
    train_and_evaluate(dataclasses.replace(SMALL, epochs=2), tmp_path)
    results = train_and_evaluate(SMALL, tmp_path)  # resumed for a third epoch
    validated = _validated(tmp_path)
    assert sorted(validated) == [3, 6, 9]
    best, metrics = _best(tmp_path)
    best_expected = max(validated, key=lambda s: (validated[s], -s))
    assert best == best_expected and metrics[best]["accuracy"] == validated[best]
    assert results["best_validation_accuracy"] == max(validated.values())
    for step, m in metrics.items():  # every kept epoch-end save carries its own epoch's metrics
        if m is not None:
            assert m["epoch"] == step // 3 and m["accuracy"] == validated[step]


# ---- defects 2, 3, 7, 8: crashes at the worst moments
class _Crash(Exception):
    pass


def _crash_on_call(monkeypatch, owner, name, n):
    original, calls = getattr(owner, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def test_crash_during_validation_validates_that_epoch_on_resume(tmp_path, monkeypatch):
    import capsjax.train

    config = dataclasses.replace(SMALL, epochs=2)
    with monkeypatch.context() as m:
        _crash_on_call(m, capsjax.train, "evaluate_arrays", 1)  # the first epoch's validation
        with pytest.raises(_Crash):
            train_and_evaluate(config, tmp_path / "a")
    train_and_evaluate(config, tmp_path / "a")
    train_and_evaluate(config, tmp_path / "b")
    assert sorted(_validated(tmp_path / "a")) == [3, 6]
    assert _best(tmp_path / "a")[0] == _best(tmp_path / "b")[0]
    assert _comparable(_records(tmp_path / "a")) == _comparable(_records(tmp_path / "b"))


def test_crash_in_a_save_keeps_the_best_and_metrics_match_an_uninterrupted_run(tmp_path, monkeypatch):
    config = dataclasses.replace(SMALL, checkpoint_every_steps=1, epochs=2)
    train_and_evaluate(config, tmp_path / "a")
    with monkeypatch.context() as m:
        _crash_on_call(m, Checkpoints, "save", 5)  # step 5: after epoch 1's validated save and two more steps
        with pytest.raises(_Crash):
            train_and_evaluate(config, tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir()  # what a kill inside the save leaves
    train_and_evaluate(config, tmp_path / "b")
    assert not list((tmp_path / "b" / "checkpoints").glob("*tmp*"))
    records = _records(tmp_path / "b")
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)), keys  # no line repeated by the resume
    assert _comparable(records) == _comparable(_records(tmp_path / "a"))
    assert _best(tmp_path / "a")[0] == _best(tmp_path / "b")[0]
    _assert_same_params(tmp_path / "a", tmp_path / "b")


def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(tmp_path, capsys):
    config = dataclasses.replace(SMALL, epochs=1)
    train_and_evaluate(config, tmp_path)
    latest = tmp_path / "checkpoints" / "3"
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    capsys.readouterr()
    results = train_and_evaluate(dataclasses.replace(config, epochs=2), tmp_path)
    out = capsys.readouterr().out
    assert results["steps"] == 6
    warning = [line for line in out.splitlines() if "falling back" in line]
    assert len(warning) == 1 and "checkpoints/3" in warning[0] and "pybind11" not in warning[0]
    assert list((tmp_path / "damaged").iterdir())


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    train_and_evaluate(dataclasses.replace(SMALL, epochs=1), tmp_path)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    from capsjax.evaluate import load_run

    with pytest.raises(CheckpointError, match="checkpoints/3 is unreadable"):
        load_run(tmp_path, "latest")


def test_a_damaged_best_checkpoint_names_the_others_to_evaluate(tmp_path):
    # eval.py said only "unreadable or does not match this model", though --checkpoint with another step worked
    from capsjax.checkpoint import Checkpoints
    from capsjax.evaluate import load_run

    train_and_evaluate(dataclasses.replace(SMALL, epochs=2), tmp_path)
    checkpoints = Checkpoints(tmp_path, SMALL.keep_checkpoints, read_only=True)
    best, available = checkpoints.best_step(), checkpoints.all_steps()
    checkpoints.close()
    assert len(available) > 1, available
    for f in (tmp_path / "checkpoints" / str(best)).rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    others = [s for s in available if s != best]
    hint = re.escape(f"; evaluate another with --checkpoint STEP (steps {others})")
    with pytest.raises(CheckpointError, match=f"unreadable .*{hint}"):
        load_run(tmp_path, "best")
    assert load_run(tmp_path, str(others[-1])).step == others[-1]


# ---- defect 4: one run per work directory
def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    from capsjax.workdir import WorkdirBusy, WorkdirLock

    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusy, match="in use by another run"):
            train_and_evaluate(SMALL, tmp_path)
    assert not (tmp_path / "LOCK").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    results = train_and_evaluate(dataclasses.replace(SMALL, epochs=1), tmp_path)
    assert results["steps"] == 3 and not (tmp_path / "LOCK").exists()


# ---- defect 9: a resume with other settings
def test_resume_with_changed_settings_is_refused_but_more_epochs_are_fine(tmp_path):
    config = dataclasses.replace(SMALL, epochs=1)
    train_and_evaluate(config, tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"batch_size 32 -> 16"):
        train_and_evaluate(dataclasses.replace(config, batch_size=16, epochs=2), tmp_path)
    other_model = dataclasses.replace(config, model=dataclasses.replace(config.model, class_dim=4))
    with pytest.raises(ConfigError, match="model.class_dim"):
        train_and_evaluate(other_model, tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    assert train_and_evaluate(dataclasses.replace(config, epochs=2), tmp_path)["steps"] == 6


# ---- defect 6: divergence
def test_divergence_keeps_a_checkpoint_from_before_and_a_lower_rate_restarts_from_it(tmp_path):
    config = dataclasses.replace(SMALL, epochs=4, checkpoint_every_steps=1, safe_checkpoint_margin=2, keep_checkpoints=1)
    # A learning rate that grows 1e6-fold every step: the parameters are wild from step 2, the loss NaN a few later.
    blown = dataclasses.replace(config, optim=OptimConfig(learning_rate=1e-3, decay_rate=1e6, decay_steps=1))
    with pytest.raises(TrainingDiverged) as info:
        train_and_evaluate(blown, tmp_path)
    message = str(info.value)
    assert "None" not in message and "checkpoint step" in message
    bad = int(message.split("non-finite at step ")[1].split(";")[0])
    safe = int(message.split("checkpoint step ")[1].split(",")[0])
    assert safe <= bad - 2 and safe in _best(tmp_path, config)[1]
    with pytest.raises(ConfigError, match="lower --learning-rate"):
        train_and_evaluate(blown, tmp_path)  # the same settings would blow up again
    results = train_and_evaluate(config, tmp_path)  # the remedy the message suggests
    assert results["steps"] == 12 and np.isfinite(results["test_loss"])
    records = _records(tmp_path)
    assert max(r["step"] for r in records) == 12 and all(np.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))


def test_keyboard_interrupt_saves_the_steps_done_with_their_log(tmp_path, monkeypatch):
    # A KeyboardInterrupt (a notebook's stop button) saved the state without logging the steps since the last report:
    # metrics.jsonl lost them for good, and their losses were never checked for a blow-up.
    import capsjax.train as train_mod

    config = dataclasses.replace(SMALL, epochs=2, log_every_steps=100, checkpoint_every_steps=100)
    real, calls = train_mod.wait_for_queue, []

    def interrupt_at_step_5(pending):
        real(pending)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "wait_for_queue", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path)
    assert Checkpoints(tmp_path).all_steps()[-1] == 5
    assert [r["step"] for r in _records(tmp_path) if r["split"] == "train"] == [3, 5]
    monkeypatch.setattr(train_mod, "wait_for_queue", real)
    assert train_and_evaluate(config, tmp_path)["steps"] == 6
    assert [r["step"] for r in _records(tmp_path) if r["split"] == "train"] == [3, 5, 6]


def test_epoch_times_say_what_they_timed_across_a_resume(tmp_path):
    # A resume inside an epoch timed only the steps after it, and the logged epoch time was read as the epoch's
    # training time although it included the validation and test.
    from capsjax import results
    from capsjax.train import Preempted

    config = dataclasses.replace(SMALL, epochs=2, test_every_epoch=True, checkpoint_every_steps=1)
    with pytest.raises(Preempted):  # asked to stop once step 4 is saved: stops (and saves) at step 5
        train_and_evaluate(config, tmp_path, should_stop=lambda: (tmp_path / "checkpoints" / "4").is_dir())
    train_and_evaluate(config, tmp_path)
    epochs = [r for r in _records(tmp_path) if r["split"] == "validation"]
    assert [r["timed_steps"] for r in epochs] == [3, 1]  # epoch 2 resumed at step 5: step 6 timed
    assert all(0 < r["train_time_s"] < r["epoch_time_s"] for r in epochs)
    assert results.summarize(tmp_path)["partly_timed"]


# ---- defect 10: small inputs for eval and predict
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(dataclasses.replace(SMALL, epochs=1), workdir)
    return workdir


def test_predict_checks_inputs_and_handles_small_batches(trained):
    from capsjax.evaluate import load_run, predict

    run = load_run(trained)
    images, _ = datalib.load_synthetic(5, seed=1)
    reference = predict(run, images, batch_size=8)
    for batch_size in (1, 3):  # fewer than / not divisible by the 4 simulated devices
        np.testing.assert_allclose(predict(run, images, batch_size=batch_size).lengths, reference.lengths, rtol=1e-5)
    empty = predict(run, images[:0])
    assert empty.lengths.shape == (0, 10) and empty.reconstructions.shape[0] == 0
    np.testing.assert_allclose(predict(run, images.astype(np.float32) / 255).lengths, reference.lengths, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict(run, images, batch_size=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        predict(run, images.astype(np.float32))
    broken = images.astype(np.float32) / 255
    broken[2, 0, 0] = np.nan  # was told to divide by 255
    with pytest.raises(ValueError, match=r"images hold NaN or infinite values \(1 of 5 images\)"):
        predict(run, broken)
    with pytest.raises(ValueError, match="uint8"):
        predict(run, images.astype(np.int64))


def test_evaluating_a_run_that_trains_leaves_its_save_in_progress_alone(trained, tmp_path):
    # eval.py (or a weights export) started while the trainer writes a checkpoint opened the checkpoints with Orbax's
    # clean-up of temporary folders and deleted the save in progress, which then failed and ended the training run.
    from capsjax.evaluate import load_run

    in_progress = Path(trained) / "checkpoints" / "999.orbax-checkpoint-tmp-1700000000000"
    (in_progress / "state").mkdir(parents=True)
    try:
        assert load_run(trained).step > 0
        assert (in_progress / "state").is_dir()
    finally:
        shutil.rmtree(in_progress)
    # the checkpoint chosen is removed by the training run (it keeps the newest and the best) before it is read:
    # said so, not "unreadable or does not match this model"
    from capsjax.config import load_config
    from capsjax.steps import default_mesh, init_state

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    config = load_config(copy / "config.json")
    checkpoints = Checkpoints(copy, read_only=True)
    step = checkpoints.latest_step()
    shutil.rmtree(copy / "checkpoints" / str(step))
    _, state = init_state(config.model, config.optim, config.seed, default_mesh())
    with pytest.raises(CheckpointError, match="was removed while it was read"):
        checkpoints.restore(state, step)
    checkpoints.close()


# ---- defect 11: output without a terminal; eval before the first epoch ends
def _cli(*args, cwd, script="train.py", env=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, **kwargs)  # fmt: skip


def test_plain_log_lines_without_a_terminal_and_eval_before_the_first_epoch(tmp_path):
    work = tmp_path / "w"
    result = _cli("--preset", "smoke", "--workdir", str(work), "--epochs", "1", "--set", "log_every_steps=2",
                  "--set", "checkpoint_every_steps=4", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "loss" in lines[0] and "img/s" in lines[0] and "ETA" in lines[0]
    # a run whose first epoch has not ended: only the periodic checkpoint at step 4
    Checkpoints(work).delete_after(4)
    result = _cli("--workdir", str(work), "--no-figures", script="eval.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "evaluating the latest checkpoint (step 4)" in result.stdout and "latest checkpoint at step 4" in result.stdout


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    import struct

    from tensorboardX.proto import event_pb2

    train_and_evaluate(dataclasses.replace(SMALL, epochs=1, tensorboard=True), tmp_path)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data, tags = events.read_bytes(), set()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12 : 12 + length])
        tags |= {v.tag for v in event.summary.value}
        data = data[16 + length :]
    assert {"train/loss", "validation/accuracy", "reconstructions"} <= tags


# ---- preemption and kill -9 through the CLI
def _driver(fault, workdir, *train_args, cwd):
    args = ["--preset", "smoke", "--workdir", str(workdir), "--quiet", "--set", "tensorboard=false", *train_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), fault, "--", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_sigterm_saves_and_the_rerun_continues_exactly(tmp_path):
    args = ("--epochs", "2", "--set", "checkpoint_every_steps=100")
    stopped = _driver("sigterm:5", tmp_path / "b", *args, cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped at step 5" in stopped.stderr and "Traceback" not in stopped.stderr
    assert Checkpoints(tmp_path / "b").all_steps()[-1] == 5
    assert _driver("none", tmp_path / "b", *args, cwd=tmp_path).returncode == 0
    assert _driver("none", tmp_path / "a", *args, cwd=tmp_path).returncode == 0
    _assert_same_params(tmp_path / "a", tmp_path / "b")


def test_chaos_kill9_at_random_moments_and_inside_saves(tmp_path):
    """Seven SIGKILLs (after steps, inside saves, in a validation), then a clean finish: the parameters, the best step
    and metrics.jsonl are those of an uninterrupted run."""
    args = ("--epochs", "3", "--set", "checkpoint_every_steps=3", "--set", "log_every_steps=2")
    assert _driver("none", tmp_path / "a", *args, cwd=tmp_path).returncode == 0
    rng = np.random.default_rng(int(time.time()))
    faults = ["save:1:0.0", f"step:{rng.integers(2, 6)}", f"save:2:{rng.uniform(0.0, 0.2):.3f}", "eval:1",
              f"step:{rng.integers(1, 5)}", f"save:{rng.integers(1, 3)}:{rng.uniform(0.0, 0.2):.3f}", "eval:2"]  # fmt: skip
    for fault in faults:
        result = _driver(fault, tmp_path / "b", *args, cwd=tmp_path)
        assert result.returncode in (-signal.SIGKILL, 0), (fault, result.stderr[-2000:])
    assert _driver("none", tmp_path / "b", *args, cwd=tmp_path).returncode == 0
    _assert_same_params(tmp_path / "a", tmp_path / "b")
    best_a, best_b = _best(tmp_path / "a")[0], _best(tmp_path / "b")[0]
    assert best_a == best_b
    records = _records(tmp_path / "b")
    keys = [(r["step"], r["split"], r.get("final", False)) for r in records]
    assert len(keys) == len(set(keys))
    assert _comparable(records) == _comparable(_records(tmp_path / "a"))
