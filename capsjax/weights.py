"""Trained parameters as one compact file, loadable without a work directory.

A weights file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: every parameter array under its
path in the model (``conv1/kernel``, ``classes/W``, ``decoder/hidden/0/bias``, ...), stored in float16 by default
(half the size; the model computes in float32 after loading), and in its metadata the run's whole
:class:`~capsjax.config.TrainConfig` as JSON, the training step and where the parameters came from. So
``eval.py --weights FILE`` and ``capsjax.evaluate.predict(FILE, images)`` rebuild the model from the file alone.

    python -m capsjax.weights export runs/mnist results/mnist-default/params.safetensors   # best checkpoint
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from capsjax import __version__
from capsjax.config import ConfigError, TrainConfig, from_dict, is_saved_config, to_dict

FORMAT = "capsjax-params-1"
SUFFIX = ".safetensors"
DTYPES = {"float16": np.float16, "float32": np.float32}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit its config; the message says what to do."""


def is_weights_file(path: str | Path) -> bool:
    """Whether ``path`` names a weights file (by its suffix, in any case) rather than a work directory."""
    return Path(path).suffix.lower() == SUFFIX


def _named_leaves(params: Any) -> dict[str, Any]:
    """The leaves of a parameter pytree by their path, ``"decoder/hidden/0/kernel"`` (in the pytree's order)."""
    import jax

    named = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        named["/".join(k for k in keys if k != "value")] = leaf
    return named


def save_weights(
    path: str | Path,
    params: Any,
    config: TrainConfig,
    *,
    step: int,
    source: str = "",
    dtype: str = "float16",
    scored_sha256: dict[str, str] | None = None,
) -> Path:
    """Writes ``params`` (a parameter pytree of the model of ``config``) as a weights file; returns its path.
    ``scored_sha256``: the hashes of the sets the run was validated and tested on (``eval.py --weights`` then refuses
    other data as the run's own)."""
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not is_weights_file(path):
        raise ValueError(f"a weights file must end in {SUFFIX}, got {path.name}")
    if not isinstance(config, TrainConfig):  # a ModelConfig wrote a file that no loader could read back
        raise TypeError(
            f"config must be the run's TrainConfig (its .model builds the model), got {type(config).__name__}"
        )
    import jax
    from flax import nnx

    from capsjax.model import build_model

    # the file must load back: its arrays must be those of the model its config builds (checked before writing)
    _, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0))))
    _check_fit(_shapes(abstract), _shapes(params), "params")

    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf: refused below, with the remedy
        tensors = {
            name: np.ascontiguousarray(np.asarray(jax.device_get(leaf)).astype(DTYPES[dtype]))
            for name, leaf in _named_leaves(params).items()
        }
    overflow = next((name for name, value in tensors.items() if not np.isfinite(value).all()), None)
    if overflow is not None:
        finite = np.isfinite(np.asarray(jax.device_get(_named_leaves(params)[overflow]))).all()
        raise ValueError(
            f"{overflow} exceeds {dtype}'s range: export with --dtype float32" if finite
            else f"{overflow} holds NaN or infinite values: export a checkpoint from before the run diverged"
        )
    metadata = {
        "format": FORMAT,
        "capsjax_version": __version__,
        "config": json.dumps(to_dict(config)),
        "step": str(int(step)),
        "source": source,
        **({"scored_sha256": json.dumps(scored_sha256)} if scored_sha256 else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        temporary.replace(path)  # never a half-written file under the final name
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_weights(path: str | Path) -> tuple[TrainConfig, dict[str, np.ndarray], dict[str, str]]:
    """The config, the float32 arrays by parameter path, and the metadata of a weights file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} not found: pass a .safetensors file written by 'python -m capsjax.weights export'")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}); export it again") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a capsjax weights file (format {metadata.get('format')!r}, not {FORMAT!r})")
    bad = next((name for name, value in arrays.items() if not np.isfinite(value).all()), None)
    if bad is not None:  # scored, they would give a NaN loss and chance accuracy without a word
        raise WeightsError(
            f"{path}: {bad} holds NaN or infinite values; export the weights of a checkpoint that has none"
        )
    try:
        recorded = json.loads(metadata["config"])
        if not is_saved_config(recorded):  # {} or {"model": {}} would be read as the default config
            raise ConfigError("it holds no model and optim of capsjax's")
        config = from_dict(TrainConfig, recorded)
        int(metadata.get("step", 0))
    except (KeyError, ValueError, TypeError, ConfigError) as err:
        raise WeightsError(f"{path}: its config or step does not read back ({err}); export it again") from None
    return config, {name: value.astype(np.float32) for name, value in arrays.items()}, metadata


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(np.shape(leaf)) for name, leaf in _named_leaves(params).items()}


def _check_fit(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raises :class:`WeightsError` unless ``shapes`` (by parameter path) are exactly the model's, ``expected``."""
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise WeightsError(f"{where} does not fit its model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise WeightsError(f"{where}: {name} has shape {shapes[name]}, the model needs {shape}")


def params_from_arrays(abstract_params: Any, arrays: dict[str, np.ndarray], where: str = "the weights file") -> Any:
    """``abstract_params`` (a parameter pytree or its shapes) with every leaf replaced by the array of the same
    path; raises :class:`WeightsError` on a missing, extra or misshapen array."""
    import jax

    expected = _shapes(abstract_params)
    _check_fit(expected, {name: tuple(value.shape) for name, value in arrays.items()}, where)
    leaves = iter(arrays[name] for name in expected)
    return jax.tree.map(lambda _: next(leaves), abstract_params)


def export_workdir(workdir: str | Path, path: str | Path, which: str = "best", dtype: str = "float16") -> Path:
    """Writes the ``which`` checkpoint of a work directory (see :func:`capsjax.evaluate.load_run`) as a weights
    file."""
    from capsjax.evaluate import load_run

    run = load_run(workdir, which)
    source = f"{run.which} checkpoint (step {run.step}) of {Path(workdir).name}"
    return save_weights(
        path, run.params, run.config, step=run.step, source=source, dtype=dtype, scored_sha256=run.scored_sha256
    )


def main(argv: list[str] | None = None) -> int:
    from capsjax.cli import OneLineParser

    parser = OneLineParser(prog="python -m capsjax.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a work directory's checkpoint as a weights file")
    export.add_argument("workdir")
    export.add_argument("path", help=f"the weights file to write (*{SUFFIX})")
    export.add_argument("--checkpoint", default="best", help="best (default), latest or a step number")
    export.add_argument("--dtype", default="float16", choices=list(DTYPES))
    args = parser.parse_args(argv)
    try:
        path = export_workdir(args.workdir, args.path, args.checkpoint, args.dtype)
    except (ValueError, RuntimeError) as err:
        print(f"{parser.prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. the path's folder is a file, or the path a folder, or the disk is full
        print(f"{parser.prog}: error: cannot read or write {err.filename or args.path}: {err.strerror or err}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
