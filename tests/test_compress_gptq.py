"""GPTQ (tasks/compression/gptq.py) against round-to-nearest on the tiny random Llama of conftest:
the output error on the calibration inputs is what GPTQ minimises, so it must be lower."""

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
)
from lockgate.flows.spec import QuantizeStep
from lockgate.tasks.compression import quantize
from lockgate.tasks.compression.base import StepContext
from lockgate.tasks.compression.gptq import gptq_quantize, hessians

PROMPTS = tuple(f"Q: what is {a} plus {b}?\nA: {a + b}" for a in range(6) for b in range(4))
INT4_G32 = QuantScheme(bits=4, granularity="group", group_size=32)


def _inputs(model: torch.nn.Module, tokenizer, name: str) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.inference_mode():
        for prompt in PROMPTS:
            model(**tokenizer(prompt, return_tensors="pt"))
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize(
    "scheme", [INT4_G32, QuantScheme(bits=4, granularity="per_channel", symmetric=False)]
)
def test_gptq_has_lower_output_error_than_round_to_nearest(tiny_llm_dir: Path, scheme: QuantScheme) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype="float32").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    grams = hessians(model, tokenizer, names, PROMPTS)
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        x = _inputs(model, tokenizer, name)
        exact = x @ weight.T
        q, scale, zero = gptq_quantize(weight, grams[name], scheme)
        assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
        gptq_error = float(((x @ dequantize_weight(q, scale, zero).T) - exact).pow(2).mean())
        rtn_error = float(((x @ dequantize_weight(*quantize_weight(weight, scheme)).T) - exact).pow(2).mean())
        assert gptq_error < rtn_error, (name, gptq_error, rtn_error)


def test_quantize_step_gptq_saves_int4_closer_to_the_parent_than_rtn(
    tiny_llm_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context = StepContext(parent=tiny_llm_dir, calibration_prompts=PROMPTS, train_pairs=())
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    parent = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype="float32").eval()
    ids = tokenizer("\n".join(PROMPTS), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = parent(input_ids=ids).logits
    gaps = {}
    for method in ("rtn", "gptq"):
        step = QuantizeStep(bits=4, granularity="group", group_size=32, method=method, ignore=("lm_head",))
        outcome = quantize.apply(tiny_llm_dir, tmp_path / method, step, context)
        model = load_quantized(outcome.folder)
        assert any(isinstance(m, QuantLinear) and m.scheme.bits == 4 for m in model.modules())
        with torch.inference_mode():
            gaps[method] = float((model(input_ids=ids).logits - reference).pow(2).mean())
        assert outcome.report["scheme"]["method"] == method
    assert gaps["gptq"] < gaps["rtn"], gaps


def test_gptq_refuses_activation_modes_and_needs_calibration(tiny_llm_dir: Path, tmp_path: Path) -> None:
    from lockgate.tasks.platform.errors import StageFailed

    with pytest.raises(ValidationError, match="method: gptq is weight-only"):
        QuantizeStep(bits=8, mode="dynamic", method="gptq")
    empty = StepContext(parent=tiny_llm_dir, calibration_prompts=(), train_pairs=())
    with pytest.raises(StageFailed, match=r"quantize\.method gptq needs calibration prompts"):
        quantize.apply(
            tiny_llm_dir, tmp_path / "x", QuantizeStep(bits=4, method="gptq", ignore=("lm_head",)), empty
        )


@pytest.mark.parametrize(
    "scheme",
    [
        INT4_G32,
        QuantScheme(bits=4, granularity="per_channel", symmetric=False),
        QuantScheme(bits=8, group_size=64, granularity="group"),
    ],
)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(scheme: QuantScheme) -> None:
    """H = identity: no column's error spreads to another, so the blocked updates must leave every
    column as it was and GPTQ's codes and group scales equal round-to-nearest's (300 columns: three
    blocks, the last one partial)."""
    weight = torch.randn(48, 320, generator=torch.Generator().manual_seed(0))
    q, scale, zero = gptq_quantize(weight, torch.eye(320), scheme)
    rtn_q, rtn_scale, rtn_zero = quantize_weight(weight, scheme)
    assert torch.equal(q, rtn_q)
    assert torch.equal(scale, rtn_scale)
    assert (zero is None and rtn_zero is None) or torch.equal(zero, rtn_zero)


def test_gptq_quantizes_dead_input_columns_to_zero() -> None:
    """A column no calibration input ever reaches (H's diagonal 0) is quantized as 0 and the rest
    still factorises (fewer samples than columns: H is singular before damping)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(600, 1536, generator=generator)
    x[:, 7] = 0.0
    weight = torch.randn(576, 1536, generator=generator)
    q, scale, zero = gptq_quantize(weight, 2 * x.T @ x / len(x), INT4_G32)
    assert torch.all(q[:, 7] == 0)
    assert q.abs().sum() > 0
    assert zero is None and scale.shape == (576, 48) and torch.isfinite(scale).all()
