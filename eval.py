#!/usr/bin/env python
"""Evaluate a trained CapsNet: python eval.py --workdir RUN (same as the capsjax-eval command)."""

import sys

from capsjax.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(prog="eval.py"))
