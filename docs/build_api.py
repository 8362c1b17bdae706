"""Builds the API reference of capsjax (HTML, from the docstrings) with pdoc.

    pip install -e ".[docs]"
    python docs/build_api.py [OUT_DIR]          # default: docs/api; open OUT_DIR/index.html

Every module of the package gets a page. (``capsjax.__all__`` lists the public names of the top-level module, and pdoc
would follow it to the letter and skip the submodules; so they are named here explicitly.)
"""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "api"


def modules() -> list[str]:
    """``capsjax`` and each of its public submodules (those of ``capsjax.fast`` too), by name."""
    import capsjax

    infos = pkgutil.walk_packages(capsjax.__path__, "capsjax.")
    names = sorted(info.name for info in infos if not any(part.startswith("_") for part in info.name.split(".")))
    return ["capsjax", *names]


def build(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Writes ``index.html`` and one page per module into ``out_dir``; returns ``out_dir``."""
    import pdoc
    import pdoc.render

    import capsjax

    out_dir = Path(out_dir)
    pdoc.render.configure(
        docformat="google",  # Args:/Returns: sections; reST roles such as :func: are understood too
        footer_text=f"capsjax {capsjax.__version__}",
        search=True,
        show_source=True,
    )
    pdoc.pdoc(*modules(), output_directory=out_dir)
    return out_dir


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
    print(f"wrote {out / 'index.html'}")
