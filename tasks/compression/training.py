"""Training plumbing shared by the compression steps that train (recover, distill, prune's
gradient importance): (prompt, answer) rows encoded exactly as generation sees them, batches,
losses, and loading/saving of float model folders."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Rows of the fixed batch the losses before/after are measured on (the first rows of the data).
EVAL_ROWS = 32


@dataclass(frozen=True)
class Encoded:
    """Token ids of one training row and how many leading tokens get no loss."""

    ids: tuple[int, ...]
    #: Tokens at the start that are context only (the prompt); all of them for unlabeled text.
    context_len: int


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
    """``prompt`` (with the tokenizer's usual special tokens) + `` answer\\n`` + EOS.

    The prompt is tokenized on its own, exactly as generation sees it, so the first answer token
    is learned at the position it is predicted from at serving time (same layout as the demo model's
    post-training)."""
    if not pairs:
        return []
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([f" {a}\n" for _, a in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [
        Encoded(tuple(p + a + eos), len(p)) for p, a in zip(prompts, answers, strict=True) if len(p + a) > 1
    ]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[Encoded]:
    """Unlabeled text (calibration prompts): every token is a target, nothing is context."""
    if not texts:
        return []
    return [Encoded(tuple(ids), 0) for ids in tokenizer(list(texts))["input_ids"] if len(ids) > 1]


def collate(rows: Sequence[Encoded], pad_id: int, max_len: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``; ``labels`` are -100 on padding and context."""
    import torch

    width = min(max_len, max(len(r.ids) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        seq = torch.tensor(row.ids[:width], dtype=torch.long)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, row.context_len : len(seq)] = seq[row.context_len :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


#: Batches are cut from windows of this many batches' worth of shuffled rows, sorted by length.
LENGTH_GROUP_BATCHES = 16


def endless_index_batches(rows: Sequence[Encoded], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Row indices, ``batch_size`` at a time, for ever: shuffled epochs (the last rows of an epoch
    roll over), grouped by length the way transformers' ``group_by_length`` does it — each window of
    ``LENGTH_GROUP_BATCHES`` batches of the shuffled order is sorted by length before it is cut, and the
    window's batches come in random order. Right padding makes every row of a batch as long as its
    longest; a real model's rows (SmolLM2's few-shot prompts: 30 to 300 tokens) spent up to half of
    every forward and backward on padding with purely random batches."""
    rng = random.Random(seed)
    order: list[int] = []
    # At most one epoch per window: sorting several copies of the data would batch a row with itself.
    window = batch_size * max(1, min(LENGTH_GROUP_BATCHES, len(rows) // batch_size))
    while True:
        while len(order) < window:
            order += rng.sample(range(len(rows)), len(rows))
        chosen, order = order[:window], order[window:]
        chosen.sort(key=lambda i: len(rows[i].ids), reverse=True)
        batches = [chosen[start : start + batch_size] for start in range(0, window, batch_size)]
        rng.shuffle(batches)
        yield from batches


def endless_batches(
    rows: Sequence[Encoded], batch_size: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``endless_index_batches`` collated."""
    for chosen in endless_index_batches(rows, batch_size, seed):
        yield collate([rows[i] for i in chosen], pad_id)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (HF shifts the labels itself)."""
    return model(**batch).loss


def eval_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = float(causal_lm_loss(model, batch))
    model.train(was_training)
    return value


def load_model(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A float model folder and its tokenizer (the input of every training step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
