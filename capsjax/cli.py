"""Command-line interfaces: ``capsjax-train`` / ``train.py`` and ``capsjax-eval`` / ``eval.py``."""

from __future__ import annotations

import argparse
import sys

from capsjax import __version__

# flag -> dotted config field
_TRAIN_FLAGS = {
    "dataset": ("dataset", str, "dataset name: mnist, fashion_mnist, kmnist, cifar10, synthetic, ..."),
    "data_dir": ("data_dir", str, "directory of IDX files (offline); default: $CAPSJAX_DATA/<dataset>, then TFDS"),
    "epochs": ("epochs", int, "training epochs"),
    "batch_size": ("batch_size", int, "global batch size (divisible by the number of devices)"),
    "eval_batch_size": ("eval_batch_size", int, "evaluation batch size"),
    "learning_rate": ("optim.learning_rate", float, "initial Adam learning rate"),
    "seed": ("seed", int, "random seed (initialisation, data order, augmentation)"),
    "routing_iterations": ("model.routing_iterations", int, "routing-by-agreement iterations"),
    "train_examples": ("train_examples", int, "train on the first N training examples only"),
    "validation_examples": ("validation_examples", int, "hold the last N training examples out (0: validate on test)"),
    "max_shift": ("max_shift", int, "random shift augmentation in pixels (0: none)"),
    "kernels": ("model.kernels", str, "computation: auto (fast on CPU), fast (XLA:CPU-tuned), textbook (capsjax.ops)"),
    "conv_dtype": ("model.conv_dtype", str, "convolution compute dtype: float32, bfloat16"),
    "recon_reduction": ("loss.recon_reduction", str, "reconstruction loss over pixels: sum (paper) or mean"),
    "log_every": ("log_every_steps", int, "steps between metrics.jsonl lines"),
    "checkpoint_every": ("checkpoint_every_steps", int, "steps between checkpoints (also saved every epoch)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, message: str, code: int = 1):
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def build_train_parser(prog: str = "capsjax-train") -> argparse.ArgumentParser:
    """The ``capsjax-train`` / ``train.py`` argument parser: ``--preset``, ``--workdir``, one flag per common config
    field, ``--set FIELD=VALUE``, ``--quiet``, ``--distributed``, ``--print-config``, ``--version``."""
    parser = _Parser(prog=prog, description="Train a CapsNet (Sabour et al. 2017). Rerun on the same --workdir to resume.")
    parser.add_argument("--preset", default="default", help="default (the paper), tutorial, smoke, fashion_mnist, accelerator")
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<preset>)")
    for flag, (_, kind, help_) in _TRAIN_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None, help=help_)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set model.class_dim=16 (repeatable)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--version", action="version", version=f"capsjax {__version__}")
    return parser


def resolve_train_config(args: argparse.Namespace):
    """Preset, then the named flags, then ``--set`` overrides."""
    from capsjax.config import ConfigError, get_config, replace_path

    config = get_config(args.preset)
    for flag, (path, _, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            config = replace_path(config, path, value)
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        config = replace_path(config, field.strip(), value.strip())
    if args.quiet:
        config = replace_path(config, "progress", False)
    return config


def train_main(argv: list[str] | None = None, prog: str = "capsjax-train") -> int:
    """Entry point of ``capsjax-train``: parses ``argv`` (default ``sys.argv[1:]``), trains, returns the exit status
    (0 done, 1 checkpoint or divergence error, 2 bad configuration or data, 130 interrupted)."""
    args = build_train_parser(prog).parse_args(argv)
    from capsjax.checkpoint import CheckpointError
    from capsjax.config import ConfigError, to_dict
    from capsjax.data import DataError

    try:
        config = resolve_train_config(args)
        if args.print_config:
            import json

            print(json.dumps(to_dict(config), indent=2))
            return 0
        from capsjax.train import TrainingDiverged, maybe_initialize_distributed, train_and_evaluate

        maybe_initialize_distributed(args.distributed)
        train_and_evaluate(config, args.workdir or f"runs/{args.preset}")
    except (ConfigError, DataError) as err:
        return _fail(prog, str(err), 2)
    except (CheckpointError, TrainingDiverged) as err:
        return _fail(prog, str(err), 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    return 0


def build_eval_parser(prog: str = "capsjax-eval") -> argparse.ArgumentParser:
    """The ``capsjax-eval`` / ``eval.py`` argument parser."""
    parser = _Parser(prog=prog, description="Evaluate a trained CapsNet and draw its reconstructions.")
    parser.add_argument("--workdir", required=True, help="the training run's directory")
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--data-dir", default=None, help="directory of IDX files (default: the run's)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    parser.add_argument("--out-dir", default=None, help="where to write eval JSON and figures (default: the workdir)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--version", action="version", version=f"capsjax {__version__}")
    return parser


def eval_main(argv: list[str] | None = None, prog: str = "capsjax-eval") -> int:
    """Entry point of ``capsjax-eval``: evaluates a work directory, prints the accuracy and the confusion matrix,
    writes ``eval_<split>.json`` and the figures; returns the exit status (0, 1 checkpoint error, 2 bad input)."""
    args = build_eval_parser(prog).parse_args(argv)
    from capsjax.checkpoint import CheckpointError
    from capsjax.config import ConfigError
    from capsjax.data import DataError
    from capsjax.evaluate import evaluate_workdir, format_confusion

    if args.batch_size is not None and args.batch_size < 1:
        return _fail(prog, "--batch-size must be >= 1", 2)
    try:
        metrics = evaluate_workdir(
            args.workdir,
            split=args.split,
            data_dir=args.data_dir,
            which=args.checkpoint,
            out_dir=args.out_dir,
            figures=not args.no_figures,
            batch_size=args.batch_size,
        )
    except (ConfigError, DataError, ValueError) as err:
        return _fail(prog, str(err), 2)
    except CheckpointError as err:
        return _fail(prog, str(err), 1)
    print(
        f"{metrics['dataset']} {metrics['split']}: accuracy {100 * metrics['accuracy']:.2f}% "
        f"(error {100 * metrics['error_rate']:.2f}%), loss {metrics['loss']:.4f}, {metrics['count']} examples, "
        f"{metrics['checkpoint']} checkpoint at step {metrics['step']}"
    )
    print(format_confusion(metrics["confusion"]))
    for path in metrics.get("figures", []):
        print(f"wrote {path}")
    return 0


def train_command() -> int:
    """The ``capsjax-train`` program: :func:`train_main` after restarting with huge pages where that applies
    (:mod:`capsjax.hostmem`)."""
    from capsjax.fast.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()
    return train_main()


def eval_command() -> int:
    """The ``capsjax-eval`` program: :func:`eval_main` after restarting with huge pages where that applies."""
    from capsjax.fast.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()
    return eval_main()
