"""The ``sensitivity`` step: which blocks (or Linears) lose the most when quantized alone.

Each unit is quantized on its own with the scheme of the quantize step that follows (its bits,
granularity and mode: weight-only, dynamic or static activations; a field set on the sensitivity
step overrides it) and the perplexity of the calibration prompts is compared with the unquantized
model. Probing the recipe's own mode matters: a weight-only probe cannot see activation outliers
(SmolLM2's down_proj inputs near 3,000), which only dynamic/static quantization suffers from. Units whose
perplexity rises more than ``max_increase_pct`` become the ignore list a following
``quantize: {ignore: auto}`` keeps in float. The weights are not changed: the step's folder is a
copy of its input.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.quantize import block_indices, linear_names
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lockgate.bentos.quantized import QuantScheme
    from lockgate.flows.spec import QuantizeStep, SensitivityStep

log = get_logger(__name__)


@dataclass(frozen=True)
class UnitSensitivity:
    """Perplexity with one unit quantized, against the unquantized model."""

    pattern: str
    layers: int
    perplexity: float
    increase_pct: float
    kept: bool


#: Most tokens one batched forward of ``perplexity`` scores (texts x longest): bounds the logits'
#: memory (SmolLM2: 49k vocabulary x 4 bytes = 0.2 MB a token) while batching short prompts.
PERPLEXITY_BATCH_TOKENS = 4096


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: tuple[str, ...]) -> float:
    """exp(mean next-token NLL) over every token of ``texts``.

    Texts are scored several at a time, right-padded: in a causal model a real token never attends to
    the padding after it and keeps its positions, so each text's logits are its own (equal to scoring it
    alone up to float rounding); the padding is left out of the loss. The sensitivity step calls this
    once per probed unit, so batching is what makes probing a real model's 210 Linears affordable."""
    import torch

    encoded = [tokenizer(text)["input_ids"] for text in texts]
    encoded = sorted((ids for ids in encoded if len(ids) >= 2), key=len)
    if not encoded:
        raise StageFailed("compress", "sensitivity: calibration prompts have no token pairs to score")
    nll, count = 0.0, 0
    with torch.inference_mode():
        start = 0
        while start < len(encoded):
            longest, stop = len(encoded[start]), start
            while stop < len(encoded) and len(encoded[stop]) * (stop - start + 1) <= PERPLEXITY_BATCH_TOKENS:
                longest, stop = len(encoded[stop]), stop + 1
            stop = max(stop, start + 1)  # a text longer than the budget is scored alone
            longest = len(encoded[stop - 1])
            batch = torch.zeros((stop - start, longest), dtype=torch.long)
            labels = torch.full((stop - start, longest), -100, dtype=torch.long)
            for row, ids in enumerate(encoded[start:stop]):
                batch[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(ids)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((targets != -100).sum())
            start = stop
    return math.exp(nll / count)


def units(names: list[str], unit: str) -> dict[str, list[str]]:
    """Probe units as {ignore pattern: Linear names}: one per block (plus lm_head) or one per Linear."""
    if unit == "layer":
        return {name: [name] for name in names}
    groups: dict[str, list[str]] = {}
    for index in block_indices(names):
        pattern = f"*.layers.{index}.*"
        groups[pattern] = [n for n in names if f".layers.{index}." in n]
    outside = [n for n in names if not any(n in members for members in groups.values())]
    for name in outside:  # lm_head and any Linear outside the block list is a unit of its own
        groups[name] = [name]
    return groups


def copy_model_files(current: Path, out: Path) -> None:
    """The model's own files only: a demo parent also holds base/ and adapter/ folders, not needed."""
    out.mkdir(parents=True, exist_ok=True)
    for path in current.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)


def probe_scheme(step: SensitivityStep, following: QuantizeStep | None) -> QuantScheme:
    """The sensitivity step's own fields, else the following quantize step's, else the defaults
    of a lone probe (int4 per-channel weight-only, as before the fields followed the recipe)."""
    from lockgate.bentos.quantized import QuantScheme

    def pick(field: str, alone: object) -> object:
        own = getattr(step, field)
        if own is not None:
            return own
        return getattr(following, field) if following is not None else alone

    return QuantScheme(
        bits=pick("bits", 4),
        symmetric=following is None or following.scheme == "symmetric",
        granularity=pick("granularity", "per_channel"),
        group_size=pick("group_size", 32),
        mode=pick("mode", "weight_only"),
        activations=pick("activations", "per_token"),
        float_zero=following is not None and following.zero_point == "float",
    )


def apply(current: Path, out: Path, step: SensitivityStep, context: StepContext) -> StepOutcome:
    """Probe each unit; ``auto_ignore`` lists those over ``max_increase_pct``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lockgate.bentos.quantized import quantize_linears, set_submodule
    from lockgate.tasks.compression.quantize import activation_stats

    prompts = context.calibration_prompts[: step.samples]
    if not prompts:
        raise StageFailed("compress", "sensitivity.samples: data.calibration has no prompts to score")
    tokenizer = AutoTokenizer.from_pretrained(current)
    model = AutoModelForCausalLM.from_pretrained(current, dtype="float32").eval()
    try:
        scheme = probe_scheme(step, context.next_quantize)
    except ValueError as exc:  # e.g. "mode: dynamic quantizes activations to int8 and needs bits 8"
        raise StageFailed("compress", f"sensitivity.{exc}") from exc
    baseline = perplexity(model, tokenizer, prompts)
    names = linear_names(model)
    ranges = None
    if scheme.mode == "static":  # measured once on the float model, as the quantize step does
        ranges = {s.name: (s.min, s.max) for s in activation_stats(model, tokenizer, names, prompts)}
    results = []
    for pattern, members in units(names, step.unit).items():
        member_ranges = None if ranges is None else {n: ranges[n] for n in members}
        originals = quantize_linears(model, members, scheme, member_ranges)
        try:
            ppl = perplexity(model, tokenizer, prompts)
        finally:  # put the float layers back before the next unit is probed
            for name, linear in originals.items():
                set_submodule(model, name, linear)
        increase = 100.0 * (ppl / baseline - 1.0)
        results.append(
            UnitSensitivity(pattern, len(members), ppl, increase, increase > step.max_increase_pct)
        )
        log.info("sensitivity %s: ppl %.4f (%+.2f %%)", pattern, ppl, increase)
    copy_model_files(current, out)
    ignore = tuple(r.pattern for r in results if r.kept)
    return StepOutcome(
        folder=out,
        metrics={
            "baseline_perplexity": baseline,
            "units_probed": len(results),
            "units_kept": len(ignore),
            "max_increase_pct": max(r.increase_pct for r in results),
        },
        report={
            "baseline_perplexity": baseline,
            "probe": asdict(scheme),
            "units": [asdict(r) for r in results],
            "auto_ignore": list(ignore),
        },
        auto_ignore=ignore,
    )
