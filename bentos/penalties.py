"""OpenAI's ``presence_penalty`` / ``frequency_penalty`` for lockgate's transformers engines, as a
transformers logits processor (the vllm engine hands them to vLLM's SamplingParams instead)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList

if TYPE_CHECKING:
    from lockgate.bentos.runtime import SamplingParams


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, as vLLM applies them: over the tokens generated so far
    (the prompt does not count), ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``.

    transformers runs the processors handed to ``generate`` before its temperature and top-p warpers,
    so the penalties act on the raw logits, as in OpenAI's and vLLM's definition. In a left-padded
    batch every row's prompt ends at the same position, ``prompt_len``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts  # type: ignore[return-value]


def penalty_processors(params: SamplingParams, prompt_len: int) -> LogitsProcessorList | None:
    """What ``generate`` gets as ``logits_processor`` for ``params``: None when no penalty is set."""
    if not params.penalized:
        return None
    return LogitsProcessorList(
        [OpenAIPenalties(prompt_len, params.presence_penalty, params.frequency_penalty)]
    )
