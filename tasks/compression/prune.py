"""The ``prune`` step: remove weights, attention heads, MLP neurons or whole blocks by importance.

Importance of a weight (section 9.1.3): ``magnitude`` |W|, ``gradient`` |∂L/∂W| or ``taylor``
|W·∂L/∂W| (the first-order estimate of the loss change when W is set to 0). Gradients are those of
the next-token loss on ``samples`` calibration prompts (train rows when there are none), summed
over the batch before taking the absolute value. A unit's importance is the sum over its weights.

Structures:

* ``unstructured``: in every Linear inside the transformer blocks, the lowest-scoring ``sparsity``
  share of weights is set to 0 (per matrix, so no layer is emptied). The tensors keep their shapes:
  dense CPU/GPU matmuls multiply the zeros too, so this saves **no** time and, stored dense, no
  space. The measured sparsity is reported, with that caveat.
* ``heads``: whole attention heads are removed: q/k/v rows and o_proj columns really shrink. With
  grouped-query attention a key/value head serves ``H/K`` query heads, so the unit is the KV group
  (its K and V heads together with all its query heads), which keeps ``H/K`` integral; with a single
  KV head (multi-query) the unit is the query head. ``head_dim`` is written to the config explicitly
  because ``hidden_size / num_attention_heads`` no longer equals it.
* ``mlp_neurons``: intermediate neurons are removed (gate/up rows, down_proj columns).
* ``layers``: whole blocks are dropped; ``num_hidden_layers`` and ``layer_types`` follow.

HF configs hold one ``num_attention_heads`` / ``intermediate_size`` for all blocks, so structured
pruning removes the same *number* of units from every block (each block chooses *which* by its own
scores): a per-block size would save a model ``from_pretrained`` cannot rebuild. The saved folder is
reloaded and its logits compared with the pruned model in memory before the step reports success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.training import (
    Encoded,
    causal_lm_loss,
    collate,
    encode_pairs,
    encode_texts,
    load_model,
    pad_id_of,
    save_model,
)
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lockgate.flows.spec import PruneStep

log = get_logger(__name__)

#: Calibration rows per backward pass when collecting gradients (bounds activation memory).
GRAD_BATCH = 8
UNSTRUCTURED_CAVEAT = (
    "unstructured sparsity keeps dense tensors: dense CPU/GPU matmuls multiply the zeros as well, so "
    "latency and the dense checkpoint size do not improve; only sparse kernels or sparse storage "
    "(not used here) could turn it into savings"
)

#: Importance of a weight matrix, elementwise: (name of the parameter, weight) -> scores.
Scorer = Callable[[str, "torch.Tensor"], "torch.Tensor"]


# ------------------------------------------------------------------------------------ importance
def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-style model (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise StageFailed(
            "compress",
            f"prune: {type(model).__name__} has no model.layers; only Llama-style decoders are supported",
        )
    return layers


def _calibration_rows(
    tokenizer: PreTrainedTokenizerBase, context: StepContext, samples: int
) -> list[Encoded]:
    rows = encode_texts(tokenizer, context.calibration_prompts[:samples])
    if not rows:
        rows = encode_pairs(tokenizer, context.train_pairs[:samples])
    return rows


def block_gradients(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, context: StepContext, samples: int
) -> dict[str, torch.Tensor]:
    """∂L/∂W of every parameter inside the blocks, L = mean next-token loss over the samples.

    Embeddings and the output head get no gradient: they are never pruned, and with a 150k
    vocabulary their gradients alone would need as much memory as the rest of the model."""

    rows = _calibration_rows(tokenizer, context, samples)
    if not rows:
        raise StageFailed(
            "compress",
            "prune.importance gradient/taylor needs calibration prompts or train rows; both are empty",
        )
    block_ids = {id(p) for p in _blocks(model).parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in block_ids)
    model.eval()  # no dropout: the gradient of the model as it will be served
    model.zero_grad(set_to_none=True)
    pad = pad_id_of(tokenizer)
    for start in range(0, len(rows), GRAD_BATCH):
        chunk = rows[start : start + GRAD_BATCH]
        # Weighted so the sum over chunks is the gradient of the mean loss over all rows.
        (causal_lm_loss(model, collate(chunk, pad)) * len(chunk) / len(rows)).backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(True)
    return grads


def make_scorer(kind: str, grads: dict[str, torch.Tensor] | None) -> Scorer:
    """Elementwise importance: |W|, |∂L/∂W| or |W·∂L/∂W|."""
    if kind == "magnitude":
        return lambda name, weight: weight.detach().abs().float()
    if grads is None:
        raise ValueError(f"importance {kind} needs gradients")

    def grad_of(name: str) -> torch.Tensor:
        if name not in grads:
            raise StageFailed("compress", f"prune.importance {kind}: no gradient reached {name}")
        return grads[name].float()

    if kind == "gradient":
        return lambda name, weight: grad_of(name).abs()
    if kind == "taylor":
        return lambda name, weight: (weight.detach().float() * grad_of(name)).abs()
    raise StageFailed("compress", f"prune.importance {kind!r} is not magnitude, gradient or taylor")


# ----------------------------------------------------------------------------------- structures
@dataclass(frozen=True)
class Pruned:
    """What one structure did: the share of units removed and details for the report."""

    sparsity: float
    details: dict


def _linear_weights(model: PreTrainedModel) -> list[tuple[str, torch.nn.Linear]]:
    import torch

    prefix = _block_prefix(model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(prefix)
    ]


def _block_prefix(model: PreTrainedModel) -> str:
    blocks = _blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def prune_unstructured(model: PreTrainedModel, score: Scorer, sparsity: float) -> Pruned:
    """Zero the lowest-scoring ``sparsity`` share of each block Linear's weights."""
    import torch

    zeroed = total = 0
    per_layer = {}
    for name, linear in _linear_weights(model):
        weight = linear.weight
        scores = score(f"{name}.weight", weight).flatten()
        k = round(sparsity * scores.numel())
        # argsort, not a threshold: ties (e.g. many zero gradients) would otherwise over-prune.
        drop = torch.argsort(scores, stable=True)[:k]
        with torch.no_grad():
            weight.view(-1)[drop] = 0
        zeros = int((weight == 0).sum())
        per_layer[name] = zeros / weight.numel()
        zeroed += zeros
        total += weight.numel()
    if total == 0:
        raise StageFailed("compress", "prune.structure unstructured found no Linear layer in the blocks")
    measured = zeroed / total
    params = sum(p.numel() for p in model.parameters())
    return Pruned(
        measured,
        {
            "zero_weights": zeroed,
            "block_linear_weights": total,
            "sparsity_of_block_linears": measured,
            # Embeddings and the head are not pruned, so the whole model is less sparse.
            "sparsity_of_all_parameters": zeroed / params,
            "per_layer_sparsity": per_layer,
            "caveat": UNSTRUCTURED_CAVEAT,
        },
    )


def _shrink_linear(
    linear: torch.nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> torch.nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` (None keeps all)."""
    import torch

    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    out_features, in_features = weight.shape
    new = torch.nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _units_to_remove(total: int, sparsity: float, what: str) -> int:
    """round(sparsity·total), at least 1 and at most total-1 (an empty layer cannot be saved)."""
    if total < 2:
        raise StageFailed(
            "compress", f"prune.structure: the model has {total} {what}; nothing can be removed"
        )
    return min(total - 1, max(1, round(sparsity * total)))


def _rows(units: list[int], size: int) -> list[int]:
    return [unit * size + i for unit in units for i in range(size)]


def prune_heads(model: PreTrainedModel, score: Scorer, sparsity: float) -> Pruned:
    """Remove the same number of KV groups (or query heads under MQA) from every block."""
    import torch

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // kv_heads
    # Unit: a KV group (K/V head + its query heads); under MQA (one KV head) a single query head.
    by_query_head = kv_heads == 1
    units = heads if by_query_head else kv_heads
    remove = _units_to_remove(units, sparsity, "query heads" if by_query_head else "key/value groups")
    removed_per_layer = []
    prefix = _block_prefix(model)
    for index, block in enumerate(_blocks(model)):
        attn = block.self_attn
        name = f"{prefix}{index}.self_attn"
        q = score(f"{name}.q_proj.weight", attn.q_proj.weight).sum(1).view(heads, head_dim).sum(1)
        o = score(f"{name}.o_proj.weight", attn.o_proj.weight).sum(0).view(heads, head_dim).sum(1)
        k = score(f"{name}.k_proj.weight", attn.k_proj.weight).sum(1).view(kv_heads, head_dim).sum(1)
        v = score(f"{name}.v_proj.weight", attn.v_proj.weight).sum(1).view(kv_heads, head_dim).sum(1)
        # A KV group scores its K and V heads plus all the query heads that read them.
        unit_scores = q + o if by_query_head else (q + o).view(kv_heads, per_group).sum(1) + k + v
        drop = sorted(torch.argsort(unit_scores, stable=True)[:remove].tolist())
        keep = [u for u in range(units) if u not in drop]
        if by_query_head:
            q_heads, kv_keep = keep, [0]
        else:
            q_heads = [g * per_group + j for g in keep for j in range(per_group)]
            kv_keep = keep
        q_rows = torch.tensor(_rows(q_heads, head_dim))
        kv_rows = torch.tensor(_rows(kv_keep, head_dim))
        attn.q_proj = _shrink_linear(attn.q_proj, q_rows, None)
        attn.k_proj = _shrink_linear(attn.k_proj, kv_rows, None)
        attn.v_proj = _shrink_linear(attn.v_proj, kv_rows, None)
        attn.o_proj = _shrink_linear(attn.o_proj, None, q_rows)
        attn.num_key_value_groups = len(q_heads) // len(kv_keep)
        removed_per_layer.append(drop)
    new_heads = heads - remove if by_query_head else heads - remove * per_group
    new_kv = kv_heads if by_query_head else kv_heads - remove
    # Explicit head_dim: hidden_size / num_attention_heads no longer equals it after pruning.
    config.head_dim = head_dim
    config.num_attention_heads = new_heads
    config.num_key_value_heads = new_kv
    return Pruned(
        (heads - new_heads) / heads,
        {
            "unit": "query_head" if by_query_head else "kv_group",
            "heads_before": heads,
            "heads_after": new_heads,
            "kv_heads_before": kv_heads,
            "kv_heads_after": new_kv,
            "head_dim": head_dim,
            "removed_units_per_layer": removed_per_layer,
        },
    )


def prune_mlp_neurons(model: PreTrainedModel, score: Scorer, sparsity: float) -> Pruned:
    """Remove the same number of intermediate neurons from every block's MLP."""
    import torch

    size = model.config.intermediate_size
    remove = _units_to_remove(size, sparsity, "MLP neurons")
    prefix = _block_prefix(model)
    lowest = []
    for index, block in enumerate(_blocks(model)):
        mlp = block.mlp
        name = f"{prefix}{index}.mlp"
        for part in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, part):
                raise StageFailed("compress", f"prune.structure mlp_neurons: {name} has no {part}")
        unit_scores = (
            score(f"{name}.gate_proj.weight", mlp.gate_proj.weight).sum(1)
            + score(f"{name}.up_proj.weight", mlp.up_proj.weight).sum(1)
            + score(f"{name}.down_proj.weight", mlp.down_proj.weight).sum(0)
        )
        order = torch.argsort(unit_scores, stable=True)
        keep = order[remove:].sort().values
        mlp.gate_proj = _shrink_linear(mlp.gate_proj, keep, None)
        mlp.up_proj = _shrink_linear(mlp.up_proj, keep, None)
        mlp.down_proj = _shrink_linear(mlp.down_proj, None, keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
        lowest.append(order[: min(remove, 8)].tolist())
    model.config.intermediate_size = size - remove
    return Pruned(
        remove / size,
        {
            "intermediate_before": size,
            "intermediate_after": size - remove,
            "lowest_removed_per_layer": lowest,  # the 8 least important removed neurons of each block
        },
    )


def prune_layers(model: PreTrainedModel, score: Scorer, sparsity: float) -> Pruned:
    """Drop the blocks with the lowest mean weight importance."""
    import torch

    blocks = _blocks(model)
    count = len(blocks)
    remove = _units_to_remove(count, sparsity, "blocks")
    prefix = _block_prefix(model)
    block_scores = []
    for index, block in enumerate(blocks):
        total = numel = 0.0
        for pname, param in block.named_parameters():
            if param.dim() < 2:
                continue  # norms carry no magnitude signal comparable to the matrices
            total += float(score(f"{prefix}{index}.{pname}", param).sum())
            numel += param.numel()
        block_scores.append(total / numel)
    drop = sorted(torch.argsort(torch.tensor(block_scores), stable=True)[:remove].tolist())
    keep = [i for i in range(count) if i not in drop]
    kept_blocks = [blocks[i] for i in keep]
    for new_index, block in enumerate(kept_blocks):
        # The KV cache is indexed by layer_idx: it must follow the new numbering.
        block.self_attn.layer_idx = new_index
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_index
    model.model.layers = torch.nn.ModuleList(kept_blocks)
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return Pruned(
        remove / count,
        {
            "layers_before": count,
            "layers_after": len(keep),
            "removed_layers": drop,
            "block_scores": block_scores,
        },
    )


STRUCTURES = {
    "unstructured": prune_unstructured,
    "heads": prune_heads,
    "mlp_neurons": prune_mlp_neurons,
    "layers": prune_layers,
}


# ---------------------------------------------------------------------------------------- step
def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_reload(model: PreTrainedModel, out: Path, probe: dict[str, torch.Tensor]) -> float:
    """Reload the saved folder and return the largest logit difference to the in-memory model."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded.eval()
    model.eval()
    with torch.no_grad():
        expected = model(**probe).logits
        got = reloaded(**probe).logits
    if expected.shape != got.shape or not torch.isfinite(got).all():
        raise StageFailed("compress", f"prune: the saved model at {out} does not reload to the pruned model")
    return float((expected - got).abs().max())


def apply(current: Path, out: Path, step: PruneStep, context: StepContext) -> StepOutcome:
    """Score, prune, save, and verify that the saved folder reloads to the pruned model."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(context.seed)
    model, tokenizer = load_model(current)
    if step.structure not in STRUCTURES:
        raise StageFailed(
            "compress", f"prune.structure {step.structure!r} is not one of {sorted(STRUCTURES)}"
        )
    params_before = count_parameters(model)
    grads = None
    if step.importance != "magnitude":
        grads = block_gradients(model, tokenizer, context, step.samples)
    with torch.no_grad():
        pruned = STRUCTURES[step.structure](model, make_scorer(step.importance, grads), step.sparsity)
    params_after = count_parameters(model)
    save_model(model, tokenizer, out)
    rows = _calibration_rows(tokenizer, context, 4) or encode_texts(tokenizer, ["the quick brown fox"])
    reload_diff = _check_reload(model, out, collate(rows, pad_id_of(tokenizer)))
    seconds = time.perf_counter() - started
    log.info(
        "prune %s by %s: target %.2f, reached %.3f; parameters %d -> %d (%.1f s)",
        step.structure,
        step.importance,
        step.sparsity,
        pruned.sparsity,
        params_before,
        params_after,
        seconds,
    )
    metrics = {
        "sparsity_target": step.sparsity,
        "sparsity": pruned.sparsity,
        "params_before": float(params_before),
        "params_after": float(params_after),
        "param_ratio": params_after / params_before,
        "reload_max_abs_diff": reload_diff,
        "seconds": seconds,
    }
    report = {
        "importance": step.importance,
        "structure": step.structure,
        "sparsity_target": step.sparsity,
        "sparsity": pruned.sparsity,
        "params_before": params_before,
        "params_after": params_after,
        "uniform_across_layers": step.structure in ("heads", "mlp_neurons"),
        **pruned.details,
    }
    return StepOutcome(folder=out, metrics=metrics, report=report)
