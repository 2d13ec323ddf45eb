"""The ``recover`` step: LoRA fine-tuning through peft after pruning or distillation, merged back.

The adapter trains on ``context.train_pairs`` with the loss on the answer tokens only (the prompt is
context, not something to imitate), then ``merge_and_unload()`` folds ``B·A·alpha/r`` into the base
weights, so the saved folder is a plain model with no ``lora_`` modules and no peft dependency.

When the base weights carry unstructured sparsity (an earlier ``prune`` zeroed them), the merged
delta is dense and would silently undo the pruning; the zero pattern is therefore re-applied after
merging and the loss is reported both before and after re-masking.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.training import (
    EVAL_ROWS,
    causal_lm_loss,
    collate,
    encode_pairs,
    endless_batches,
    eval_loss,
    load_model,
    pad_id_of,
    save_model,
)
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch

    from lockgate.flows.spec import RecoverStep

log = get_logger(__name__)

#: A weight matrix with at least this share of exact zeros is treated as pruned (re-masked after merge).
SPARSE_SHARE = 0.01


def _sparsity_masks(model: torch.nn.Module, target_modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Zero patterns of the targeted Linear weights that look pruned (>= 1 % exact zeros)."""
    import torch

    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            zero = module.weight == 0
            if float(zero.float().mean()) >= SPARSE_SHARE:
                masks[name] = ~zero
    return masks


def _check_targets(model: torch.nn.Module, target_modules: tuple[str, ...]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise StageFailed(
            "compress",
            f"recover.target_modules {missing} match no module of the model "
            f"(modules end in e.g. {sorted(present)[:12]})",
        )


def apply(current: Path, out: Path, step: RecoverStep, context: StepContext) -> StepOutcome:
    """Train a LoRA adapter on ``context.train_pairs``, merge it, re-apply any pruning mask, save."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    if not context.train_pairs:
        raise StageFailed("compress", "recover needs train_pairs: the training dataset is empty")
    started = time.perf_counter()
    torch.manual_seed(context.seed)
    model, tokenizer = load_model(current)
    _check_targets(model, step.target_modules)
    masks = _sparsity_masks(model, step.target_modules)
    pad = pad_id_of(tokenizer)
    rows = encode_pairs(tokenizer, context.train_pairs)
    probe = collate(rows[:EVAL_ROWS], pad)
    loss_before = eval_loss(model, probe)

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=step.r,
        lora_alpha=step.alpha,
        lora_dropout=0.0,
        target_modules=list(step.target_modules),
    )
    with warnings.catch_warnings():
        # transformers 5.24 deprecates an attribute peft 0.21.2 reads; harmless, not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=step.lr, weight_decay=0.0)
    batches = endless_batches(rows, step.batch_size, pad, context.seed)
    peft_model.train()
    losses = []
    for _ in range(step.steps):
        loss = causal_lm_loss(peft_model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peft_model.eval()
    loss_adapter = eval_loss(peft_model, probe)

    merged = peft_model.merge_and_unload()
    loss_merged = eval_loss(merged, probe)
    if masks:
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for name, keep in masks.items():
                modules[name].weight.mul_(keep)
    loss_after = eval_loss(merged, probe)
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftover:
        raise StageFailed("compress", f"recover: merge_and_unload left LoRA modules behind: {leftover[:3]}")
    save_model(merged, tokenizer, out)
    seconds = time.perf_counter() - started
    log.info(
        "recover: %d LoRA steps (r=%d, %d trainable params), answer loss %.4f -> %.4f in %.1f s",
        step.steps,
        step.r,
        trainable,
        loss_before,
        loss_after,
        seconds,
    )
    metrics = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "trainable_params": float(trainable),
        "seconds": seconds,
    }
    report = {
        "loss": "answer-only cross-entropy on the first train rows",
        "loss_before": loss_before,
        "loss_with_adapter": loss_adapter,
        "loss_merged": loss_merged,
        "loss_after": loss_after,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "trainable_params": trainable,
        "target_modules": list(step.target_modules),
        # The merged LoRA delta is dense; re-applying the zero pattern keeps the pruning real.
        "remasked_modules": sorted(masks),
        "seconds": seconds,
    }
    return StepOutcome(folder=out, metrics=metrics, report=report)
