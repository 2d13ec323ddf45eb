"""Log-probabilities of given tokens under the served model: one forward pass, no generation.

The OpenAI API's ``logprobs`` (chat: of the answer's tokens; completions with ``echo``: of the prompt's
tokens too, what lm-evaluation-harness's log-likelihood tasks read) come from here. The sequence is
scored as the model sees it (teacher forcing), so a greedy answer's tokens get exactly the
log-probabilities the model chose them with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lockgate.bentos.runtime import LoadedModel

#: (token text, its log-probability or None for the first token, top alternatives as (text, logprob))
ScoredToken = tuple[str, float | None, list[tuple[str, float]]]


def score_tokens(model: LoadedModel, ids: list[int], top_k: int = 0) -> list[ScoredToken]:
    """Each token of ``ids`` with log P(token | tokens before it) and the ``top_k`` most likely tokens at
    its position. The first token has no context: its log-probability is None."""
    if not ids:
        return []
    with model._lock, torch.inference_mode():
        input_ids = torch.tensor([ids], device=model.device)
        logits = model.model(input_ids=input_ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].tolist()
    tops: list[list[tuple[str, float]]] = [[] for _ in chosen]
    if top_k > 0 and chosen:
        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        tops = [
            [(_text(model, int(i)), float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
        ]
    rows: list[ScoredToken] = [(_text(model, ids[0]), None, [])]
    rows.extend((_text(model, tok), lp, top) for tok, lp, top in zip(ids[1:], chosen, tops, strict=True))
    return rows


def _text(model: LoadedModel, token_id: int) -> str:
    return str(model.tokenizer.decode([token_id]))


def prompt_ids(model: LoadedModel, prompt: str) -> list[int]:
    """The ids the model is fed for ``prompt`` (special tokens the tokenizer adds included)."""
    return list(model.tokenizer(prompt)["input_ids"])


def text_ids(model: LoadedModel, text: str) -> list[int]:
    """The ids of generated ``text`` (no special tokens added)."""
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
