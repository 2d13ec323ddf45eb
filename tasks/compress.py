"""Stage 2: compress the parent into candidates, one recipe (list of steps) per candidate.

The walking skeleton has one step kind, ``quantize``: INT8 symmetric per-channel weight-only
quantization of Linear layers through torchao (default) or optimum-quanto. The result is saved
with ``save_pretrained`` so it reloads with ``AutoModelForCausalLM.from_pretrained`` (torchao) or
``QuantizedModelForCausalLM.from_pretrained`` (quanto) — see ``bentos.runtime.load_model``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from bentos.runtime import weights_size_bytes
from tasks.errors import StageFailed
from tasks.log import get_logger
from tasks.tracking import stage_run

if TYPE_CHECKING:
    import torch

    from flows.spec import CandidateSpec, QuantizeStep

log = get_logger(__name__)


@dataclass(frozen=True)
class LayerError:
    """Measured weight error of one quantized layer next to the chapter's bound."""

    name: str
    max_abs_error: float
    # ε = α / (2^(b-1) − 1) is the step of a symmetric grid over [−α, α]; rounding loses at most ε/2.
    bound: float


@dataclass(frozen=True)
class CompressedModel:
    candidate: str
    folder: Path
    size_bytes: int
    parent_size_bytes: int
    quantized_layers: tuple[str, ...]
    kept_layers: tuple[str, ...]
    layer_errors: tuple[LayerError, ...]

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.parent_size_bytes


def _linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def split_layers(names: list[str], ignore: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(quantized, kept) Linear layer names: ``ignore`` patterns (fnmatch) stay in full precision."""
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in ignore)]
    return [n for n in names if n not in kept], kept


def symmetric_per_channel_error(weight: torch.Tensor, bits: int) -> LayerError:
    """Max |W − dequant(quant(W))| of symmetric per-row quantization, and its bound ε/2."""
    import torch

    levels = 2 ** (bits - 1) - 1
    alpha = weight.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    scale = alpha / levels
    restored = torch.clamp(torch.round(weight / scale), -levels, levels) * scale
    return LayerError("", float((weight - restored).abs().max()), float((scale / 2).max()))


def _layer_errors(model: torch.nn.Module, layers: list[str], bits: int) -> tuple[LayerError, ...]:
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        errors = []
        for name in layers:
            err = symmetric_per_channel_error(modules[name].weight.detach().float(), bits)
            errors.append(LayerError(name, err.max_abs_error, err.bound))
    return tuple(errors)


def _quantize_torchao(parent: Path, out: Path, kept: list[str]) -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    # Int8WeightOnlyConfig defaults to PerRow granularity: one scale per output channel.
    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=kept or None)
    model = AutoModelForCausalLM.from_pretrained(parent, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)


def _quantize_quanto(parent: Path, out: Path, kept: list[str]) -> None:
    from optimum.quanto import QuantizedModelForCausalLM, qint8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parent)
    # quanto quantizes weights per output channel, symmetric, for qint8.
    QuantizedModelForCausalLM.quantize(model, weights=qint8, exclude=kept or None).save_pretrained(out)


def apply_quantize(parent: Path, out: Path, step: QuantizeStep) -> tuple[list[str], list[str], tuple]:
    """Quantize ``parent`` into ``out``; returns (quantized, kept, per-layer errors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(parent)
    quantized, kept = split_layers(_linear_names(reference), step.ignore)
    if not quantized:
        raise StageFailed(
            "compress", f"quantize.ignore {list(step.ignore)} leaves no Linear layer to quantize"
        )
    errors = _layer_errors(reference, quantized, step.bits)
    del reference
    if step.backend == "torchao":
        _quantize_torchao(parent, out, kept)
    else:
        _quantize_quanto(parent, out, kept)
    AutoTokenizer.from_pretrained(parent).save_pretrained(out)
    return quantized, kept, errors


def compress_candidate(parent: Path, candidate: CandidateSpec, out_root: Path) -> CompressedModel:
    """Run the candidate's steps in order; each step reads the previous step's folder."""
    target = out_root / candidate.name
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    current = parent
    quantized: list[str] = []
    kept: list[str] = []
    errors: tuple[LayerError, ...] = ()
    for index, step in enumerate(candidate.steps):
        step_out = staging / f"step-{index}-{step.kind}"
        if step.quantize is not None:
            quantized, kept, errors = apply_quantize(current, step_out, step.quantize)
        current = step_out
    final = staging / "model"
    os.replace(current, final)
    report = {
        "candidate": candidate.name,
        "recipe": [s.model_dump(mode="json", exclude_none=True) for s in candidate.steps],
        "quantized_layers": quantized,
        "kept_layers": kept,
        "layer_errors": [asdict(e) for e in errors],
    }
    (final / "lockgate_compress.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    folder = target / "model"
    result = CompressedModel(
        candidate=candidate.name,
        folder=folder,
        size_bytes=weights_size_bytes(folder),
        parent_size_bytes=weights_size_bytes(parent),
        quantized_layers=tuple(quantized),
        kept_layers=tuple(kept),
        layer_errors=errors,
    )
    log.info(
        "candidate %s: %d layers quantized, %d kept; weights %.2f MB -> %.2f MB (x%.2f)",
        candidate.name,
        len(quantized),
        len(kept),
        result.parent_size_bytes / 1e6,
        result.size_bytes / 1e6,
        result.size_ratio,
    )
    return result


@task(name="compress", task_run_name="compress-{candidate.name}")
def compress_task(
    parent: Path, candidate: CandidateSpec, out_root: Path, parent_run_id: str | None
) -> CompressedModel:
    """One candidate in its own nested MLflow run: resolved recipe, per-layer report, size."""
    import mlflow

    with stage_run(parent_run_id, f"compress-{candidate.name}", **{"lockgate.candidate": candidate.name}):
        result = compress_candidate(parent, candidate, out_root)
        mlflow.log_dict({"steps": [s.model_dump(mode="json") for s in candidate.steps]}, "recipe.json")
        mlflow.log_artifact(str(result.folder / "lockgate_compress.json"))
        mlflow.log_metrics(
            {
                "size_bytes": result.size_bytes,
                "parent_size_bytes": result.parent_size_bytes,
                "size_ratio": result.size_ratio,
                "layers_quantized": len(result.quantized_layers),
                "max_layer_error_over_bound": max(
                    (e.max_abs_error / e.bound for e in result.layer_errors), default=0.0
                ),
            }
        )
    return result
