"""Feed calibration prompts through a model and hand each named Linear's input to a visitor.

What static ranges, activation statistics, GPTQ's Hessians and SmoothQuant's channel maxima all need:
one forward pass per prompt (one prompt at a time: padding would add values real inputs never have),
forward pre-hooks on the named modules, removed whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def visit_layer_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    prompts: tuple[str, ...],
    visit: Callable[[str, torch.Tensor], None],
) -> None:
    """Call ``visit(name, x)`` with the input ``x`` of every named module, prompt by prompt."""
    import torch

    def observer(name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            visit(name, args[0])

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(observer(n)) for n in names]
    try:
        with torch.inference_mode():
            for prompt in prompts:
                model(**tokenizer(prompt, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
