"""The one exception of the data package and the hint every "not found" message ends with."""

from __future__ import annotations

DATA_ENV = "CAPSJAX_DATA"
"""The environment variable naming a root of ``<dataset>/`` folders."""

HINT = f"pass --data-dir DIR (data_dir=...) or set ${DATA_ENV} to a directory that holds <dataset>/ folders"


class DataError(ValueError):
    """A dataset that cannot be found or read: the message names the file or dataset and says what to do."""
