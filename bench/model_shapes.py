"""Model shapes the benchmarks time with random weights (speed does not depend on weight values)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Qwen2Config

#: Qwen2-0.5B's architecture (494 M parameters with its 151,936-token tied vocabulary).
QWEN2_05B_VOCAB = 151_936


def qwen2_05b_config(vocab_size: int = QWEN2_05B_VOCAB, **overrides: Any) -> Qwen2Config:
    """Qwen2-0.5B's shape; ``overrides`` change single fields (e.g. fewer layers for a quick run)."""
    from transformers import Qwen2Config

    shape = {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    return Qwen2Config(vocab_size=vocab_size, **{**shape, **overrides})
