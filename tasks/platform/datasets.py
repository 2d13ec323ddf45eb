"""Load the spec's datasets (eval / calibration / reference) as DataFrames with known columns."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from lockgate.tasks.platform.errors import DataValidationError

if TYPE_CHECKING:
    from lockgate.flows.spec import DatasetRole, DatasetSpec

# The columns each role must have; extra columns are kept and ignored.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": ("prompt", "answer"),
    "eval": ("prompt", "answer"),
    "calibration": ("prompt",),
    "reference": ("prompt",),
}


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataValidationError(str(path), [f"unsupported file type {suffix!r}; use .jsonl, .csv or .parquet"])


def load_dataset(role: DatasetRole, spec: DatasetSpec, base_dir: Path) -> pd.DataFrame:
    """The dataset of ``role``: built-in demo rows or a file, cut to ``max_samples``."""
    if spec.source == "demo":
        from lockgate.tasks.demo.corpus import demo_dataset

        frame = demo_dataset(role)
    else:
        path = Path(spec.source).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise DataValidationError(role, [f"data.{role}.source: file {path} does not exist"])
        frame = _read_file(path)
    if spec.max_samples is not None:
        frame = frame.head(spec.max_samples)
    return frame.reset_index(drop=True)
