#!/usr/bin/env python
"""Train a CapsNet: python train.py --help (same as the capsjax-train command)."""

import sys

from capsjax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(prog="train.py"))
