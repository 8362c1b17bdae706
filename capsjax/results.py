"""The reference runs in ``results/``: collect a run's small files, summarize them, and generate the README's table.

Each reference run has one folder ``results/<name>/`` with the run's ``config.json``, ``metrics.jsonl``,
``results.json`` (once finished), its evaluation JSON and a few small figures, plus ``record.json``: the exact command,
the machine, the first and last time the folder was collected, and the status. Orbax checkpoints stay in the run's
work directory (outside the repository); a reference run's final weights may sit beside them as
``params.safetensors`` (:mod:`capsjax.weights`).

    python -m capsjax.results collect ~/capsjax-runs/mnist-default results/mnist-default \\
        --command "python train.py --preset default --data-dir ../shared/data/mnist --workdir ~/capsjax-runs/mnist-default"
    python -m capsjax.results table --write README.md     # regenerate the tables between the README's markers
    python -m capsjax.results replay results/mnist-default --data-dir ../shared/data/mnist --steps 100
    python -m capsjax.results robustness results/expanded_capsnet-8ep results/expanded_cnn_matched-8ep \\
        --out results/robustness.png                      # accuracy on affine_mnist against the own test accuracy

Every figure of the tables (the results table and the table against the paper) is computed here from those files:
nothing in them is typed by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from capsjax.files import read_json

COPIED = ("config.json", "metrics.jsonl", "results.json", "diverged.json")
COPIED_GLOBS = ("eval_*.json", "*.png")
MAX_FIGURE_BYTES = 400_000  # figures above this stay in the work directory
BEGIN, END = "<!-- results table: begin (python -m capsjax.results table --write README.md) -->", "<!-- results table: end -->"
TARGET_ACCURACY = 0.995  # "time to 99.5%" in the table
_RECOLLECT = "restore it from git, or collect the run again (python -m capsjax.results collect WORKDIR FOLDER)"


def cpu_model() -> str:
    """``lscpu``'s model name (the platform's processor name where ``lscpu`` is missing)."""
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return model


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return set()


def machine() -> str:
    """The CPU model (:func:`cpu_model`), core count and widest vector extension (with bfloat16 arithmetic, and AMX
    matrix units, if the CPU has them), or the accelerator JAX would use."""
    try:
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{jax.device_count()} x {device.device_kind}"
    except Exception:  # noqa: BLE001 (no JAX backend: describe the CPU)
        pass
    flags = cpu_flags()
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    bf16 = " with AMX bf16" if "amx_bf16" in flags else " with bf16" if "avx512_bf16" in flags else ""
    return ", ".join(part for part in (cpu_model(), f"{os.cpu_count()} cores", vector + bf16) if part)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a line cut short by a crash is skipped)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def summarize(folder: Path) -> dict[str, Any]:
    """What the table shows of one run folder: epochs done and planned, the best validation accuracy and the test
    accuracy logged for that checkpoint, the last test accuracy, wall time (the sum of the epochs' logged wall times:
    training plus the epoch's validation and test), ``partly_timed`` (some epoch was resumed inside, so its logged time
    misses the steps before the resume), and the wall time until the test accuracy first reached
    :data:`TARGET_ACCURACY` (None if it never did)."""
    folder = Path(folder)
    config = read_json(folder / "config.json", _RECOLLECT)
    record = read_json(folder / "record.json", _RECOLLECT) if (folder / "record.json").exists() else {}
    records = read_metrics(folder / "metrics.jsonl")
    # each epoch's record: its validation, or its test for a run that held out no validation examples
    epochs = [r for r in records if "epoch_time_s" in r and r.get("split") in ("validation", "test")]
    validation = [r for r in epochs if r["split"] == "validation"]
    tests = _epoch_tests(records)
    summary: dict[str, Any] = {
        "name": folder.name,
        "dataset": config["dataset"],
        "trained_on": _trained_on(config),
        "model": _model_name(config.get("model", {}))[0],
        "epochs_done": len(epochs),
        "epochs_planned": config["epochs"],
        "wall_time_s": sum(r["epoch_time_s"] for r in epochs),
        "command": record.get("command", ""),
        "machine": record.get("machine", ""),
        "status": record.get("status", ""),
        "best_validation_accuracy": None,
        "test_accuracy_at_best": None,
        "last_test_accuracy": None,
        "seconds_to_target": None,
        "partly_timed": False,
    }
    previous_step = 0
    for r in epochs:  # logs written before "timed_steps" existed: unknown, taken as whole
        if r.get("timed_steps", r["step"] - previous_step) < r["step"] - previous_step:
            summary["partly_timed"] = True
        previous_step = r["step"]
    if validation:
        # the newest of equals, as the checkpoint manager (Orbax's best step and BestN take the last of a stable sort)
        best = max(validation, key=lambda r: (r["accuracy"], r["step"]))
        summary["best_validation_accuracy"] = best["accuracy"]
        summary["best_epoch"] = round(best["step"] / (validation[0]["step"] or 1))
        summary["test_accuracy_at_best"] = tests.get(best["step"], {}).get("accuracy")
    elapsed = 0.0
    for r in epochs:
        elapsed += r["epoch_time_s"]
        accuracy = tests.get(r["step"], {}).get("accuracy")
        if accuracy is not None:
            summary["last_test_accuracy"] = accuracy
            if summary["seconds_to_target"] is None and accuracy >= TARGET_ACCURACY:
                summary["seconds_to_target"] = elapsed
    return summary


def _epoch_tests(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The test records logged at epochs' ends (not the final test), by step; a step logged twice keeps the last."""
    return {r["step"]: r for r in records if r.get("split") == "test" and not r.get("final")}


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _runs(results_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The run folders of ``results_dir`` (those with a ``config.json``), in name order, each with its config."""
    if not Path(results_dir).is_dir():
        raise ValueError(f"{results_dir} is not a folder: give the results folder (--results-dir)")
    folders = sorted(p for p in Path(results_dir).glob("*") if (p / "config.json").exists())
    return [(folder, read_json(folder / "config.json", _RECOLLECT)) for folder in folders]


def table(results_dir: str | Path = "results") -> str:
    """The README's results table (Markdown), one row per folder of ``results_dir`` that has a ``config.json``."""
    rows = [
        "| run | model | trained on | epochs | test accuracy (best-validation checkpoint) | best validation | last test "
        f"| wall time | to {100 * TARGET_ACCURACY:g}% test | machine | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for folder, _ in _runs(results_dir):
        s = summarize(folder)
        epochs = f"{s['epochs_done']} of {s['epochs_planned']}"
        if s["status"] and s["status"] != "complete":
            epochs += f" ({s['status']})"
        at_least = "≥ " if s["partly_timed"] else ""  # an epoch resumed inside was timed from the resume only
        best = _percent(s["test_accuracy_at_best"])
        if s["best_validation_accuracy"] is not None:
            best += f" (epoch {s['best_epoch']})"
        rows.append(
            f"| [{s['name']}](results/{s['name']}) | {s['model']} | {s['trained_on']} | {epochs} | {best} "
            f"| {_percent(s['best_validation_accuracy'])} | {_percent(s['last_test_accuracy'])} "
            f"| {at_least}{_duration(s['wall_time_s'])} "
            f"| {at_least if s['seconds_to_target'] is not None else ''}{_duration(s['seconds_to_target'])} "
            f"| {s['machine']} "
            f"| `{s['command']}` |"
        )
    return "\n".join(rows)


# Sabour et al. 2017 (Tables 1 and 2, sections 5.2 and 6) for (model, what it was scored on): the paper's model is
# the CapsNet with 3 iterations of dynamic routing and the reconstruction loss
PAPER = {
    ("capsnet", "mnist"): "0.25% error",
    ("cnn", "mnist"): "0.39% error",
    ("capsnet", "multimnist"): "5.2% error",
    ("cnn", "multimnist"): "8.1% error",
    ("capsnet", "expanded_mnist"): "99.23%",
    ("cnn", "expanded_mnist"): "99.22%",
    ("capsnet", "affnist"): "79%",
    ("cnn", "affnist"): "66%",
    ("capsnet", "affine_mnist"): "affNIST: 79%",
    ("cnn", "affine_mnist"): "affNIST: 66%",
}
SCORED_ON = {
    "mnist": "MNIST test",
    "expanded_mnist": "expanded MNIST test (40×40, fixed offsets)",
    "fashion_mnist": "Fashion-MNIST test",
    "multimnist": "MultiMNIST test pairs",
    "affnist": "affNIST test",
    "affine_mnist": "affine_mnist (capsjax's approximation of affNIST)",
}
PAPER_BEGIN = "<!-- paper table: begin (python -m capsjax.results table --write README.md) -->"
PAPER_END = "<!-- paper table: end -->"


def _model_name(model: dict[str, Any]) -> tuple[str, bool]:
    """A run's model in words, and whether it is the paper's configuration of it (which its figures are for)."""
    arch = model.get("arch", "capsnet")
    if arch == "cnn":
        from capsjax.config import ModelConfig

        paper = ModelConfig()
        sizes = {f: tuple(model.get(f, getattr(paper, f))) for f in ("cnn_channels", "cnn_hidden")}
        kernel = model.get("cnn_kernel", paper.cnn_kernel)
        if sizes == {f: getattr(paper, f) for f in sizes} and kernel == paper.cnn_kernel:
            return "baseline CNN", True
        channels, hidden = ("-".join(map(str, sizes[f])) for f in ("cnn_channels", "cnn_hidden"))
        return f"CNN ({channels} channels, {kernel}×{kernel}; {hidden} hidden)", False
    if arch != "capsnet":
        return arch.replace("_", "-").replace("efficient-capsnet", "Efficient-CapsNet"), False
    routing, iterations = model.get("routing", "dynamic"), model.get("routing_iterations", 3)
    decoder = model.get("use_decoder", True)
    name = f"CapsNet ({routing} routing, {iterations} iterations" + (")" if decoder else ", no decoder)")
    return name, routing == "dynamic" and iterations == 3 and decoder


DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "multimnist": "MultiMNIST", "kmnist": "KMNIST",
                 "cifar10": "CIFAR-10"}  # fmt: skip


def _trained_on(config: dict[str, Any]) -> str:
    """The training set in words: "MNIST", "Fashion-MNIST", ..., or "expanded MNIST (40×40)" for digits placed on a
    larger canvas."""
    canvas = config.get("canvas_size")
    name = DATASET_NAMES.get(config["dataset"], config["dataset"])
    return f"expanded {name} ({canvas}×{canvas})" if canvas else name


def paper_table(results_dir: str | Path = "results") -> str:
    """The README's table against the paper (Markdown): one row per test-split evaluation JSON (``eval_*.json``) of
    each folder of ``results_dir``, beside the paper's figure for that model on that set (:data:`PAPER`; only for
    the paper's configuration of the model). Rows whose examples column (the start of the evaluation's
    ``data_sha256``) is equal scored the same images and labels."""
    rows = [
        "| run | model | trained | scored on | examples (SHA-256) | accuracy | error | the paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder, config in _runs(results_dir):
        model, is_paper = _model_name(config.get("model", {}))
        s = summarize(folder)
        canvas = config.get("canvas_size")
        trained = f"{_trained_on(config)}, {s['epochs_done']} of {s['epochs_planned']}"
        trained += " epochs" if s["epochs_planned"] != 1 else " epoch"
        for path in sorted(folder.glob("eval_*.json")):
            e = read_json(path, _RECOLLECT)
            if e.get("split") != "test" or "accuracy" not in e:
                continue
            scored = e.get("dataset", config["dataset"])
            if scored == config["dataset"] and canvas:
                scored = "expanded_mnist"
            accuracy = _percent(e["accuracy"])
            if "almost_accuracy" in e:
                accuracy += f" exact-set ({_percent(e['almost_accuracy'])} almost)"
            count = f" ({e['count']:,})" if "count" in e else ""
            paper = PAPER.get((config.get("model", {}).get("arch", "capsnet"), scored), "–") if is_paper else "–"
            rows.append(
                f"| [{folder.name}](results/{folder.name}/{path.name}) | {model} | {trained} "
                f"| {SCORED_ON.get(scored, scored)}{count} | {e.get('data_sha256', '–')[:8]} | {accuracy} "
                f"| {_percent(1 - e['accuracy'])} | {paper} |"
            )
    return "\n".join(rows)


ROBUST_BEGIN = "<!-- robustness table: begin (python -m capsjax.results table --write README.md) -->"
ROBUST_END = "<!-- robustness table: end -->"
OWN_SPLITS = ("train", "validation", "test")


def robustness(folder: Path) -> dict[str, list[tuple[int, float | None, float]]]:
    """A run's scores on the test sets of ``also_test_on`` (logged at every epoch's end), by set: ``(epoch, the run's
    own test accuracy at that epoch or None, the other set's accuracy)``, in epoch order (a step logged twice, by a
    resumed run, keeps its last record)."""
    records = read_metrics(Path(folder) / "metrics.jsonl")
    own = {step: r["accuracy"] for step, r in _epoch_tests(records).items()}
    series: dict[str, dict[int, tuple[int, float | None, float]]] = {}
    for r in records:
        if r.get("split") in OWN_SPLITS or "accuracy" not in r:
            continue
        series.setdefault(r["split"], {})[r["step"]] = (int(r["epoch"]), own.get(r["step"]), r["accuracy"])
    return {name: [by_step[s] for s in sorted(by_step)] for name, by_step in series.items()}


def robustness_table(results_dir: str | Path = "results") -> str:
    """The README's robustness table (Markdown): for each run of ``results_dir`` that scored other test sets at every
    epoch (``also_test_on``), one row per epoch with its own test accuracy and each other set's, so that models can
    be compared where their own test accuracies are close (as the paper compares CapsNet and its CNN on affNIST)."""
    rows = [
        "| run | model | trained on | epoch | own test accuracy | scored on | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder, config in _runs(results_dir):
        model = _model_name(config.get("model", {}))[0]
        for name, points in robustness(folder).items():
            for epoch, own, other in points:
                rows.append(
                    f"| [{folder.name}](results/{folder.name}) | {model} | {_trained_on(config)} | {epoch} "
                    f"| {_percent(own)} | {SCORED_ON.get(name, name)} | {_percent(other)} |"
                )
    return "\n".join(rows)


MATCHED_BEGIN = "<!-- matched-accuracy table: begin (python -m capsjax.results table --write README.md) -->"
MATCHED_END = "<!-- matched-accuracy table: end -->"


def closest_epochs(
    a: list[tuple[int, float | None, float]], b: list[tuple[int, float | None, float]]
) -> tuple[tuple[int, float, float], tuple[int, float, float]] | None:
    """The epochs of two runs' robustness series (:func:`robustness`) whose own test accuracies are closest (the
    paper compares CapsNet and its CNN on affNIST where their expanded-MNIST accuracies are nearly equal); of equally
    close pairs, the one with the higher own accuracies. None if either run has no epoch with its own accuracy."""
    pairs = [(p, q) for p in a if p[1] is not None for q in b if q[1] is not None]
    if not pairs:
        return None
    return min(pairs, key=lambda pq: (round(abs(pq[0][1] - pq[1][1]), 6), -(pq[0][1] + pq[1][1])))


def _scored_hash(folder: Path, name: str) -> str | None:
    """The ``data_sha256`` of a run's final evaluation on the test set ``name`` (``eval_<name>_test.json``), or None
    where it has none: two runs whose hashes differ were scored on different examples, and their per-epoch
    accuracies on that set are not comparable."""
    path = folder / f"eval_{name}_test.json"
    if not path.exists():
        return None
    return read_json(path, _RECOLLECT).get("data_sha256")


def _points(difference: float) -> str:
    """A difference of two accuracies in percentage points, signed, with a true minus sign: ``−0.43 pp``."""
    points = round(100 * difference, 2) + 0.0  # a difference that rounds to zero from below is "+0.00", not "-0.00"
    return f"{points:+.2f} pp".replace("-", "\u2212")


def matched_table(results_dir: str | Path = "results") -> str:
    """The README's table at matched accuracy (Markdown): for each CapsNet run and each CNN run of ``results_dir``
    trained on the same set and scored on the same other set at every epoch, the epochs where their own test
    accuracies are closest (:func:`closest_epochs`), with both models' accuracies on the other set and the
    difference (CapsNet minus CNN, in percentage points; none where the two runs' final evaluations on that set
    carry different ``data_sha256``, i.e. were scored on different examples)."""
    rows = [
        "| trained on | scored on | CapsNet run (epoch) | own test | scored | CNN run (epoch) | own test | scored "
        "| CapsNet − CNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs: dict[str, list[tuple[Path, str, dict]]] = {"capsnet": [], "cnn": []}
    for folder, config in _runs(results_dir):
        arch = config.get("model", {}).get("arch", "capsnet")
        if arch in runs:
            runs[arch].append((folder, _trained_on(config), robustness(folder)))
    for caps, trained, caps_sets in runs["capsnet"]:
        for cnn, cnn_trained, cnn_sets in runs["cnn"]:
            if cnn_trained != trained:
                continue
            for name in sorted(set(caps_sets) & set(cnn_sets)):
                match = closest_epochs(caps_sets[name], cnn_sets[name])
                if match is None:
                    continue
                (i, own_a, other_a), (j, own_b, other_b) = match
                hashes = {_scored_hash(run, name) for run in (caps, cnn)} - {None}
                difference = _points(other_a - other_b) if len(hashes) < 2 else "– (scored on different examples)"
                rows.append(
                    f"| {trained} | {SCORED_ON.get(name, name)} | [{caps.name}](results/{caps.name}) ({i}) "
                    f"| {_percent(own_a)} | {_percent(other_a)} | [{cnn.name}](results/{cnn.name}) ({j}) "
                    f"| {_percent(own_b)} | {_percent(other_b)} | {difference} |"
                )
    return "\n".join(rows)


def robustness_figure(folders: list[str | Path], path: str | Path) -> Path:
    """Each run's accuracy on its other test sets against its own test accuracy, epoch by epoch (one line per run
    and set, the epochs numbered along it): where two models' own accuracies are equal, the higher line is the more
    robust model."""
    from capsjax.viz import plot_robustness

    lines = {}
    for folder in map(Path, folders):
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} is not a run folder (it has no config.json)")
        for name, points in robustness(folder).items():
            points = [p for p in points if p[1] is not None]
            if points:
                lines[f"{folder.name}: {SCORED_ON.get(name, name)}"] = points
    if not lines:
        raise ValueError("no run among the folders scored another test set at its epochs' ends (also_test_on)")
    return plot_robustness(lines, path)


def replace_between_markers(path: str | Path, begin: str, end: str, text: str, check: bool = False) -> bool:
    """Replaces what lies between the lines ``begin`` and ``end`` of the file ``path`` with ``text``; with ``check``,
    only says whether it is there already. Returns True if the file holds (or now holds) ``text`` there; raises
    ValueError if a marker is missing."""
    path = Path(path)
    content = path.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{path} has no markers {begin} ... {end}")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{text}\n{end}{tail}"
    if check:
        return new == content
    path.write_text(new)
    return True


def write_table(readme: str | Path, results_dir: str | Path = "results", check: bool = False) -> bool:
    """Replaces the text between the README's results-table markers with :func:`table`, and between its paper-table,
    robustness-table and matched-table markers, if it has them, with :func:`paper_table`, :func:`robustness_table`
    and :func:`matched_table`; with ``check``, only says whether they are current. Returns True if the README holds
    (or now holds) the current tables; raises ValueError without the results-table markers."""
    current = replace_between_markers(readme, BEGIN, END, table(results_dir), check=check)
    text = Path(readme).read_text()
    tables = ((PAPER_BEGIN, PAPER_END, paper_table), (ROBUST_BEGIN, ROBUST_END, robustness_table),
              (MATCHED_BEGIN, MATCHED_END, matched_table))  # fmt: skip
    for begin, end, make in tables:
        if begin in text:
            current &= replace_between_markers(readme, begin, end, make(results_dir), check=check)
    return current


def collect(
    workdir: str | Path,
    dest: str | Path,
    command: str,
    status: str | None = None,
    note: str | None = None,
    replace: bool = False,
) -> Path:
    """Copies a run's small files from ``workdir`` into ``dest`` and writes ``dest/record.json``; rerun it as the run
    grows (the first collection's date is kept; copies whose source is gone are removed). ``status`` defaults to
    "complete" once ``results.json`` exists, "in progress" before, "diverged ..." while ``diverged.json`` does;
    ``note`` (kept until replaced) says what a reader should know, e.g. what else ran.

    Raises ValueError if ``dest`` holds another run (:func:`same_run`), unless ``replace`` (which also starts a new
    ``record.json``)."""
    workdir, dest = Path(workdir).expanduser(), Path(dest)
    if not (workdir / "config.json").exists():
        raise ValueError(f"{workdir} has no config.json: is it a capsjax work directory?")
    if dest.resolve() == workdir.resolve():
        raise ValueError(f"{dest} is the work directory itself: collect into a folder under results/")
    inside = sorted(path.parent.name for path in dest.glob("*/config.json"))
    if inside:
        raise ValueError(
            f"{dest} holds run folders ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}): collect into a "
            f"folder of its own, e.g. {dest / workdir.name}"
        )
    if (dest / "config.json").exists():
        differs = same_run(dest, workdir)
        if differs and not replace:
            raise ValueError(
                f"{dest} holds another run than {workdir} ({differs}): collect into another folder, or replace it "
                "(--replace)"
            )
        if differs:
            (dest / "record.json").unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    sources = [workdir / name for name in COPIED if (workdir / name).exists()]
    sources += [
        path for pattern in COPIED_GLOBS for path in sorted(workdir.glob(pattern))
        if path.suffix != ".png" or path.stat().st_size <= MAX_FIGURE_BYTES
    ]  # fmt: skip
    # A copy whose source is gone (results.json of a run resumed for more epochs, diverged.json after the restart, a
    # figure grown past the limit) would describe another state of the run: removed.
    kept = {path.name for path in sources}
    for pattern in (*COPIED, *COPIED_GLOBS):
        for stale in dest.glob(pattern):
            if stale.name not in kept:
                stale.unlink()
    for path in sources:
        shutil.copy2(path, dest / path.name)
    record_path = dest / "record.json"
    record = read_json(record_path, _RECOLLECT) if record_path.exists() else {}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record.setdefault("first_collected", now)
    record.update(
        command=command,
        machine=record.get("machine") or machine(),
        last_collected=now,
        status=status or _status(workdir),
    )
    if note is not None:
        record["note"] = note
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return dest


def same_run(a: Path, b: Path) -> str:
    """Why the runs in folders ``a`` and ``b`` (work directories or ``results/`` folders) are not one run, or "" if
    nothing says so: settings that a resumed run may not change (:func:`capsjax.workdir.refused_changes`; the
    optimizer's may, after a divergence), or different first lines of ``metrics.jsonl`` (the run's first logged
    steps, which a resumed run keeps)."""
    from capsjax.config import load_config
    from capsjax.workdir import refused_changes

    listed = refused_changes(load_config(a / "config.json"), load_config(b / "config.json"), allowed=("optim.",))
    if listed:
        return listed
    firsts = []
    for folder in (a, b):
        path = folder / "metrics.jsonl"
        lines = path.read_text().splitlines()[:1] if path.exists() else []
        firsts.append(json.loads(lines[0]) if lines and lines[0].endswith("}") else None)
    if None not in firsts and firsts[0] != firsts[1]:
        return f"their first logged steps differ: {_brief(firsts[0])} against {_brief(firsts[1])}"
    return ""


def _brief(record: dict[str, Any]) -> str:
    loss = record.get("loss")
    return f"step {record.get('step')} " + (f"loss {loss:.6g}" if isinstance(loss, float) else record.get("split", "?"))


def _status(workdir: Path) -> str:
    if (workdir / "diverged.json").exists():
        step = read_json(workdir / "diverged.json").get("step")
        return f"diverged at step {step}: rerun with a lower learning rate"
    return "complete" if (workdir / "results.json").exists() else "in progress"


def replay(folder: str | Path, steps: int, data_dir: str | None = None, rtol: float = 1e-4) -> dict[str, Any]:
    """Retrains the first ``steps`` steps of a recorded run from its ``config.json`` (same seed, data order and
    augmentation) in a temporary work directory and compares the logged training losses with the recorded ones.
    Returns the compared steps and the largest relative difference; ``ok`` if it is within ``rtol`` (on the same
    CPU kind the losses agree to float32 rounding)."""
    import dataclasses

    from capsjax.config import load_config
    from capsjax.train import Preempted, train_and_evaluate

    folder = Path(folder)
    config = load_config(folder / "config.json")
    config = dataclasses.replace(config, progress=False, tensorboard=False, checkpoint_every_steps=10**9)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    recorded = {r["step"]: r["loss"] for r in read_metrics(folder / "metrics.jsonl") if r.get("split") == "train"}
    polls = iter(range(steps + 1))
    with tempfile.TemporaryDirectory() as workdir:
        try:  # should_stop is polled once per step: stop after `steps` of them
            train_and_evaluate(config, workdir, should_stop=lambda: next(polls, steps) >= steps)
        except Preempted:
            pass
        again = {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl") if r.get("split") == "train"}
    common = sorted(set(recorded) & set(again))
    if not common:
        raise ValueError(f"no training step logged in both runs (recorded: {sorted(recorded)[:3]}...): raise --steps")
    worst = max(abs(again[s] - recorded[s]) / max(abs(recorded[s]), 1e-12) for s in common)
    return {"steps": common, "max_relative_difference": worst, "ok": worst <= rtol}


def main(argv: list[str] | None = None) -> int:
    from capsjax.cli import OneLineParser

    parser = OneLineParser(prog="python -m capsjax.results", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect", help="copy a run's small files into results/<name> and record the command")
    p.add_argument("workdir")
    p.add_argument("dest")
    p.add_argument("--command", dest="run_command", required=True, help="the exact command that trains this run")
    p.add_argument("--status", default=None, help='e.g. "stopped at the session\'s end" (default: from results.json)')
    p.add_argument("--note", default=None, help="what a reader should know (e.g. other jobs shared the CPU)")
    p.add_argument("--replace", action="store_true", help="DEST holds another run: replace it with this one")
    p = sub.add_parser("table", help="print the results table and the table against the paper, or write them")
    p.add_argument("--results-dir", default="results")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--write", metavar="README", default=None)
    either.add_argument("--check", metavar="README", default=None, help="exit 1 if README's table is not current")
    p = sub.add_parser("robustness", help="plot runs' accuracy on their other test sets against their own, by epoch")
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    p.add_argument("--out", required=True, metavar="PNG")
    p = sub.add_parser("replay", help="retrain a recorded run's first steps and compare the logged losses")
    p.add_argument("folder")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            dest = collect(args.workdir, args.dest, args.run_command, args.status, args.note, args.replace)
            print(f"collected into {dest}")
        elif args.command == "table":
            if args.check:
                current = write_table(args.check, args.results_dir, check=True)
                print("the results table is current" if current else f"{args.check}: results table out of date")
                return 0 if current else 1
            if args.write:
                write_table(args.write, args.results_dir)
            else:
                print(table(args.results_dir) + "\n\n" + paper_table(args.results_dir))
        elif args.command == "robustness":
            print(f"wrote {robustness_figure(args.folders, args.out)}")
        else:
            out = replay(args.folder, args.steps, args.data_dir)
            print(json.dumps({**out, "steps": [out["steps"][0], out["steps"][-1], len(out["steps"])]}))
            return 0 if out["ok"] else 1
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
