"""Two processes on localhost, each with two simulated CPU devices, as one data-parallel run through the CLI:
kill -9 and resume, SIGTERM to one process, a work directory that is not shared, and a peer that dies."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# TensorBoard on, as in the README's commands (its reconstructions are a prediction across the processes, which
# crashed every multi-process run at the end of its first epoch)
ARGS = ("--preset", "smoke", "--quiet", "--epochs", "4", "--set", "checkpoint_every_steps=4")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), **extra}


def _pair(workdirs, port, args=(), own=((), ()), **env):
    """Starts processes 0 and 1 (``workdirs``: one path for both, or one each) with ``args`` after :data:`ARGS`, and
    each its ``own`` arguments after those."""
    if not isinstance(workdirs, (list, tuple)):
        workdirs = (workdirs, workdirs)
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *ARGS, *args, *own[i], "--workdir", str(w),
             "--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=_env(2, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i, w in enumerate(workdirs)
    ]


def _wait_for_checkpoint(workdir: Path, step: int, procs, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)


def _script_pair(script: str, args=lambda i: ()):
    """Runs the Python ``script`` as processes 0 and 1 of one run (its argv: the coordinator's address, the process
    index, then ``args(index)``) to the end; their (return code, stdout, stderr)."""
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"localhost:{port}", str(i), *args(i)], env=_env(2),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(2)
    ]
    try:
        return _finish(procs, timeout=240)
    finally:
        for p in procs:
            p.kill()


def _finish(procs, timeout=300):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _params(workdir):
    from capsjax.evaluate import load_run

    return jax.device_get(load_run(workdir, "latest", log=lambda _: None).params)


def test_two_processes_resume_after_kill_and_sigterm_and_match_one_process(tmp_path):
    work = tmp_path / "two"
    procs = _pair(work, _free_port())
    _wait_for_checkpoint(work, 4, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs)
    procs = _pair(work, _free_port())  # resumes from step 4; SIGTERM to process 1 only, once step 8 is saved
    _wait_for_checkpoint(work, 8, procs)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    stops = []
    for code, stdout, stderr in results:
        assert code in (0, 128 + signal.SIGTERM), stderr[-3000:]
        if code:
            assert "Traceback" not in stderr and "Check failure" not in stderr, stderr[-3000:]
            stops.append(stderr.split("stopped at step ")[1].split(";")[0])
    assert len(set(stops)) <= 1  # both processes stop at the same step
    results = _finish(_pair(work, _free_port()))
    assert all(code == 0 for code, _, _ in results), results[0][2][-3000:]
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *ARGS, "--workdir", str(tmp_path / "one")],
                         env=_env(4), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(jax.tree.leaves(_params(work)), jax.tree.leaves(_params(tmp_path / "one"))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_two_processes_restart_a_diverged_run_with_new_settings(tmp_path):
    # A learning rate that grows 1e6-fold every step blows the loss up; the rerun with the preset's optimizer rolls
    # back to the checkpoint from before. Every process must take part in the roll-back's checkpoint deletions (Orbax
    # waits on a barrier in each): when process 0 alone deleted, the processes met at different barriers and the run
    # could never be restarted.
    one_epoch = ("--epochs", "1", "--set", "checkpoint_every_steps=1", "--set", "safe_checkpoint_margin=2")
    blown = (*one_epoch, "--set", "optim.decay_rate=1e6", "--set", "optim.decay_steps=1")
    results = _finish(_pair(tmp_path, _free_port(), args=blown))
    assert [code for code, _, _ in results] == [1, 1] and "non-finite" in results[0][2], results[0][2][-3000:]
    results = _finish(_pair(tmp_path, _free_port(), args=one_epoch))
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "restarting from step" in results[0][1]
    assert (tmp_path / "results.json").exists() and not (tmp_path / "diverged.json").exists()


def test_a_workdir_that_is_not_shared_is_a_clear_error(tmp_path):
    procs = _pair([tmp_path / "host0", tmp_path / "host1"], _free_port(), CAPSJAX_SHARED_TIMEOUT_S="5")
    for code, _, stderr in _finish(procs):
        assert code == 1 and "is not shared between the processes" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr


def test_a_dead_peer_ends_the_other_process_with_one_line(tmp_path):
    work = tmp_path / "w"
    procs = _pair(work, _free_port(), CAPSJAX_PEER_TIMEOUT_S="8")
    _wait_for_checkpoint(work, 4, procs)
    procs[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    code, _, stderr = _finish(procs[:1], timeout=120)[0]
    procs[1].wait()
    assert code == 1 and time.monotonic() - started < 60, stderr[-3000:]
    assert "process 1 stopped responding" in stderr or "lost contact with another process" in stderr, stderr[-3000:]
    assert len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    assert "Check failure" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not (work / "LOCK").exists()  # released: a relaunch with process 0 on another host may take the workdir


def test_processes_launched_with_other_settings_are_refused(tmp_path):
    # each process trained with its own seed (or data) without a word: mismatched examples, or a hang when their step
    # counts differed
    results = _finish(_pair(tmp_path / "w", _free_port(), own=((), ("--set", "seed=1"))))
    for code, _, stderr in results:
        assert code == 1 and "process 1 differs from process 0 in their settings: launch" in stderr, stderr[-3000:]
        assert len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    assert not (tmp_path / "w" / "checkpoints").exists()
    # where each host keeps its copy of the files is its own (synthetic data here: the folder is not read)
    results = _finish(_pair(tmp_path / "q", _free_port(), args=("--epochs", "1"), own=((), ("--data-dir", "/srv"))))
    assert [code for code, _, _ in results] == [0, 0], results[1][2][-3000:]


PREDICT = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh
from capsjax import data as datalib, distributed
from capsjax.config import get_config
from capsjax.evaluate import predict_arrays
from capsjax.steps import init_state, make_steps

distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
config = get_config("smoke")
mesh = Mesh(np.array(jax.devices()[::-1]), ("data",))  # process 1's devices first: its rows lead the global batch
graphdef, state = init_state(config.model, config.optim, 0, mesh)
steps = make_steps(graphdef, config.optim, mesh=mesh)
images, _ = datalib.load_synthetic(5, seed=3)
out = predict_arrays(steps, state.params, images, batch_size=4)  # 5 images in batches of 4: the second padded
if jax.process_index() == 0:
    np.savez(sys.argv[3], lengths=out.lengths, reconstructions=out.reconstructions)
"""


def test_prediction_across_processes_keeps_the_images_order(tmp_path):
    # every process's slice of a global batch went back to the host in the mesh's device order, which need not be the
    # processes' order; padding is masked out on the global batch
    from capsjax import data as datalib
    from capsjax.config import get_config
    from capsjax.evaluate import predict_arrays
    from capsjax.steps import init_state, make_steps

    result = tmp_path / "two.npz"
    for code, _, stderr in _script_pair(PREDICT, lambda i: (str(result),)):
        assert code == 0, stderr[-3000:]
    config = get_config("smoke")
    graphdef, state = init_state(config.model, config.optim, 0)
    images, _ = datalib.load_synthetic(5, seed=3)
    one = predict_arrays(make_steps(graphdef, config.optim), state.params, images, batch_size=4)
    two = np.load(result)
    assert two["lengths"].shape == (5, 10)
    np.testing.assert_allclose(two["lengths"], one.lengths, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two["reconstructions"], one.reconstructions, rtol=1e-4, atol=1e-6)


EVALUATE = """
import sys
from capsjax import distributed
from capsjax.evaluate import evaluate_workdir

distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
metrics = evaluate_workdir(sys.argv[3], out_dir=sys.argv[4])
print(metrics["accuracy"], len(metrics["figures"]))
"""


def test_evaluate_workdir_with_figures_across_processes(tmp_path):
    # the figures' predictions (and the pose grid's decodings) ran on process 0 alone, a computation over every
    # process's devices that the others never joined: a library call of evaluate_workdir hung in a multi-process run
    import dataclasses

    from capsjax.config import get_config
    from capsjax.evaluate import evaluate_workdir
    from capsjax.train import train_and_evaluate

    workdir = tmp_path / "run"
    train_and_evaluate(dataclasses.replace(get_config("smoke"), epochs=1, progress=False), workdir)
    one = evaluate_workdir(workdir, out_dir=tmp_path / "one")
    results = _script_pair(EVALUATE, lambda i: (str(workdir), str(tmp_path / f"out{i}")))
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    (accuracy0, drawn0), (accuracy1, drawn1) = (out.splitlines()[-1].split() for _, out, _ in results)
    assert float(accuracy0) == float(accuracy1) == one["accuracy"]
    assert int(drawn0) == len(one["figures"]) >= 4 and int(drawn1) == 0  # drawn once, by process 0
    assert sorted(p.name for p in (tmp_path / "out0").glob("*.png")) == sorted(Path(p).name for p in one["figures"])
    assert not list((tmp_path / "out1").glob("*.png"))
