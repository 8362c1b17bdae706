"""results/ and the README's results table (capsjax.results): summaries by hand, the table generated, not typed."""

import json
from pathlib import Path

import pytest

from capsjax import results
from capsjax.config import get_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, test_by_epoch, validation_by_epoch, epoch_seconds, steps_per_epoch=10, epochs=5):
    import dataclasses

    folder.mkdir(parents=True)
    save_config(dataclasses.replace(get_config("default"), epochs=epochs), folder / "config.json")
    lines = []
    for epoch, (test, val, seconds) in enumerate(zip(test_by_epoch, validation_by_epoch, epoch_seconds), 1):
        step = epoch * steps_per_epoch
        lines.append({"step": step - 5, "split": "train", "loss": 0.1})
        lines.append({"step": step, "split": "validation", "accuracy": val, "epoch_time_s": seconds})
        lines.append({"step": step, "split": "test", "accuracy": test})
    lines.append({"step": lines[-1]["step"], "split": "test", "accuracy": 0.5, "final": True})  # not an epoch's
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 99, "spl')


def test_summary_by_hand(tmp_path):
    folder = tmp_path / "run"
    write_run(folder, [0.990, 0.995, 0.994], [0.991, 0.996, 0.996], [60.0, 90.0, 30.0])
    s = results.summarize(folder)
    assert (s["epochs_done"], s["epochs_planned"], s["wall_time_s"]) == (3, 5, 180.0)
    # best validation: epoch 3 ties with epoch 2 and comes later; the checkpoint manager keeps the newest of equals
    assert (s["best_validation_accuracy"], s["best_epoch"], s["test_accuracy_at_best"]) == (0.996, 3, 0.994)
    assert s["last_test_accuracy"] == 0.994
    assert s["seconds_to_target"] == 150.0  # 99.5% first reached at the end of epoch 2
    write_run(tmp_path / "slow", [0.98, 0.99], [0.98, 0.99], [60.0, 60.0])
    assert results.summarize(tmp_path / "slow")["seconds_to_target"] is None


def test_collect_then_table(tmp_path):
    workdir = tmp_path / "workdir"
    write_run(workdir, [0.99], [0.99], [120.0])
    (workdir / "big.png").write_bytes(b"\0" * (results.MAX_FIGURE_BYTES + 1))
    (workdir / "small.png").write_bytes(b"\0" * 10)
    (workdir / "checkpoints").mkdir()
    dest = results.collect(workdir, tmp_path / "results" / "mnist-x", "python train.py --x", note="shared CPU")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "metrics.jsonl", "record.json", "small.png"]
    record = json.loads((dest / "record.json").read_text())
    assert record["status"] == "in progress" and record["note"] == "shared CPU" and record["machine"]
    first = record["first_collected"]
    (workdir / "results.json").write_text("{}")
    record = json.loads((results.collect(workdir, dest, "python train.py --x") / "record.json").read_text())
    assert record["status"] == "complete" and record["first_collected"] == first and record["note"] == "shared CPU"
    text = results.table(tmp_path / "results")
    row = text.splitlines()[2]
    assert "[mnist-x](results/mnist-x)" in row and "99.00% (epoch 1)" in row and "2 min" in row
    assert "`python train.py --x`" in row and "1 of 5" in row
    # the run goes on for more epochs (its results.json goes), then diverges: the copies follow, nothing stale stays
    (workdir / "results.json").unlink()
    (workdir / "small.png").write_bytes(b"\0" * (results.MAX_FIGURE_BYTES + 1))  # grew past the limit
    (workdir / "diverged.json").write_text('{"step": 12, "safe_step": 10}')
    (dest / "params.safetensors").write_bytes(b"w")  # not a copy of the workdir's: kept
    record = json.loads((results.collect(workdir, dest, "python train.py --x") / "record.json").read_text())
    assert record["status"] == "diverged at step 12: rerun with a lower learning rate"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "diverged.json", "metrics.jsonl",
                                                      "params.safetensors", "record.json"]  # fmt: skip
    with pytest.raises(ValueError, match="config.json"):
        results.collect(tmp_path / "nothing", tmp_path / "results" / "y", "cmd")


def test_collect_refuses_to_mix_two_runs_in_one_folder(tmp_path):
    import dataclasses

    # results/quick once received another run's files over its own (a reused work directory of an older recipe): the
    # table then showed 94.97% where the recorded run had 98.29%
    first, dest = tmp_path / "first", tmp_path / "results" / "quick"
    write_run(first, [0.98], [0.98], [60.0])
    results.collect(first, dest, "python train.py --a")
    other = tmp_path / "other"
    write_run(other, [0.95], [0.95], [60.0])
    save_config(dataclasses.replace(get_config("default"), batch_size=32), other / "config.json")
    with pytest.raises(ValueError, match="another run .*batch_size 128 -> 32"):
        results.collect(other, dest, "python train.py --b")
    assert json.loads((dest / "record.json").read_text())["command"] == "python train.py --a"  # nothing copied
    # the same settings, other first steps (trained again from scratch): refused too
    again = tmp_path / "again"
    write_run(again, [0.95], [0.95], [60.0])
    metrics = (again / "metrics.jsonl").read_text().replace('"loss": 0.1', '"loss": 0.2', 1)
    (again / "metrics.jsonl").write_text(metrics)
    with pytest.raises(ValueError, match="first logged steps differ"):
        results.collect(again, dest, "python train.py --b")
    # the same run grown (more epochs, a lower learning rate after a divergence) is collected; --replace takes another
    save_config(dataclasses.replace(get_config("default"), epochs=9, optim=dataclasses.replace(
        get_config("default").optim, learning_rate=5e-4)), first / "config.json")  # fmt: skip
    results.collect(first, dest, "python train.py --a")
    results.collect(other, dest, "python train.py --b", replace=True)
    record = json.loads((dest / "record.json").read_text())
    assert record["command"] == "python train.py --b" and "note" not in record
    assert json.loads((dest / "config.json").read_text())["batch_size"] == 32
    # results/ itself, or the work directory itself: refused (the files landed beside the run folders)
    with pytest.raises(ValueError, match="holds run folders \\(quick\\): collect into a folder of its own"):
        results.collect(first, tmp_path / "results", "python train.py --a")
    assert not (tmp_path / "results" / "record.json").exists()
    with pytest.raises(ValueError, match="is the work directory itself"):
        results.collect(first, first, "python train.py --a")


def test_write_table_between_the_markers(tmp_path):
    write_run(tmp_path / "results" / "a", [0.9], [0.9], [60.0])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nold table\n{results.END}\nafter\n")
    assert not results.write_table(readme, tmp_path / "results", check=True)
    results.write_table(readme, tmp_path / "results")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old table" not in text and "90.00%" in text
    assert results.write_table(readme, tmp_path / "results", check=True)
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        results.write_table(tmp_path / "plain.md", tmp_path / "results")


def test_the_readme_results_table_is_generated_from_results():
    assert results.write_table(ROOT / "README.md", ROOT / "results", check=True), (
        "README.md's results table differs from results/: run python -m capsjax.results table --write README.md"
    )


def test_the_best_of_equal_epochs_is_the_one_the_checkpoints_keep(tmp_path):
    # The table reported the first of two epochs with equal validation accuracy; eval.py, results.json and the
    # weights export use the checkpoint manager's best step, the newest of equals.
    import jax.numpy as jnp

    from capsjax.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "run")
    for step in (3, 6):
        checkpoints.save(step, {"w": jnp.zeros(2)}, metrics={"accuracy": 0.996})
    assert checkpoints.best_step() == 6
    checkpoints.close()
    write_run(tmp_path / "logged", [0.995, 0.994], [0.996, 0.996], [60.0, 60.0])
    assert results.summarize(tmp_path / "logged")["best_epoch"] == 2


def test_a_partly_timed_epoch_makes_the_wall_time_a_lower_bound(tmp_path):
    folder = tmp_path / "run"
    write_run(folder, [0.990, 0.996], [0.991, 0.996], [60.0, 30.0])  # 10 steps per epoch
    lines = (folder / "metrics.jsonl").read_text().splitlines()[:-1]  # without the cut-off line
    records = [json.loads(line) for line in lines]
    for r in records:
        if r["split"] == "validation":
            r["timed_steps"] = 10 if r["step"] == 10 else 4  # epoch 2 was resumed after its 6th step
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert results.summarize(folder)["partly_timed"]
    row = results.table(tmp_path).splitlines()[-1]
    assert "| ≥ 2 min | ≥ 2 min |" in row, row  # 90 s in all, 99.5% test reached in epoch 2
    for r in records:
        r.pop("timed_steps", None)  # a log written before timed_steps existed: taken as whole
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert not results.summarize(folder)["partly_timed"]


def test_a_run_without_validation_examples_is_summarized_from_its_test_records(tmp_path):
    # With validation_examples=0 each epoch's timed record is its test record: the table showed "0 of N" epochs.
    folder = tmp_path / "run"
    folder.mkdir()
    save_config(get_config("default"), folder / "config.json")
    records = [{"step": 10 * e, "split": "test", "accuracy": a, "epoch_time_s": 60.0, "timed_steps": 10}
               for e, a in ((1, 0.990), (2, 0.996))]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = results.summarize(folder)
    assert (s["epochs_done"], s["wall_time_s"]) == (2, 120.0)
    assert s["last_test_accuracy"] == 0.996 and s["seconds_to_target"] == 120.0
    assert s["best_validation_accuracy"] is None and s["test_accuracy_at_best"] is None  # no test-set selection


def test_the_paper_table_puts_each_test_evaluation_beside_the_papers_figure(tmp_path):
    import dataclasses

    def run(name, config, evals):
        folder = tmp_path / "results" / name
        write_run(folder, [0.9], [0.9], [60.0], epochs=config.epochs)
        save_config(config, folder / "config.json")
        for file, e in evals.items():
            (folder / file).write_text(json.dumps(e))

    multi = get_config("multimnist")
    run("multi", dataclasses.replace(multi, epochs=1),
        {"eval_test.json": {"split": "test", "accuracy": 0.6, "almost_accuracy": 0.97, "count": 10000,
                            "dataset": "multimnist"}})  # fmt: skip
    expanded = get_config("expanded_mnist")
    cnn = dataclasses.replace(expanded, model=dataclasses.replace(expanded.model, arch="cnn"), epochs=2)
    run("cnn", cnn, {"eval_test.json": {"split": "test", "accuracy": 0.99, "dataset": "mnist"},
                     "eval_affine_mnist_test.json": {"split": "test", "accuracy": 0.7, "dataset": "affine_mnist",
                                                     "data_sha256": "0123456789abcdef"},
                     "eval_validation.json": {"split": "validation", "accuracy": 0.5}})  # fmt: skip
    small = dataclasses.replace(cnn.model, cnn_channels=(64, 64, 32), cnn_hidden=(256, 192))
    run("cnn_small", dataclasses.replace(cnn, model=small),
        {"eval_test.json": {"split": "test", "accuracy": 0.98, "dataset": "mnist"}})
    em = get_config("default")
    run("em", dataclasses.replace(em, model=dataclasses.replace(em.model, routing="em")),
        {"eval_test.json": {"split": "test", "accuracy": 0.98, "dataset": "mnist"}})
    run("plain", dataclasses.replace(em, model=dataclasses.replace(em.model, use_decoder=False)),
        {"eval_test.json": {"split": "test", "accuracy": 0.99, "dataset": "mnist"}})
    rows = results.paper_table(tmp_path / "results").splitlines()[2:]
    assert rows == [
        "| [cnn](results/cnn/eval_affine_mnist_test.json) | baseline CNN | expanded MNIST (40×40), 1 of 2 epochs "
        "| affine_mnist (capsjax's approximation of affNIST) | 01234567 | 70.00% | 30.00% | affNIST: 66% |",
        "| [cnn](results/cnn/eval_test.json) | baseline CNN | expanded MNIST (40×40), 1 of 2 epochs "
        "| expanded MNIST test (40×40, fixed offsets) | – | 99.00% | 1.00% | 99.22% |",
        "| [cnn_small](results/cnn_small/eval_test.json) | CNN (64-64-32 channels, 5×5; 256-192 hidden) "
        "| expanded MNIST (40×40), 1 of 2 epochs | expanded MNIST test (40×40, fixed offsets) | – | 98.00% | 2.00% | – |",
        "| [em](results/em/eval_test.json) | CapsNet (em routing, 3 iterations) | MNIST, 1 of 50 epochs "
        "| MNIST test | – | 98.00% | 2.00% | – |",  # not the paper's model: no figure beside it
        "| [multi](results/multi/eval_test.json) | CapsNet (dynamic routing, 3 iterations) | MultiMNIST, 1 of 1 epoch "
        "| MultiMNIST test pairs (10,000) | – | 60.00% exact-set (97.00% almost) | 40.00% | 5.2% error |",
        "| [plain](results/plain/eval_test.json) | CapsNet (dynamic routing, 3 iterations, no decoder) "
        "| MNIST, 1 of 50 epochs | MNIST test | – | 99.00% | 1.00% | – |",
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n{results.PAPER_BEGIN}\nold\n{results.PAPER_END}\n")
    results.write_table(readme, tmp_path / "results")
    assert rows[-1] in readme.read_text() and "old" not in readme.read_text()
    assert results.write_table(readme, tmp_path / "results", check=True)


@pytest.mark.parametrize(
    ("flags", "described"),
    [({"avx2"}, "AVX2"), ({"avx2", "avx512f", "avx512_bf16"}, "AVX-512 with bf16"),
     ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX-512 with AMX bf16")],
)  # fmt: skip
def test_the_machine_names_the_cpu_and_its_bfloat16_arithmetic(monkeypatch, flags, described):
    monkeypatch.setattr(results, "cpu_flags", lambda: flags)
    monkeypatch.setattr(results, "cpu_model", lambda: "Some CPU")
    monkeypatch.setattr(results.os, "cpu_count", lambda: 2)
    assert results.machine() == f"Some CPU, 2 cores, {described}"


def test_the_table_names_each_runs_model_and_training_set(tmp_path):
    import dataclasses

    from capsjax.config import ModelConfig

    cases = {
        "paper": (get_config("default"), "| CapsNet (dynamic routing, 3 iterations) | MNIST |"),
        "efficient": (get_config("efficient_capsnet"), "| Efficient-CapsNet | MNIST |"),
        "em": (dataclasses.replace(get_config("quick"), model=ModelConfig(routing="em", routing_iterations=2)),
               "| CapsNet (em routing, 2 iterations) | MNIST |"),
        "no_decoder": (dataclasses.replace(get_config("quick"), model=ModelConfig(use_decoder=False)),
                       "| CapsNet (dynamic routing, 3 iterations, no decoder) | MNIST |"),
        "expanded": (dataclasses.replace(get_config("expanded_mnist"), model=dataclasses.replace(
            get_config("expanded_mnist").model, arch="cnn")), "| baseline CNN | expanded MNIST (40×40) |"),
    }  # fmt: skip
    for name, (config, _) in cases.items():
        write_run(tmp_path / name, [0.99], [0.99], [60.0])
        save_config(config, tmp_path / name / "config.json")
    rows = {row.split("]")[0][3:]: row for row in results.table(tmp_path).splitlines()[2:]}
    for name, (_, expected) in cases.items():
        assert expected in rows[name], rows[name]


def test_the_robustness_table_lists_each_epochs_own_and_other_test_accuracy(tmp_path, capsys):
    import dataclasses

    expanded = get_config("expanded_mnist")
    folder = tmp_path / "results" / "caps"
    write_run(folder, [0.96, 0.98], [0.97, 0.985], [60.0, 60.0], epochs=2)
    save_config(dataclasses.replace(expanded, epochs=2, also_test_on=("affine_mnist",)), folder / "config.json")
    lines = (folder / "metrics.jsonl").read_text().splitlines()[:-1]  # without the torn last line
    extra = [{"step": 10, "epoch": 1, "split": "affine_mnist", "accuracy": 0.70},
             {"step": 20, "epoch": 2, "split": "affine_mnist", "accuracy": 0.60},
             {"step": 20, "epoch": 2, "split": "affine_mnist", "accuracy": 0.75}]  # fmt: skip  (resumed: the last)
    (folder / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(r) for r in extra]) + "\n")
    write_run(tmp_path / "results" / "plain", [0.99], [0.99], [60.0])  # scored no other set: no rows
    assert results.robustness(folder) == {"affine_mnist": [(1, 0.96, 0.70), (2, 0.98, 0.75)]}
    rows = results.robustness_table(tmp_path / "results").splitlines()[2:]
    approx = "affine_mnist (capsjax's approximation of affNIST)"
    caps = "| [caps](results/caps) | CapsNet (dynamic routing, 3 iterations) | expanded MNIST (40×40)"
    assert rows == [f"{caps} | 1 | 96.00% | {approx} | 70.00% |", f"{caps} | 2 | 98.00% | {approx} | 75.00% |"]
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n{results.ROBUST_BEGIN}\nold\n{results.ROBUST_END}\n")
    results.write_table(readme, tmp_path / "results")
    assert rows[-1] in readme.read_text() and "old" not in readme.read_text()
    out = tmp_path / "robustness.png"
    assert results.main(["robustness", str(folder), "--out", str(out)]) == 0 and out.stat().st_size > 1000
    assert results.main(["robustness", str(tmp_path / "results" / "plain"), "--out", str(out)]) == 2
    # a folder that is not a run was skipped without a word; --out without a suffix wrote NAME.png and said NAME
    assert results.main(["robustness", str(folder), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing is not a run folder" in capsys.readouterr().err
    assert results.main(["robustness", str(folder), "--out", str(tmp_path / "figure")]) == 0
    assert f"wrote {tmp_path / 'figure.png'}" in capsys.readouterr().out and (tmp_path / "figure.png").exists()
    # a results folder that does not exist was an empty table; --write with --check only checked
    assert results.main(["table", "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (argparse's usage errors are one line too, as in train.py and eval.py)
        results.main(["table", "--write", str(readme), "--check", str(readme)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with argument --write (see --help)" in err


def test_the_matched_table_pairs_the_epochs_whose_own_accuracies_are_closest(tmp_path):
    import dataclasses

    expanded = dataclasses.replace(get_config("expanded_mnist"), epochs=3, also_test_on=("affine_mnist",))
    cnn = dataclasses.replace(expanded, model=dataclasses.replace(expanded.model, arch="cnn"))

    def run(name, config, own, other):
        folder = tmp_path / "results" / name
        write_run(folder, own, own, [60.0] * len(own), epochs=3)
        save_config(config, folder / "config.json")
        extra = [{"step": 10 * e, "epoch": e, "split": "affine_mnist", "accuracy": a} for e, a in enumerate(other, 1)]
        with open(folder / "metrics.jsonl", "a") as f:  # after the torn line: read_metrics skips only that one
            f.write("\n" + "".join(json.dumps(r) + "\n" for r in extra))

    run("caps", expanded, [0.96, 0.980, 0.990], [0.70, 0.75, 0.80])
    run("cnn", cnn, [0.975, 0.985, 0.992], [0.72, 0.74, 0.76])
    run("plain", get_config("default"), [0.99], [0.5])  # trained on MNIST: paired with nothing
    assert results.closest_epochs([(1, 0.5, 0.1), (2, None, 0.2)], [(1, None, 0.3)]) is None
    # |0.990-0.992| = 0.002 is the closest pair; 0.980 against 0.975 and 0.985 (0.005) come after it
    rows = results.matched_table(tmp_path / "results").splitlines()[2:]
    assert rows == [
        "| expanded MNIST (40×40) | affine_mnist (capsjax's approximation of affNIST) | [caps](results/caps) (3) "
        "| 99.00% | 80.00% | [cnn](results/cnn) (3) | 99.20% | 76.00% | +4.00 pp |"
    ]
    # runs whose final evaluations scored different examples get no difference
    for name, digest in (("caps", "aa"), ("cnn", "bb")):
        (tmp_path / "results" / name / "eval_affine_mnist_test.json").write_text(json.dumps({"data_sha256": digest}))
    different = results.matched_table(tmp_path / "results").splitlines()[2]
    assert different.endswith("| 76.00% | – (scored on different examples) |")
    (tmp_path / "results" / "cnn" / "eval_affine_mnist_test.json").write_text(json.dumps({"data_sha256": "aa"}))
    assert results.matched_table(tmp_path / "results").splitlines()[2:] == rows
    # equally close pairs: the one with the higher own accuracies
    a, b = [(1, 0.97, 0.1), (2, 0.98, 0.2)], [(1, 0.975, 0.3), (2, 0.99, 0.4)]
    assert results.closest_epochs(a, b) == ((2, 0.98, 0.2), (1, 0.975, 0.3))
    assert results._points(0.770 - 0.7743) == "\u22120.43 pp" and results._points(0.0) == "+0.00 pp"
    assert results._points(0.9 - 0.90004) == "+0.00 pp"  # rounds to zero from below: no "-0.00"
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n{results.MATCHED_BEGIN}\nold\n{results.MATCHED_END}\n")
    assert not results.write_table(readme, tmp_path / "results", check=True)
    results.write_table(readme, tmp_path / "results")
    assert rows[0] in readme.read_text() and results.write_table(readme, tmp_path / "results", check=True)


def test_a_damaged_file_in_results_is_one_line_naming_it(tmp_path, capsys):
    # a hand-edited or truncated eval JSON in a results folder stopped the table generator with a bare decoder message
    write_run(tmp_path / "results" / "run", [0.99], [0.99], [10.0], epochs=1)
    (tmp_path / "results" / "run" / "eval_test.json").write_text('{"accuracy": 0.99')
    assert results.main(["table", "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval_test.json is not valid JSON" in err and "collect the run again" in err
