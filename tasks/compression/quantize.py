"""The ``quantize`` step: post-training quantization of Linear layers.

INT8 symmetric per-channel weight-only quantization through torchao or optimum-quanto. The result
is saved with ``save_pretrained`` so it reloads with ``AutoModelForCausalLM.from_pretrained``
(torchao) or ``QuantizedModelForCausalLM.from_pretrained`` (quanto) — see
``bentos.runtime.load_model``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.compression.base import StepContext, StepOutcome
from tasks.errors import StageFailed
from tasks.log import get_logger

if TYPE_CHECKING:
    import torch

    from flows.spec import QuantizeStep

log = get_logger(__name__)


@dataclass(frozen=True)
class LayerError:
    """Measured weight error of one quantized layer next to the chapter's bound."""

    name: str
    max_abs_error: float
    # ε = α / (2^(b-1) − 1) is the step of a symmetric grid over [−α, α]; rounding loses at most ε/2.
    bound: float


def _linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


_BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")


def resolve_patterns(names: list[str], patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Expand ``{first}`` / ``{last}`` to the first and last transformer block's modules."""
    blocks = sorted({int(m.group(1)) for n in names if (m := _BLOCK_INDEX.search(n))})
    resolved = []
    for pattern in patterns:
        if pattern in ("{first}", "{last}"):
            if blocks:
                index = blocks[0] if pattern == "{first}" else blocks[-1]
                resolved.append(f"*.layers.{index}.*")
        else:
            resolved.append(pattern)
    return tuple(resolved)


def split_layers(
    names: list[str], ignore: tuple[str, ...], targets: tuple[str, ...] = ("*",)
) -> tuple[list[str], list[str]]:
    """(quantized, kept) Linear layer names: ``ignore`` patterns (fnmatch) stay in full precision."""
    ignore = resolve_patterns(names, ignore)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    kept = [n for n in chosen if any(fnmatch.fnmatchcase(n, p) for p in ignore)]
    return [n for n in chosen if n not in kept], [n for n in names if n not in chosen or n in kept]


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


def apply(parent: Path, out: Path, step: QuantizeStep, context: StepContext) -> StepOutcome:
    """Quantize ``parent`` into ``out``, reporting per-layer errors next to their bound."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ignore = context.auto_ignore if step.ignore == "auto" else step.ignore
    if ignore is None:
        raise StageFailed("compress", "quantize.ignore is 'auto' but no sensitivity step ran before it")
    reference = AutoModelForCausalLM.from_pretrained(parent)
    quantized, kept = split_layers(_linear_names(reference), ignore, step.targets)
    if not quantized:
        raise StageFailed(
            "compress", f"quantize.ignore {list(step.ignore)} leaves no Linear layer to quantize"
        )
    errors = _layer_errors(reference, quantized, step.bits)
    del reference
    if step.backend in ("torchao", "auto"):
        _quantize_torchao(parent, out, kept)
    else:
        _quantize_quanto(parent, out, kept)
    AutoTokenizer.from_pretrained(parent).save_pretrained(out)
    worst = max((e.max_abs_error / e.bound for e in errors), default=0.0)
    return StepOutcome(
        folder=out,
        metrics={"layers_quantized": len(quantized), "max_layer_error_over_bound": worst},
        report={
            "quantized_layers": quantized,
            "kept_layers": kept,
            "layer_errors": [asdict(e) for e in errors],
        },
    )
