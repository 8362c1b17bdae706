#!/usr/bin/env python
"""Train a CapsNet: python train.py --help (same as the capsjax-train command)."""

import sys

from capsjax.cli import train_main
from capsjax.fast.hostmem import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # CPU: huge pages for XLA's scratch memory (see capsjax.fast.hostmem)
    sys.exit(train_main(prog="train.py"))
