"""The ``quantize`` step: post-training quantization of Linear layers (section 9.1.1).

Backends:

* ``torch`` (and ``auto`` on CPU): lockgate's own format (``bentos.quantized``): INT8 or INT4,
  symmetric or asymmetric, per tensor / per channel / per group, weight-only, dynamic or static.
  INT8 symmetric per-channel dynamic runs fbgemm's int8 kernel; the rest dequantizes per call.
* ``torchao`` (and ``auto`` on CUDA where torchao has the scheme): INT8 weight-only per row, or
  INT4 group-wise (CUDA only), saved with ``save_pretrained``.
* ``quanto``: optimum-quanto qint8 weights (``QuantizedModelForCausalLM``).
* ``bitsandbytes``: LLM.int8() / NF4 through transformers (CUDA only).

Every layer's measured max weight error is reported next to its rounding bound (half a grid step;
α/(2^(b−1)−1)/2 for a symmetric grid). A lockgate-format result is reloaded before the step ends
and must give bit-identical logits.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.layer_inputs import visit_layer_inputs
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lockgate.bentos.quantized import QuantScheme
    from lockgate.flows.spec import QuantizeStep

log = get_logger(__name__)


@dataclass(frozen=True)
class LayerError:
    """Measured weight error of one quantized layer next to the rounding bound."""

    name: str
    max_abs_error: float
    #: Half the largest grid step of the layer: ε/2 with ε = α/(2^(b−1)−1) for a symmetric grid.
    bound: float
    #: max over weights of |error| / (half the step of that weight's own group): ≤ 1 when rounding
    #: is the only loss (a tighter check than max_abs_error ≤ bound, which compares worst cases).
    max_error_over_group_bound: float


def linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


_BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")


def block_indices(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := _BLOCK_INDEX.search(n))})


def resolve_patterns(names: list[str], patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Expand ``{first}`` / ``{last}`` to the first and last transformer block's modules."""
    blocks = block_indices(names)
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


def scheme_of(step: QuantizeStep) -> QuantScheme:
    from lockgate.bentos.quantized import QuantScheme

    return QuantScheme(
        bits=step.bits,
        symmetric=step.scheme == "symmetric",
        granularity=step.granularity,
        group_size=step.group_size,
        mode=step.mode,
        activations=step.activations,
        float_zero=step.zero_point == "float",
    )


def weight_error(weight: torch.Tensor, scheme: QuantScheme) -> tuple[float, float, float]:
    """(max |W − dequant(quant(W))|, largest half step, max error / own group's half step)."""
    from lockgate.bentos.quantized import dequantize_weight, quantize_weight, rounding_bound

    q, scale, zero = quantize_weight(weight, scheme)
    w = weight.detach().float()
    error = (w - dequantize_weight(q, scale, zero)).abs()
    half_step = rounding_bound(scale, zero)
    rows, groups = scale.shape
    per_weight = (error.reshape(rows, groups, -1) / half_step[..., None]).amax()
    return float(error.max()), float(half_step.max()), float(per_weight)


def layer_errors(model: torch.nn.Module, names: list[str], scheme: QuantScheme) -> tuple[LayerError, ...]:
    """Per-layer error of ``scheme`` on the float weights of ``model`` (before they are replaced)."""
    import torch

    errors = []
    with torch.no_grad():
        for name in names:
            err, bound, ratio = weight_error(model.get_submodule(name).weight, scheme)
            errors.append(LayerError(name, err, bound, ratio))
    return tuple(errors)


def calibrate_input_ranges(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], prompts: tuple[str, ...]
) -> dict[str, tuple[float, float]]:
    """Min and max input of each named Linear over the calibration prompts (static mode)."""

    ranges: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}

    def widen(name: str, x: torch.Tensor) -> None:
        seen = ranges[name]
        seen[0] = min(seen[0], float(x.min()))
        seen[1] = max(seen[1], float(x.max()))

    visit_layer_inputs(model, tokenizer, names, prompts, widen)
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


@dataclass(frozen=True)
class ActivationStats:
    """Input range of one Linear over the calibration prompts: what activation quantization faces."""

    name: str
    min: float
    max: float
    #: Largest |x| of any token over the median token's largest |x|: how much a per-call (per-tensor)
    #: grid is stretched by outlier tokens. SmolLM2's layer-11 down_proj: ~2,000.
    outlier_ratio: float


def activation_stats(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], prompts: tuple[str, ...]
) -> tuple[ActivationStats, ...]:
    """Per-layer input ranges and outlier ratios over ``prompts`` (one prompt at a time: padding
    would add values that real inputs never have)."""
    import torch

    lows: dict[str, float] = dict.fromkeys(names, 0.0)
    highs: dict[str, float] = dict.fromkeys(names, 0.0)
    token_max: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        lows[name] = min(lows[name], float(x.min()))
        highs[name] = max(highs[name], float(x.max()))
        token_max[name].append(x.abs().reshape(-1, x.shape[-1]).amax(dim=1))

    visit_layer_inputs(model, tokenizer, names, prompts, record)
    stats = []
    for name in names:
        rows = torch.cat(token_max[name]) if token_max[name] else torch.zeros(1)
        median = float(rows.median())
        ratio = float(rows.max()) / median if median > 0 else 0.0
        stats.append(ActivationStats(name, lows[name], highs[name], ratio))
    return tuple(stats)


def probe_ids(tokenizer: PreTrainedTokenizerBase, prompts: tuple[str, ...]) -> torch.Tensor:
    """Token ids the reload check scores: a calibration prompt, or a fixed sentence without one."""
    text = prompts[0] if prompts else "Q: what is 12 plus 7?\nA: 19"
    return tokenizer(text, return_tensors="pt")["input_ids"]


def save_verified(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, ids: torch.Tensor
) -> None:
    """Save in lockgate's format and reload: the logits must be bit-identical, or the step fails."""
    import torch

    from lockgate.bentos.quantized import load_quantized, save_quantized

    with torch.inference_mode():
        before = model(input_ids=ids).logits
    save_quantized(model, out)
    tokenizer.save_pretrained(out)
    with torch.inference_mode():
        after = load_quantized(out)(input_ids=ids).logits
    if not torch.equal(before, after):
        diff = float((before - after).abs().max())
        raise StageFailed("compress", f"quantize: reloaded {out} differs from the quantized model by {diff}")


def quantize_in_place(
    model: PreTrainedModel, names: list[str], scheme: QuantScheme, input_ranges: dict | None = None
) -> tuple[LayerError, ...]:
    """Replace ``names`` with QuantLinear modules; returns their errors measured before replacement."""
    from lockgate.bentos.quantized import quantize_linears

    errors = layer_errors(model, names, scheme)
    quantize_linears(model, names, scheme, input_ranges)
    return errors


def gptq_in_place(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    scheme: QuantScheme,
    prompts: tuple[str, ...],
) -> tuple[LayerError, ...]:
    """Replace ``names`` with GPTQ-quantized QuantLinears (Hessians from one float pass over
    ``prompts``); errors are measured on GPTQ's own codes, so the rounding bound no longer holds
    weight by weight: GPTQ trades weight error for output error."""
    from lockgate.bentos.quantized import rounding_bound, set_submodule
    from lockgate.tasks.compression.gptq import gptq_linear, hessians

    grams = hessians(model, tokenizer, names, prompts)
    errors = []
    for name in names:
        linear = model.get_submodule(name)
        module = gptq_linear(linear, grams.pop(name), scheme)
        error = (linear.weight.detach().float() - module.dequantized_weight()).abs()
        half_step = rounding_bound(module.scale, module.zero_point)
        rows, groups = module.scale.shape
        ratio = float((error.reshape(rows, groups, -1) / half_step[..., None]).amax())
        errors.append(LayerError(name, float(error.max()), float(half_step.max()), ratio))
        set_submodule(model, name, module)
    return tuple(errors)


def resolve_backend(step: QuantizeStep, device: str) -> str:
    """``auto`` → lockgate's kernels on CPU; torchao on CUDA where torchao has the scheme."""
    if step.backend != "auto":
        return step.backend
    torchao_scheme = step.scheme == "symmetric" and step.mode == "weight_only"
    torchao_scheme &= step.granularity == "group" if step.bits == 4 else step.granularity == "per_channel"
    return "torchao" if device == "cuda" and torchao_scheme else "torch"


def _quantize_torch(
    current: Path, out: Path, step: QuantizeStep, context: StepContext, names: list[str]
) -> tuple[LayerError, ...]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(current)
    model = AutoModelForCausalLM.from_pretrained(current, dtype="float32").eval()
    ranges = None
    prompts = context.calibration_prompts[: step.calibration_samples]
    needs_prompts = {
        "mode static": step.mode == "static",
        "method gptq": step.method == "gptq",
        "smoothing_alpha": step.smoothing_alpha is not None,
    }
    for field, needed in needs_prompts.items():
        if needed and not prompts:
            raise StageFailed(
                "compress", f"quantize.{field} needs calibration prompts; data.calibration is empty"
            )
    if step.smoothing_alpha is not None:
        from lockgate.tasks.compression.smoothing import smooth_llama

        smooth_llama(model, tokenizer, prompts, step.smoothing_alpha, set(names))
    # Activation ranges are reported in every mode: they say whether dynamic/static would suffer.
    stats = activation_stats(model, tokenizer, names, prompts) if prompts else ()
    if step.mode == "static":
        ranges = {s.name: (s.min, s.max) for s in stats}
    try:
        if step.method == "gptq":
            errors = gptq_in_place(model, tokenizer, names, scheme_of(step), prompts)
        else:
            errors = quantize_in_place(model, names, scheme_of(step), ranges)
    except ValueError as exc:  # e.g. "group_size: 48 does not divide in_features 64"
        raise StageFailed("compress", f"quantize.{exc}") from exc
    save_verified(model, tokenizer, out, probe_ids(tokenizer, context.calibration_prompts))
    return errors, stats


def _quantize_torchao(current: Path, out: Path, step: QuantizeStep, device: str, kept: list[str]) -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    if step.bits == 4 and device != "cuda":
        # verified-stack §6: every Int4WeightOnlyConfig packing failed on CPU (mslk / CUDA needed).
        raise StageFailed("compress", "quantize.backend torchao: int4 is CUDA-only; use backend torch on CPU")
    # Int8WeightOnlyConfig defaults to PerRow granularity: one scale per output channel.
    ao = Int4WeightOnlyConfig(group_size=step.group_size) if step.bits == 4 else Int8WeightOnlyConfig()
    config = TorchAoConfig(ao, modules_to_not_convert=kept or None)
    model = AutoModelForCausalLM.from_pretrained(current, quantization_config=config, device_map=device)
    model.save_pretrained(out)


def _quantize_quanto(current: Path, out: Path, step: QuantizeStep, kept: list[str]) -> None:
    from optimum.quanto import QuantizedModelForCausalLM, qint8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(current)
    # quanto's qint8: per output channel, symmetric (the spec refuses qint4: see QuantizeStep).
    QuantizedModelForCausalLM.quantize(model, weights=qint8, exclude=kept or None).save_pretrained(out)


def _quantize_bitsandbytes(
    current: Path, out: Path, step: QuantizeStep, device: str, kept: list[str]
) -> None:
    if device != "cuda":
        raise StageFailed("compress", "quantize.backend bitsandbytes needs CUDA; use backend torch on CPU")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_8bit=step.bits == 8, load_in_4bit=step.bits == 4, llm_int8_skip_modules=kept or None
    )
    AutoModelForCausalLM.from_pretrained(
        current, quantization_config=config, device_map=device
    ).save_pretrained(out)


def resolve_ignore(step_ignore: tuple[str, ...] | str, context: StepContext) -> tuple[str, ...]:
    if step_ignore != "auto":
        return tuple(step_ignore)
    if context.auto_ignore is None:
        raise StageFailed("compress", "quantize.ignore is 'auto' but no sensitivity step ran before it")
    return context.auto_ignore


def apply(current: Path, out: Path, step: QuantizeStep, context: StepContext) -> StepOutcome:
    """Quantize ``current`` into ``out``, reporting per-layer errors next to their bound."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ignore = resolve_ignore(step.ignore, context)
    with torch.device("meta"):  # names only: no weights read or initialised
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(current))
    names = linear_names(skeleton)
    quantized, kept = split_layers(names, ignore, step.targets)
    if not quantized:
        raise StageFailed("compress", f"quantize.ignore {list(ignore)} leaves no Linear layer to quantize")
    backend = resolve_backend(step, context.device)
    log.info("quantize: %d Linear layers, %d kept in float, backend %s", len(quantized), len(kept), backend)
    stats: tuple[ActivationStats, ...] = ()
    if backend == "torch":
        errors, stats = _quantize_torch(current, out, step, context, quantized)
    else:
        # Third-party backends: errors of lockgate's grid for the same scheme, as the estimate.
        reference = AutoModelForCausalLM.from_pretrained(current, dtype="float32")
        errors = layer_errors(reference, quantized, scheme_of(step))
        del reference
        if backend == "torchao":
            _quantize_torchao(current, out, step, context.device, kept)
        elif backend == "quanto":
            _quantize_quanto(current, out, step, kept)
        else:
            _quantize_bitsandbytes(current, out, step, context.device, kept)
        AutoTokenizer.from_pretrained(current).save_pretrained(out)
    worst_abs = max(e.max_abs_error / e.bound for e in errors)
    worst_group = max(e.max_error_over_group_bound for e in errors)
    activation_metrics = (
        {
            "max_activation_abs": max(max(-s.min, s.max) for s in stats),
            "max_activation_outlier_ratio": max(s.outlier_ratio for s in stats),
        }
        if stats
        else {}
    )
    return StepOutcome(
        folder=out,
        metrics={
            "layers_quantized": len(quantized),
            "layers_kept": len(kept),
            "bits": step.bits,
            "max_layer_error_over_bound": worst_abs,
            "max_error_over_group_bound": worst_group,
            **activation_metrics,
        },
        report={
            "backend": backend,
            "scheme": step.model_dump(mode="json"),
            "resolved_ignore": list(resolve_patterns(names, ignore)),
            "quantized_layers": quantized,
            "kept_layers": kept,
            "layer_errors": [asdict(e) for e in errors],
            "activation_stats": [asdict(s) for s in stats],
            "errors_measured_on": "lockgate format" if backend == "torch" else "lockgate grid (estimate)",
        },
    )
