"""Turn a model URI into a local folder the runtime can load.

Accepted: a local folder, or an MLflow registry URI (``models:/name/version``, ``models:/name@alias``,
``models:/name/Stage``). A registry URI is first pinned to a concrete version, so a stage
transition is seen on the next resolve, and each version's files are downloaded once into a cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.bentos.config import ModelUri, ModelUriError, model_cache_dir


class ModelResolveError(RuntimeError):
    """The URI names no loadable model."""


#: Model-version tag the monitor's ``recalibrate`` response writes; the service applies it live.
CALIBRATION_TAG = "lockgate.calibration.temperature"


@dataclass(frozen=True)
class PinnedVersion:
    name: str
    version: str
    #: The version's fitted calibration temperature (tag ``CALIBRATION_TAG``) when it was pinned; 1.0
    #: when it has none. Read from the same registry answer as the version: one call per poll.
    calibration_temperature: float = 1.0

    @classmethod
    def of(cls, name: str, model_version: Any) -> PinnedVersion:
        """From an MLflow ``ModelVersion``."""
        tags = getattr(model_version, "tags", None) or {}
        return cls(name, str(model_version.version), parse_temperature(tags.get(CALIBRATION_TAG)))


def parse_temperature(value: str | None) -> float:
    """A tag value as a temperature; 1.0 (no scaling) when absent, not a number or out of range."""
    try:
        temperature = float(value) if value is not None else 1.0
    except ValueError:
        return 1.0
    return temperature if 0.01 <= temperature <= 100 else 1.0


def _parse(uri: ModelUri | str) -> ModelUri:
    try:
        return uri if isinstance(uri, ModelUri) else ModelUri.parse(uri)
    except ModelUriError as exc:
        raise ModelResolveError(str(exc)) from exc


def pin_version(uri: ModelUri | str) -> PinnedVersion:
    """The concrete registry version a ``models:/`` URI points at right now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    parsed = _parse(uri)
    if not parsed.is_registry:
        raise ModelResolveError(
            f"{uri}: expected models:/NAME/VERSION, models:/NAME/STAGE or models:/NAME@ALIAS"
        )
    name, ref = parsed.name, parsed.ref
    client = MlflowClient()
    try:
        if parsed.kind == "alias":
            return PinnedVersion.of(name, client.get_model_version_by_alias(name, ref))
        if parsed.kind == "version":
            return PinnedVersion.of(name, client.get_model_version(name, ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            versions = client.get_latest_versions(name, stages=[ref.capitalize()])
        if not versions:
            raise ModelResolveError(f"{uri}: no version of {name} is in stage {ref.capitalize()}")
        return PinnedVersion.of(name, versions[0])
    except MlflowException as exc:
        raise ModelResolveError(f"{uri}: {exc.message}") from exc


def _find_model_folder(root: Path) -> Path:
    """The folder holding config.json inside a downloaded pyfunc model (artifacts/model/...)."""
    for candidate in [root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    raise ModelResolveError(f"{root}: no transformers model folder inside the registered model")


def download_version(pinned: PinnedVersion, cache_dir: Path) -> Path:
    """Download one registry version into ``cache_dir`` once; later calls reuse it."""
    import mlflow

    target = cache_dir / f"{pinned.name}-v{pinned.version}"
    if target.is_dir():
        return _find_model_folder(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache_dir))
    try:
        uri = str(ModelUri.version(pinned.name, pinned.version))
        mlflow.artifacts.download_artifacts(uri, dst_path=str(staging))
        os.replace(staging, target)  # atomic: a crash never leaves a half-downloaded cache entry
    except OSError:
        if not target.is_dir():  # another process won the race: use its copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _find_model_folder(target)


def default_cache_dir() -> Path:
    return model_cache_dir(os.environ) or Path(tempfile.gettempdir()) / "lockgate-models"


def resolve_model_dir(uri: ModelUri | str, cache_dir: Path | None = None) -> Path:
    """Local folder holding config.json + weights + tokenizer for ``uri``."""
    parsed = _parse(uri)
    if parsed.is_registry:
        return download_version(pin_version(parsed), cache_dir or default_cache_dir())
    folder = parsed.path
    if not (folder / "config.json").is_file():
        raise ModelResolveError(f"{uri}: not a model folder (no config.json)")
    return folder
