"""SmoothQuant-style migration of activation outliers into the weights (Xiao et al., 2023).

For a Linear ``y = x W^T`` every input channel j can be divided by ``s_j`` if column j of W is
multiplied by it: the float output is unchanged, but the input's outlier channels shrink and the
weight, quantized per output row, absorbs them. ``s_j = max|x_j|^α / max|W[:, j]|^(1−α)``.
The division is folded into what produces x, so it costs nothing at run time:

* q/k/v_proj and gate/up_proj: the preceding RMSNorm weight (one norm feeds each group);
* down_proj: up_proj's output rows (down's input is ``act(gate(x)) * up(x)``, linear in up).

o_proj is left alone: with grouped-query attention its input channels do not map one to one onto
v_proj's output rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.tasks.compression.layer_inputs import visit_layer_inputs

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def channel_maxima(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], prompts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of each named Linear over ``prompts`` (one prompt at a time)."""
    import torch

    maxima: dict[str, torch.Tensor] = {}

    def widen(name: str, x: torch.Tensor) -> None:
        x = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)

    visit_layer_inputs(model, tokenizer, names, prompts, widen)
    return maxima


def migration_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^α / max_i |W[i, j]|^(1−α) over every weight fed by x (clamped away from 0)."""
    import torch

    w_max = torch.cat([w.detach().float().abs() for w in weights]).amax(dim=0)
    tiny = 1e-5
    return (x_max.clamp_min(tiny).pow(alpha) / w_max.clamp_min(tiny).pow(1 - alpha)).clamp_min(tiny)


def smooth_llama(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: tuple[str, ...],
    alpha: float,
    only: set[str] | None = None,
) -> list[str]:
    """Migrate activation outliers of every Llama-style block into its weights, in place.

    ``only``: the Linear names whose inputs may be smoothed (a group is smoothed when any of its
    members is in it); None smooths every group. Returns the names of the smoothed Linears."""
    import torch

    groups = []  # (source of x: ("norm", module) or ("rows", Linear), consumers)
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        attention = [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        groups.append((layer.input_layernorm, attention))
        groups.append(
            (layer.post_attention_layernorm, [f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj")])
        )
        groups.append((layer.mlp.up_proj, [f"{prefix}.mlp.down_proj"]))
    if only is not None:
        groups = [(source, members) for source, members in groups if any(m in only for m in members)]
    names = [m for _, members in groups for m in members]
    maxima = channel_maxima(model, tokenizer, names, prompts)
    smoothed = []
    with torch.no_grad():
        for source, members in groups:
            x_max = torch.stack([maxima[m] for m in members]).amax(dim=0)
            linears = [model.get_submodule(m) for m in members]
            scales = migration_scales(x_max, [lin.weight for lin in linears], alpha)
            for linear in linears:
                linear.weight.mul_(scales.to(linear.weight.dtype))
            if isinstance(source, torch.nn.Linear):
                source.weight.div_(scales[:, None].to(source.weight.dtype))
                if source.bias is not None:
                    source.bias.div_(scales.to(source.bias.dtype))
            else:
                source.weight.div_(scales.to(source.weight.dtype))
            smoothed.extend(members)
    return smoothed
