"""Weights files (capsjax.weights): round trip, loading without a work directory, clear errors for broken files."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from capsjax import weights
from capsjax.config import ConfigError, OptimConfig, get_config
from capsjax.evaluate import load_run, predict, predict_arrays
from capsjax.steps import init_state

ROOT = Path(__file__).resolve().parents[1]
CONFIG = get_config("smoke")


@pytest.fixture(scope="module")
def params():
    _, state = init_state(CONFIG.model, OptimConfig(), seed=3)
    return jax.device_get(state.params)


def test_round_trip_keeps_config_and_parameters_to_float16(tmp_path, params):
    path = weights.save_weights(tmp_path / "w.safetensors", params, CONFIG, step=17, source="test")
    config, arrays, metadata = weights.read_weights(path)
    assert config == CONFIG and metadata["step"] == "17" and metadata["source"] == "test"
    named = weights._named_leaves(params)
    assert set(arrays) == set(named) and "classes/W" in arrays and "decoder/hidden/0/kernel" in arrays
    for name, value in named.items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], np.asarray(value).astype(np.float16).astype(np.float32))
    # float32 storage is exact
    path32 = weights.save_weights(tmp_path / "w32.safetensors", params, CONFIG, step=0, dtype="float32")
    _, exact, _ = weights.read_weights(path32)
    for name, value in named.items():
        np.testing.assert_array_equal(exact[name], value)


def test_predict_from_a_weights_file_equals_the_model_with_rounded_parameters(tmp_path, params):
    path = weights.save_weights(tmp_path / "w.safetensors", params, CONFIG, step=5)
    run = load_run(path)
    assert run.which == "weights" and run.step == 5 and run.config == CONFIG
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    from_file = predict(path, images)
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), params)
    direct = predict_arrays(run.steps, rounded, images)
    np.testing.assert_allclose(from_file.lengths, direct.lengths, rtol=1e-6, atol=1e-7)


def test_evaluating_a_weights_file_leaves_the_files_of_its_run_alone(tmp_path, params):
    # results/<run>/ holds a weights file beside the run's own eval_test.json and figures: evaluating the weights
    # wrote its eval_test.json (checkpoint "weights") and figures over them.
    from capsjax.evaluate import evaluate_workdir

    folder = tmp_path / "run"
    folder.mkdir()
    path = weights.save_weights(folder / "params.safetensors", params, CONFIG, step=5)
    (folder / "eval_test.json").write_text("{}\n")  # what the run recorded
    evaluate_workdir(path, figures=False)
    assert (folder / "eval_test.json").read_text() == "{}\n"
    assert json.loads((folder / "params_eval" / "eval_test.json").read_text())["checkpoint"] == "weights"


def test_broken_weights_files_are_one_clear_error(tmp_path, params):
    with pytest.raises(weights.WeightsError, match="not found"):
        weights.read_weights(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(weights.WeightsError, match="not a readable safetensors file"):
        weights.read_weights(garbage)
    from safetensors.numpy import load_file, save_file

    from capsjax.config import to_dict

    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(weights.WeightsError, match="not a capsjax weights file"):
        weights.read_weights(foreign)
    # a file whose arrays do not fit the config it carries (save_weights refuses to write one: edited by hand)
    path = weights.save_weights(tmp_path / "w.safetensors", params, CONFIG, step=0)
    bigger = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, class_dim=12))
    with pytest.raises(weights.WeightsError, match="the model needs"):
        weights.save_weights(tmp_path / "misfit.safetensors", params, bigger, step=0)
    _, _, metadata = weights.read_weights(path)
    misfit = tmp_path / "misfit.safetensors"
    save_file(load_file(str(path)), str(misfit), metadata={**metadata, "config": json.dumps(to_dict(bigger))})
    with pytest.raises(weights.WeightsError, match="shape"):
        load_run(misfit)
    # a file cut short
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(weights.WeightsError, match="not a readable"):
        weights.read_weights(truncated)
    with pytest.raises(ValueError, match="must end in"):
        weights.save_weights(tmp_path / "w.npz", params, CONFIG, step=0)
    # non-finite values: refused when written (a float16 overflow says so), and in a file made otherwise when read
    large = jax.tree.map(lambda a: a, params)
    large["classes"]["W"] = np.full_like(large["classes"]["W"], 1e6)
    with pytest.raises(ValueError, match="classes/W exceeds float16's range: export with --dtype float32"):
        weights.save_weights(tmp_path / "large.safetensors", large, CONFIG, step=0)
    assert weights.read_weights(weights.save_weights(tmp_path / "l.safetensors", large, CONFIG, step=0, dtype="float32"))
    large["classes"]["W"] = np.full_like(large["classes"]["W"], np.nan)
    with pytest.raises(ValueError, match="classes/W holds NaN or infinite values: export a checkpoint from before"):
        weights.save_weights(tmp_path / "nan.safetensors", large, CONFIG, step=0, dtype="float32")
    _, _, metadata = weights.read_weights(path)
    tensors = load_file(str(path))
    tensors["classes/W"] = np.full_like(tensors["classes/W"], np.nan)
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(weights.WeightsError, match="classes/W holds NaN or infinite values"):
        weights.read_weights(tmp_path / "nan.safetensors")


@pytest.mark.slow
def test_export_then_eval_cli_with_weights_matches_the_workdir(tmp_path):
    from capsjax.train import train_and_evaluate

    workdir = tmp_path / "run"
    train_and_evaluate(dataclasses.replace(CONFIG, progress=False, epochs=1), workdir)
    exported = tmp_path / "out" / "params.safetensors"
    cli = [sys.executable, "-m", "capsjax.weights", "export", str(workdir), str(exported), "--dtype", "float32"]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    results = {}
    for flag, value in (("--workdir", workdir), ("--weights", exported)):
        done = subprocess.run(
            [sys.executable, "eval.py", flag, str(value), "--no-figures", "--out-dir", str(tmp_path / flag[2:])],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results[flag] = json.loads((tmp_path / flag[2:] / "eval_test.json").read_text())
    assert results["--weights"]["accuracy"] == results["--workdir"]["accuracy"]
    assert results["--weights"]["loss"] == pytest.approx(results["--workdir"]["loss"], rel=1e-5)
    bad = subprocess.run([sys.executable, "eval.py", "--weights", str(workdir)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and ".safetensors" in bad.stderr


COMMITTED = sorted((ROOT / "results").glob("*/params.safetensors"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.parametrize("path", COMMITTED or [None], ids=lambda p: p.parent.name if p else "none")
def test_committed_weights_score_the_recorded_test_accuracy(path, mnist_dir, optimized_env, tmp_path):
    """Each reference run's float16 weights score the test accuracy its log recorded for the best-validation
    checkpoint, within 0.05 percentage points: through eval.py, as a user runs it (XLA's optimised code)."""
    if path is None:
        pytest.skip("no weights committed under results/")
    from capsjax.results import summarize

    config, _, _ = weights.read_weights(path)
    data_dir = {"mnist": mnist_dir, "fashion_mnist": FASHION_DIR}.get(config.dataset)
    if data_dir is None or not Path(data_dir).exists():
        pytest.skip(f"no local {config.dataset} data")
    done = subprocess.run(
        [sys.executable, "eval.py", "--weights", str(path), "--data-dir", str(data_dir), "--no-figures",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env={**optimized_env, "JAX_NUM_CPU_DEVICES": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = json.loads((tmp_path / "eval_test.json").read_text())["accuracy"]
    recorded = summarize(path.parent)["test_accuracy_at_best"]
    assert abs(accuracy - recorded) <= 0.0005, (accuracy, recorded)


def test_eval_refuses_other_data_as_the_runs_own(tmp_path):
    # eval.py --workdir RUN --data-dir <another dataset's folder> scored those files as the run's test set and wrote
    # them over its eval_test.json; the run now records the hashes of its validation and test sets (data.json, and the
    # weights file's metadata) and eval refuses others, for its own dataset
    from capsjax import data as datalib
    from capsjax.evaluate import evaluate_workdir
    from capsjax.train import train_and_evaluate

    rng = np.random.default_rng(0)
    for name in ("own", "other"):
        (tmp_path / name).mkdir()
        for stem, n in (("train", 96), ("t10k", 40)):
            datalib.write_idx(tmp_path / name / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8))
            datalib.write_idx(tmp_path / name / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, np.uint8))
    config = dataclasses.replace(
        CONFIG, dataset="mnist", data_dir=str(tmp_path / "own"), train_examples=None, validation_examples=32, epochs=1,
        progress=False,
    )  # fmt: skip
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    exported = weights.export_workdir(workdir, tmp_path / "params.safetensors")
    for source in (workdir, exported):
        for split in ("test", "validation"):
            with pytest.raises(datalib.DataError, match=f"mnist {split} examples from .*other are not those the run"):
                evaluate_workdir(source, split=split, data_dir=str(tmp_path / "other"), figures=False, out_dir=tmp_path)
        assert evaluate_workdir(source, figures=False, out_dir=tmp_path / "ok")["count"] == 40  # its own folder
    assert not (tmp_path / "eval_test.json").exists()  # nothing written for the refused data
    # --dataset (even the run's own dataset's name: a variant of its test set) scores the files as another set, with
    # no check against the run's own and into eval_<name>_<split>.json, not over eval_test.json
    other = evaluate_workdir(workdir, dataset="mnist", data_dir=str(tmp_path / "other"), figures=False)
    assert other["count"] == 40 and (workdir / "eval_mnist_test.json").exists()
    assert json.loads((tmp_path / "ok" / "eval_test.json").read_text())["data_sha256"] != other["data_sha256"]
    # the run's own folder whose files changed since training: the message says so (not "pass the folder in use")
    datalib.write_idx(tmp_path / "own" / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 40, np.uint8))
    with pytest.raises(datalib.DataError, match=f"examples in {tmp_path / 'own'} changed since the run was trained"):
        evaluate_workdir(workdir, figures=False, out_dir=tmp_path)


def test_bad_paths_results_folders_and_empty_data_are_refused_in_one_line(tmp_path, capsys):
    # each of these stopped eval.py or weights export with a traceback (FileExistsError, NotADirectoryError,
    # IsADirectoryError leaving a .tmp behind, TypeError on a test set of 0 images, a 7 TiB batch of padding)
    from capsjax import data as datalib
    from capsjax.cli import eval_main
    from capsjax.train import train_and_evaluate

    workdir = tmp_path / "run"
    train_and_evaluate(dataclasses.replace(CONFIG, progress=False, epochs=1), workdir)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    for argv in (["--out-dir", str(tmp_path / "file")], ["--out-dir", str(tmp_path / "file" / "sub")]):
        assert eval_main(["--workdir", str(workdir), "--no-figures", *argv], prog="eval.py") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"eval.py: error: cannot read or write {tmp_path / 'file'}")
    for target in (tmp_path / "file" / "w.safetensors", tmp_path / "folder.safetensors"):
        assert weights.main(["export", str(workdir), str(target)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot read or write {tmp_path}" in err
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file left beside the target
    from capsjax.results import collect

    collected = collect(workdir, tmp_path / "results" / "run", "python train.py ...")  # no training there
    with pytest.raises(ConfigError, match="is a results folder .*train in a work directory outside results/"):
        train_and_evaluate(dataclasses.replace(CONFIG, progress=False, epochs=2), collected)
    assert eval_main(["--workdir", str(workdir), "--no-figures", "--batch-size", str(10**12)]) == 0
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    for stem, shape in (("train", (0, 28, 28)), ("t10k", (0, 28, 28))):
        datalib.write_idx(empty / f"{stem}-images-idx3-ubyte.gz", np.zeros(shape, np.uint8))
        datalib.write_idx(empty / f"{stem}-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with pytest.raises(datalib.DataError, match="mnist test in .* holds no examples: its files are empty or damaged"):
        datalib.load("mnist", "test", empty)


def test_weights_that_would_not_load_back_are_refused_when_written_and_read(tmp_path):
    from flax import nnx

    from capsjax.model import build_model

    _, params = nnx.split(build_model(CONFIG.model, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="config must be the run's TrainConfig .* got ModelConfig"):
        weights.save_weights(tmp_path / "a.safetensors", params, CONFIG.model, step=1)  # wrote an unreadable file
    other = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, conv1_channels=24))
    with pytest.raises(weights.WeightsError, match=r"params: conv1/bias has shape \(16,\), the model needs \(24,\)"):
        weights.save_weights(tmp_path / "b.safetensors", params, other, step=1)
    assert not list(tmp_path.iterdir())
    upper = weights.save_weights(tmp_path / "W.SAFETENSORS", params, CONFIG, step=3)  # was NotADirectoryError
    assert load_run(upper).step == 3
    with pytest.raises(ConfigError, match="not found: is this a capsjax work directory"):
        load_run(tmp_path / "W.safetensors.bak")
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(upper), framework="numpy") as handle:
        metadata = handle.metadata()
    for change in ({"step": "abc"}, {"config": "{}"}, {"config": '{"model": {}}'}, {"config": '{"model": 5}'}):
        save_file(load_file(str(upper)), str(tmp_path / "bad.safetensors"), metadata={**metadata, **change})
        with pytest.raises(weights.WeightsError, match="its config or step does not read back"):
            weights.read_weights(tmp_path / "bad.safetensors")
