"""SmoothQuant migration (tasks/compression/smoothing.py) on the tiny random Llama of conftest."""

from __future__ import annotations

from pathlib import Path

import torch

from lockgate.bentos.quantized import QuantLinear, load_quantized
from lockgate.flows.spec import QuantizeStep
from lockgate.tasks.compression import quantize
from lockgate.tasks.compression.base import StepContext
from lockgate.tasks.compression.smoothing import channel_maxima, smooth_llama

PROMPTS = tuple(f"Q: what is {a} plus {b}?\nA: {a + b}" for a in range(4) for b in range(3))


def test_smoothing_keeps_the_float_function_and_flattens_input_channels(tiny_llm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype="float32").eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    name = "model.layers.0.mlp.down_proj"
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    spread_before = channel_maxima(model, tokenizer, [name], PROMPTS)[name]
    smoothed = smooth_llama(model, tokenizer, PROMPTS, alpha=0.5)
    assert name in smoothed and "model.layers.0.self_attn.q_proj" in smoothed
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    spread_after = channel_maxima(model, tokenizer, [name], PROMPTS)[name]
    ratio = lambda m: float(m.max() / m.min())  # noqa: E731 - max/min channel range
    assert ratio(spread_after) < ratio(spread_before)


def test_quantize_step_with_smoothing_saves_a_reloadable_int8_model(
    tiny_llm_dir: Path, tmp_path: Path
) -> None:
    context = StepContext(parent=tiny_llm_dir, calibration_prompts=PROMPTS, train_pairs=())
    step = QuantizeStep(bits=8, mode="dynamic", smoothing_alpha=0.5, ignore=("lm_head",))
    outcome = quantize.apply(tiny_llm_dir, tmp_path / "q", step, context)
    model = load_quantized(outcome.folder)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == outcome.metrics["layers_quantized"]
