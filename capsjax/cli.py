"""Command-line interfaces: ``capsjax-train`` / ``train.py`` and ``capsjax-eval`` / ``eval.py``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

from capsjax import __version__
from capsjax.config import PRESETS

from capsjax.distributed import ENV_ADDRESS, ENV_ID, ENV_PROCESSES

VERBOSE_ENV = "CAPSJAX_VERBOSE"

def _user_path(text: str) -> str:
    """A path argument with ``~`` expanded, as a shell would have (it doesn't inside quotes or ``$cmd``)."""
    return os.path.expanduser(text)


# flag -> dotted config field
_TRAIN_FLAGS = {
    "dataset": ("dataset", str, "dataset name: mnist, fashion_mnist, kmnist, cifar10, synthetic, ..."),
    "data_dir": ("data_dir", _user_path, "the dataset's files; default: $CAPSJAX_DATA/<dataset>, then TFDS"),
    "epochs": ("epochs", int, "training epochs"),
    "batch_size": ("batch_size", int, "global batch size (divisible by the number of devices)"),
    "eval_batch_size": ("eval_batch_size", int, "evaluation batch size"),
    "learning_rate": ("optim.learning_rate", float, "initial Adam learning rate"),
    "arch": ("model.arch", str, "model: capsnet (default), cnn (the paper's baseline CNN) or efficient_capsnet"),
    "seed": ("seed", int, "random seed (initialisation, data order, augmentation)"),
    "routing_iterations": ("model.routing_iterations", int, "routing-by-agreement iterations"),
    "train_examples": ("train_examples", int, "train on the first N training examples only"),
    "validation_examples": ("validation_examples", int, "hold the last N training examples out (0: validate on test)"),
    "max_shift": ("max_shift", int, "random shift augmentation in pixels (0: none)"),
    "canvas_size": ("canvas_size", int, "expanded MNIST: digits at random offsets on a canvas this size (0: off)"),
    "kernels": ("model.kernels", str, "computation: auto (fast on CPU), fast (XLA:CPU-tuned), textbook (capsjax.ops)"),
    "precision": ("model.precision", str, "float32, or mixed (bfloat16 products, float32 accumulation and routing)"),
    "recon_reduction": ("loss.recon_reduction", str, "reconstruction loss over pixels: sum (paper) or mean"),
    "log_every": ("log_every_steps", int, "steps between metrics.jsonl lines"),
    "checkpoint_every": ("checkpoint_every_steps", int, "steps between checkpoints (also saved every epoch)"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (its sub-commands' parsers too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, message, code: int = 1, verbose: bool = False):
    if verbose and isinstance(message, BaseException):
        traceback.print_exception(message)
    text = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return code


def build_train_parser(prog: str = "capsjax-train") -> argparse.ArgumentParser:
    """The ``capsjax-train`` / ``train.py`` argument parser: ``--preset``, ``--workdir``, one flag per common config
    field, ``--set FIELD=VALUE``, ``--quiet``, the multi-process flags, ``--print-config``, ``--verbose``,
    ``--version``."""
    parser = OneLineParser(prog=prog, description="Train a CapsNet (Sabour et al. 2017). Rerun on the same --workdir to resume.")
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: the paper's settings)")
    parser.add_argument("--workdir", type=_user_path, default=None, help="run directory (default: runs/<preset>)")
    for flag, (_, kind, help_) in _TRAIN_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None, help=help_)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set model.class_dim=16 (repeatable)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar (plain log lines instead)")
    group = parser.add_argument_group("multi-process runs (one process per TPU host or per GPU; see the README)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help=f"process 0's host and a free port (or ${ENV_ADDRESS})")  # fmt: skip
    group.add_argument("--num-processes", type=int, default=None, help=f"number of processes (or ${ENV_PROCESSES})")
    group.add_argument("--process-id", type=int, default=None, help=f"this process's index (or ${ENV_ID})")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run with settings detected from Slurm, Cloud TPU or Kubernetes")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help=f"full tracebacks and library logs (or ${VERBOSE_ENV}=1)")
    parser.add_argument("--version", action="version", version=f"capsjax {__version__}")
    return parser


def resolve_train_config(args: argparse.Namespace):
    """The preset with the named flags, then the ``--set`` overrides, applied (the later winning) and checked
    together: ``--max-shift 2 --set augmentation=shift`` on a preset with another augmentation is valid."""
    from capsjax.config import ConfigError, get_config, replace_paths

    flags = ((path, getattr(args, flag)) for flag, (path, _, _) in _TRAIN_FLAGS.items())
    items = [(path, value) for path, value in flags if value is not None]
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        items.append((field.strip(), value.strip()))
    if args.quiet:
        items.append(("progress", False))
    return replace_paths(get_config(args.preset), items)


class _StopOnSignal:
    """SIGTERM and SIGINT ask the training loop to save and stop (a second SIGINT quits at once). In a multi-process
    run SIGTERM is left to JAX's preemption notifier, which makes every process stop at the same step, and SIGINT is
    turned into a SIGTERM for it."""

    def __init__(self, multi_process: bool, prog: str):
        self.requested, self.signal, self.prog = False, None, prog
        if multi_process:
            signal.signal(signal.SIGINT, self._forward)
        else:
            signal.signal(signal.SIGINT, self._request)
            signal.signal(signal.SIGTERM, self._request)

    def _forward(self, signum, frame):
        self.signal = signum
        os.kill(os.getpid(), signal.SIGTERM)

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        name = signal.Signals(signum).name
        print(f"{self.prog}: {name}: saving and stopping (Ctrl-C again stops without finishing the step)",
              file=sys.stderr, flush=True)  # fmt: skip

    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)


def _verbose(args) -> bool:
    return bool(getattr(args, "verbose", False) or os.environ.get(VERBOSE_ENV, "") not in ("", "0"))


def train_main(argv: list[str] | None = None, prog: str = "capsjax-train") -> int:
    """Entry point of ``capsjax-train``: parses ``argv`` (default ``sys.argv[1:]``), trains, returns the exit status
    (0 done, 1 checkpoint, divergence, busy work directory or multi-process error, 2 bad configuration or data,
    128 + the signal's number when stopped by SIGTERM / SIGINT after saving)."""
    args = build_train_parser(prog).parse_args(argv)
    from capsjax import distributed
    from capsjax.checkpoint import CheckpointError, quiet_logs
    from capsjax.config import ConfigError, to_dict
    from capsjax.data import DataError
    from capsjax.train import Preempted, TrainingDiverged
    from capsjax.workdir import WorkdirBusy

    verbose = _verbose(args)
    quiet_logs(verbose)
    multi, stop = False, None
    try:
        config = resolve_train_config(args)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return 0
        from capsjax.fast.hostmem import trim_after_compiles
        from capsjax.train import train_and_evaluate

        launch = (args.coordinator_address, args.num_processes, args.process_id)
        multi = args.distributed or any(v is not None for v in distributed.settings(*launch))
        if multi:
            distributed.initialize(*launch, prog=prog, verbose=verbose)
        trim_after_compiles()  # the compiler's freed heap back to the system before the steps' scratch is taken
        stop = _StopOnSignal(multi, prog)
        train_and_evaluate(config, args.workdir or f"runs/{args.preset}", should_stop=lambda: stop.requested)
        return 0
    except Preempted as err:  # every process stopped at the same step: a normal exit
        print(f"{prog}: {err}", file=sys.stderr)
        return stop.exit_code()
    except (ConfigError, DataError) as err:
        code = _fail(prog, err, 2, verbose)
    except (CheckpointError, TrainingDiverged, WorkdirBusy, distributed.DistributedError) as err:
        code = _fail(prog, err, 1, verbose)
    except KeyboardInterrupt:
        code = _fail(prog, "interrupted", 130, verbose)
    except Exception as err:  # anything else: one line, the traceback on request
        if verbose:
            raise
        if multi and distributed.is_peer_failure(err):
            code = _fail(prog, distributed.peer_failure_message(err), 1)
        else:
            code = _fail(prog, f"{type(err).__name__}: {err} (rerun with --verbose for the traceback)", 1, verbose)
    if multi:
        distributed.leave(code)  # without the shutdown barrier, which peers that failed differently never reach
    return code


def build_eval_parser(prog: str = "capsjax-eval") -> argparse.ArgumentParser:
    """The ``capsjax-eval`` / ``eval.py`` argument parser."""
    parser = OneLineParser(prog=prog, description="Evaluate a trained CapsNet and draw its reconstructions.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=_user_path, help="the training run's directory")
    source.add_argument("--weights", type=_user_path, metavar="FILE.safetensors",
                        help="a weights file (python -m capsjax.weights export) instead of a work directory; "
                        "figures and eval JSON go to FILE_eval/ beside it unless --out-dir is given")  # fmt: skip
    parser.add_argument("--split", default="test", choices=("test", "validation", "train"),
                        help="dataset split to evaluate: test (default), validation (the run's held-out examples) or "
                        "train (those it trained on); MultiMNIST: test or validation pairs")  # fmt: skip
    parser.add_argument("--dataset", default=None,
                        help="evaluate on another dataset than the run's: affine_mnist (an approximation of affNIST, "
                        "built from the MNIST files) or affnist (the official .mat files, with --data-dir), for a run "
                        "trained on expanded MNIST")  # fmt: skip
    parser.add_argument("--data-dir", type=_user_path, default=None,
                        help="directory of the dataset's files (default: the run's; for --dataset affnist, the folder "
                        "of the official .mat files)")  # fmt: skip
    parser.add_argument("--checkpoint", default="best", metavar="best|latest|STEP",
                        help="which checkpoint: the best validated one (default; the latest before the first epoch "
                        "ends), the latest, or a step number")  # fmt: skip
    parser.add_argument("--out-dir", type=_user_path, default=None,
                        help="where to write eval JSON and figures (default: the workdir, or FILE_eval/ beside "
                        "--weights)")  # fmt: skip
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
    from capsjax.evaluate import class_names_for, evaluate_workdir, format_confusion
    from capsjax.fast.hostmem import trim_after_compiles
    from capsjax.weights import is_weights_file

    trim_after_compiles()
    if args.batch_size is not None and args.batch_size < 1:
        return _fail(prog, "--batch-size must be >= 1", 2)
    if args.weights is not None and not is_weights_file(args.weights):
        return _fail(prog, f"--weights expects a .safetensors file, got {args.weights}", 2)
    try:
        metrics = evaluate_workdir(
            args.weights or args.workdir,
            split=args.split,
            data_dir=args.data_dir,
            which=args.checkpoint,
            out_dir=args.out_dir,
            figures=not args.no_figures,
            batch_size=args.batch_size,
            dataset=args.dataset,
        )
    except (ConfigError, DataError, ValueError) as err:  # WeightsError included
        return _fail(prog, str(err), 2)
    except CheckpointError as err:
        return _fail(prog, str(err), 1)
    except OSError as err:  # e.g. --out-dir names a file, or the disk is full
        where = err.filename or args.out_dir or args.weights or args.workdir
        return _fail(prog, f"cannot read or write {where}: {err.strerror or err}", 1)
    if "note" in metrics:
        print(f"note: {metrics['note']}")
    named = metrics["dataset"] + (" (an approximation of affNIST)" if metrics["dataset"] == "affine_mnist" else "")
    if "almost_accuracy" in metrics:  # k objects per image (MultiMNIST): scored as a set
        print(
            f"{named} {metrics['split']}: exact-set accuracy {100 * metrics['accuracy']:.2f}% "
            f"(error {100 * metrics['error_rate']:.2f}%), almost-correct {100 * metrics['almost_accuracy']:.2f}%, "
            f"loss {metrics['loss']:.4f}, {metrics['count']} images, {metrics['checkpoint']} checkpoint at step "
            f"{metrics['step']}\nper-digit confusion (each true digit once):"
        )
    else:
        print(
            f"{named} {metrics['split']}: accuracy {100 * metrics['accuracy']:.2f}% "
            f"(error {100 * metrics['error_rate']:.2f}%), loss {metrics['loss']:.4f}, {metrics['count']} examples, "
            f"{metrics['checkpoint']} checkpoint at step {metrics['step']}"
        )
    if "confusion" in metrics:
        print(format_confusion(metrics["confusion"], class_names_for(metrics)))
    for path in metrics.get("figures", []):
        print(f"wrote {path}")
    return 0


def train_command() -> int:
    """The ``capsjax-train`` program: :func:`train_main` after restarting with huge pages where that applies
    (:mod:`capsjax.fast.hostmem`)."""
    from capsjax.fast.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()
    return train_main()


def eval_command() -> int:
    """The ``capsjax-eval`` program: :func:`eval_main` after restarting with huge pages where that applies."""
    from capsjax.fast.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()
    return eval_main()
