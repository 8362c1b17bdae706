#!/usr/bin/env python
"""Evaluate a trained CapsNet: python eval.py --workdir RUN (same as the capsjax-eval command)."""

import sys

from capsjax.cli import eval_main
from capsjax.fast.hostmem import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # CPU: huge pages for XLA's scratch memory (see capsjax.fast.hostmem)
    sys.exit(eval_main(prog="eval.py"))
