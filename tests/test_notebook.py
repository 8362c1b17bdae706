"""The Colab notebook runs top to bottom in its tiny mode, from the local MNIST folder, on the CPU."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "capsnet_tpu.ipynb"


def test_committed_notebook_has_no_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code), (
        "strip the saved outputs from the committed notebook"
    )
    assert "TINY = False" in "".join(code[0]["source"]), "the first code cell holds the TINY switch"


@pytest.mark.slow
def test_notebook_runs_in_tiny_mode(tmp_path, monkeypatch, mnist_dir, optimized_env):
    nbformat = pytest.importorskip("nbformat", reason="the notebook extra is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the notebook extra is not installed")
    pytest.importorskip("ipykernel", reason="the notebook extra is not installed")

    workdir = tmp_path / "run"
    # The kernel is a new process: it inherits these, not the test process's JAX state. Two simulated CPU devices
    # make the notebook's training data-parallel, as on a TPU.
    monkeypatch.setenv("CAPSJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("CAPSJAX_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("CAPSJAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
    if "XLA_FLAGS" in optimized_env:  # the kernel trains: XLA's optimised code, as in a user's notebook
        monkeypatch.setenv("XLA_FLAGS", optimized_env["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend puts the figures in the outputs

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    finally:
        if os.environ.get("CAPSJAX_NOTEBOOK_EXECUTED"):  # keep the executed copy (e.g. a CI artifact)
            nbformat.write(notebook, os.environ["CAPSJAX_NOTEBOOK_EXECUTED"])

    text = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "TINY=True" in text
    assert "backend CPU, 2 device(s)" in text
    assert "installing:" not in text  # capsjax was importable: the set-up cell installed nothing
    results = json.loads((workdir / "results.json").read_text())
    assert results["devices"] == 2 and results["steps"] == 6000 // 32
    assert results["test_accuracy"] > 0.5, results
    for name in ("reconstructions", "pose_grid", "training_curves", "confusion"):
        assert (workdir / "notebook_figures" / f"{name}.png").stat().st_size > 1000
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
    assert images >= 8, f"expected the notebook's figures in its outputs, found {images}"


def test_setup_cells_find_this_checkout(tmp_path, monkeypatch):
    """The settings and set-up cells, run here where capsjax is importable: they install nothing and locate the
    source tree the notebook sits in (what a fresh kernel would `pip install -e`)."""
    monkeypatch.setenv("CAPSJAX_NOTEBOOK_TINY", "yes")
    monkeypatch.delenv("CAPSJAX_NOTEBOOK_WORKDIR", raising=False)
    code = [cell for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]
    namespace = {}
    for cell in code[:3]:  # settings, set-up, the accelerator (which settles TINY and WORKDIR)
        exec("".join(cell["source"]), namespace)  # noqa: S102 (our own notebook)
    assert namespace["TINY"] is True and namespace["WORKDIR"] == "runs/notebook_tiny"
    find_checkout = namespace["find_checkout"]
    assert find_checkout(NOTEBOOK.parent) == ROOT
    assert find_checkout(tmp_path) is None


def test_full_mode_without_an_accelerator_switches_to_tiny(monkeypatch):
    # the paper's model for 10 epochs on a CPU runtime is hours: the notebook used to start it without a word
    monkeypatch.delenv("CAPSJAX_NOTEBOOK_TINY", raising=False)
    monkeypatch.delenv("CAPSJAX_NOTEBOOK_WORKDIR", raising=False)
    code = [cell for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]
    for full_on_cpu, tiny in ((False, True), (True, False)):
        namespace = {}
        exec("".join(code[0]["source"]), namespace)  # noqa: S102 (our own notebook)
        namespace["FULL_ON_CPU"] = full_on_cpu
        for cell in code[1:3]:
            exec("".join(cell["source"]), namespace)  # noqa: S102
        assert namespace["BACKEND"] == "cpu" and namespace["TINY"] is tiny
        assert namespace["WORKDIR"] == ("runs/notebook_tiny" if tiny else "runs/notebook")

