"""The ``qat`` step: quantization-aware training, then real quantization (section 9.1.1).

During training every targeted Linear computes with its weights rounded to the integer grid
(fake quantization); the rounding has zero gradient almost everywhere, so the straight-through
estimator passes the gradient to the float weights unchanged: ``w + (q(w) − w).detach()``. After
``steps`` AdamW steps on the training pairs (causal LM loss on prompt + answer), the trained
weights are quantized for real into lockgate's format with the same scheme the training saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.quantize import (
    linear_names,
    probe_ids,
    quantize_in_place,
    save_verified,
    split_layers,
)
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lockgate.bentos.quantized import QuantScheme
    from lockgate.flows.spec import QatStep

log = get_logger(__name__)

#: Rows of the fixed batch the loss is compared on before and after training.
_EVAL_ROWS = 64


def _fake_quant_linear_class() -> type:
    # Built on first use: torch is imported lazily so that importing the step stays cheap.
    import torch
    import torch.nn.functional as F

    from lockgate.bentos.quantized import dequantize_weight, quantize_weight

    class FakeQuantLinear(torch.nn.Module):
        """Wraps a Linear: forward uses the rounded weights, backward reaches the float weights (STE)."""

        def __init__(self, linear: torch.nn.Linear, scheme: QuantScheme) -> None:
            super().__init__()
            self.linear, self.scheme = linear, scheme

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.linear.weight
            with torch.no_grad():
                rounded = dequantize_weight(*quantize_weight(w, self.scheme), dtype=w.dtype)
            return F.linear(x, w + (rounded - w).detach(), self.linear.bias)

    return FakeQuantLinear


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> Batch:
    """Right-padded ``prompt answer</s>`` rows; padding is labelled -100 (no loss)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise StageFailed("compress", "qat: the tokenizer has neither a pad nor an eos token")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = [tokenizer(f"{p} {a}")["input_ids"] + eos for p, a in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return Batch(ids, mask, ids.masked_fill(mask == 0, -100))


def batch_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


def train_fake_quant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    step: QatStep,
    pairs: list[tuple[str, str]],
    seed: int,
) -> list[float]:
    """``step.steps`` AdamW steps on random batches of ``pairs``; returns the loss of each step."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=step.lr)
    model.train()
    losses = []
    for _ in range(step.steps):
        batch = encode_pairs(tokenizer, rng.sample(pairs, min(step.batch_size, len(pairs))))
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def apply(current: Path, out: Path, step: QatStep, context: StepContext) -> StepOutcome:
    """Fake-quant training of the targeted Linears, then real quantization into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lockgate.bentos.quantized import QuantScheme, set_submodule

    pairs = list(context.train_pairs)
    if not pairs:
        raise StageFailed("compress", "qat.steps: data.train has no (prompt, answer) rows to train on")
    tokenizer = AutoTokenizer.from_pretrained(current)
    model = AutoModelForCausalLM.from_pretrained(current, dtype="float32")
    names, kept = split_layers(linear_names(model), step.ignore, step.targets)
    if not names:
        raise StageFailed("compress", f"qat.ignore {list(step.ignore)} leaves no Linear layer to quantize")
    scheme = QuantScheme(
        step.bits,
        step.scheme == "symmetric",
        step.granularity,
        step.group_size,
        float_zero=step.zero_point == "float",
    )
    eval_batch = encode_pairs(tokenizer, pairs[:_EVAL_ROWS])
    model.eval()
    with torch.no_grad():
        float_loss = float(batch_loss(model, eval_batch))
    fake_quant = _fake_quant_linear_class()
    for name in names:
        set_submodule(model, name, fake_quant(model.get_submodule(name), scheme))
    with torch.no_grad():
        loss_before = float(batch_loss(model, eval_batch))
    losses = train_fake_quant(model, tokenizer, step, pairs, context.seed)
    with torch.no_grad():
        loss_after = float(batch_loss(model, eval_batch))
    for name in names:  # unwrap: the trained float Linears go to real quantization
        set_submodule(model, name, model.get_submodule(name).linear)
    errors = quantize_in_place(model, names, scheme)
    save_verified(model, tokenizer, out, probe_ids(tokenizer, context.calibration_prompts))
    log.info(
        "qat: fake-quant loss %.4f -> %.4f in %d steps (float %.4f)",
        loss_before,
        loss_after,
        step.steps,
        float_loss,
    )
    return StepOutcome(
        folder=out,
        metrics={
            "float_loss": float_loss,
            "fake_quant_loss_before": loss_before,
            "fake_quant_loss_after": loss_after,
            "layers_quantized": len(names),
            "max_error_over_group_bound": max(e.max_error_over_group_bound for e in errors),
        },
        report={
            "quantized_layers": names,
            "kept_layers": kept,
            "train_losses": losses,
            "layer_errors": [e.__dict__ for e in errors],
        },
    )
