"""``python -m capsjax.data download mnist [--dir DIR]``: MNIST's IDX files from a public mirror, without TensorFlow
(:func:`capsjax.data.download_mnist`)."""

from __future__ import annotations

import sys

from capsjax.data.download import MNIST_MIRROR, download_mnist
from capsjax.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
    from capsjax.cli import OneLineParser

    parser = OneLineParser(prog="python -m capsjax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    download = sub.add_parser("download", help="fetch a dataset's files into the folder capsjax looks in")
    download.add_argument("dataset", choices=["mnist"])
    download.add_argument("--dir", default=None, help="where to put them (default: ~/.cache/capsjax/mnist)")
    download.add_argument("--mirror", default=MNIST_MIRROR, help=f"the files' base URL (default: {MNIST_MIRROR})")
    args = parser.parse_args(argv)
    try:
        folder = download_mnist(args.dir, base_url=args.mirror)
    except DataError as err:
        print(f"{parser.prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"MNIST is in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
