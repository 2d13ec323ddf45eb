"""The service code as it travels in a bento or a logged MLflow model: ``lockgate/bentos/*.py``.

The repo keeps ``bentos/`` at the top, but the code imports itself as ``lockgate.bentos``; a bento or
an MLflow model that carries it must therefore hold it under that path. ``lockgate`` stays a
namespace package there (no ``__init__.py``), so it never shadows an installed lockgate's other parts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BENTOS_SOURCE = Path(__file__).resolve().parents[2] / "bentos"


def stage_service_code(destination: Path) -> Path:
    """Copy ``bentos/*.py`` to ``destination/lockgate/bentos/``; returns ``destination/lockgate``."""
    package = destination / "lockgate" / "bentos"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for source in sorted(BENTOS_SOURCE.glob("*.py")):
        shutil.copy2(source, package / source.name)
    return package.parent
