"""Writing the small files of a work directory so that no reader ever sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path | str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file beside it and ``os.replace``: a reader (another process of
    a multi-process run, or a rerun after a crash) sees the old content or the new one, never a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path | str, hint: str = "restore it or delete it", error: type[ValueError] = ValueError) -> Any:
    """The JSON in ``path``; a file that isn't JSON (edited by hand, or damaged on disk) raises ``error`` (a
    ``ValueError``) whose one line names the file and ``hint`` (what to do about it), not a bare decoder message."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); {hint}") from None
