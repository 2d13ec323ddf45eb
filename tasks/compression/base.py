"""Types shared by every compression step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.flows.spec import QuantizeStep


@dataclass(frozen=True)
class StepContext:
    """What a step may use besides the model it transforms."""

    #: The uncompressed parent: the distillation teacher and the sensitivity baseline.
    parent: Path
    #: Prompts of the calibration set (static quantization, sensitivity, gradient importance).
    calibration_prompts: tuple[str, ...]
    #: (prompt, answer) rows of the training set (qat, distill, recover).
    train_pairs: tuple[tuple[str, str], ...]
    #: "cpu" or "cuda": where the step runs and where the model will be served.
    device: str = "cpu"
    seed: int = 0
    #: The ignore list a preceding sensitivity step wrote, for ``quantize: {ignore: auto}``.
    auto_ignore: tuple[str, ...] | None = None
    #: The quantize step that follows a sensitivity step: its scheme is what sensitivity probes.
    next_quantize: QuantizeStep | None = None


@dataclass(frozen=True)
class StepOutcome:
    """What one step produced."""

    folder: Path
    #: Numbers logged to the candidate's MLflow run (prefixed with the step's index and kind).
    metrics: dict[str, float] = field(default_factory=dict)
    #: JSON-able details (per-layer errors, pruned units, losses) written to the candidate report.
    report: dict = field(default_factory=dict)
    #: Set by a sensitivity step: the patterns a following ``quantize: {ignore: auto}`` keeps.
    auto_ignore: tuple[str, ...] | None = None
