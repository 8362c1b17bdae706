"""Packaging: the version, the metadata, the lazy top-level API, the CLI's --version, the generated API docs."""

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

import capsjax

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_in_the_changelog():
    assert re.fullmatch(r"\d+\.\d+\.\d+", capsjax.__version__)
    assert f"## [{capsjax.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_metadata_is_complete():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dynamic"] == ["version"]  # from capsjax.__version__
    for field in ("description", "readme", "license", "license-files", "requires-python", "authors", "keywords"):
        assert project.get(field), field
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert any(c.startswith("Development Status") for c in project["classifiers"])
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(project["urls"])
    assert {"test", "tfds", "notebook", "docs"} <= set(project["optional-dependencies"])
    assert set(project["scripts"]) == {"capsjax-train", "capsjax-eval"}


def test_import_capsjax_is_light():
    code = "import capsjax, json, sys; print(json.dumps(sorted(sys.modules)))"
    loaded = set(
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    )
    heavy = {"capsjax.train", "capsjax.evaluate", "capsjax.data", "capsjax.viz", "capsjax.checkpoint", "matplotlib",
             "orbax", "tensorflow_datasets", "tensorflow"}  # fmt: skip
    assert not heavy & loaded, sorted(heavy & loaded)


def test_lazy_exports():
    from capsjax import evaluate, train

    assert capsjax.predict is evaluate.predict
    assert capsjax.train_and_evaluate is train.train_and_evaluate
    for name in ("data", "config", "evaluate", "viz"):
        assert getattr(capsjax, name) is sys.modules[f"capsjax.{name}"]
    assert {"predict", "train_and_evaluate", "data", "viz"} <= set(dir(capsjax))
    assert all(hasattr(capsjax, name) for name in capsjax.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = capsjax.nonexistent


def test_cli_version(capsys):
    from capsjax.cli import eval_main, train_main

    for main in (train_main, eval_main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"capsjax {capsjax.__version__}"


def test_api_docs_build(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is not installed (the docs or test extra)")
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    build_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_api)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build_api.build(tmp_path / "api")
    problems = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # pdoc's import/parse errors
    assert not problems, problems
    assert (out / "index.html").exists()
    for module in build_api.modules():
        page = out / (module.replace(".", "/") + ".html")
        assert page.stat().st_size > 1000, module
    ops = (out / "capsjax" / "ops.html").read_text()
    assert "dynamic_routing" in ops and "n_in, n_out" in ops


def test_cli_paths_expand_the_home_directory(monkeypatch, tmp_path):
    """``--workdir "~/runs/x"`` (quoted, or from a variable, where the shell leaves ``~``) wrote into ./~/runs/x."""
    from capsjax.cli import build_eval_parser, build_train_parser, resolve_train_config

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_train_parser().parse_args(["--workdir", "~/runs/x", "--data-dir", "~/mnist"])
    assert args.workdir == str(tmp_path / "runs" / "x")
    assert resolve_train_config(args).data_dir == str(tmp_path / "mnist")
    args = build_eval_parser().parse_args(["--workdir", "~/runs/x", "--data-dir", "~/d", "--out-dir", "~/o"])
    assert (args.workdir, args.data_dir, args.out_dir) == tuple(str(tmp_path / p) for p in ("runs/x", "d", "o"))
    assert build_eval_parser().parse_args(["--weights", "~/w.safetensors"]).weights == str(tmp_path / "w.safetensors")


def test_cli_overrides_are_checked_together_in_any_order():
    """``--max-shift 2 --set augmentation=shift`` on the efficient_capsnet preset was refused: each override was
    checked alone, and max_shift came first against the preset's own augmentation."""
    import pytest

    from capsjax.cli import build_train_parser, resolve_train_config
    from capsjax.config import ConfigError

    parse = build_train_parser().parse_args
    config = resolve_train_config(parse(["--preset", "efficient_capsnet", "--max-shift", "2", "--set",
                                         "augmentation=shift", "--quiet"]))  # fmt: skip
    assert (config.augmentation, config.max_shift, config.progress) == ("shift", 2, False)
    assert resolve_train_config(parse(["--set", "epochs=3", "--set", "epochs=4"])).epochs == 4  # the later wins
    with pytest.raises(ConfigError, match="max_shift=0"):  # still refused when the result is invalid
        resolve_train_config(parse(["--preset", "efficient_capsnet", "--max-shift", "2"]))
    with pytest.raises(ConfigError, match="unknown config field 'model.nope'"):  # the whole path
        resolve_train_config(parse(["--set", "model.nope=1"]))
    with pytest.raises(ConfigError, match="routing_iterations"):
        resolve_train_config(parse(["--routing-iterations", "0"]))
