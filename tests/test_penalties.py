"""OpenAI's presence/frequency penalties on lockgate's transformers engines (bentos/penalties.py
``OpenAIPenalties``): the math against a plain per-token loop, and a real model's greedy answers
against a step-by-step reference decode that applies OpenAI's definition to its own forward passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lockgate.bentos.penalties import OpenAIPenalties
from lockgate.bentos.runtime import LoadedModel, load_model


def _reference_penalty(
    logits: list[float], generated: list[int], presence: float, frequency: float
) -> list[float]:
    """OpenAI's definition, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    out = []
    for token, value in enumerate(logits):
        count = generated.count(token)
        out.append(value - count * frequency - (1.0 if count > 0 else 0.0) * presence)
    return out


def test_penalties_count_generated_tokens_only() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 7)
    prompt_len = 3
    # row 0: prompt [5, 5, 5] then generated 1, 1, 4; row 1 (left-padded prompt) generated 2, 6, 2
    input_ids = torch.tensor([[5, 5, 5, 1, 1, 4], [0, 0, 3, 2, 6, 2]])
    for presence, frequency in ((0.5, 0.0), (0.0, 0.75), (-1.0, 2.0)):
        got = OpenAIPenalties(prompt_len, presence, frequency)(input_ids, scores.clone())
        for row in range(2):
            generated = input_ids[row, prompt_len:].tolist()
            want = _reference_penalty(scores[row].tolist(), generated, presence, frequency)
            assert got[row].tolist() == pytest.approx(want, abs=1e-6), (presence, frequency, row)
    # the prompt's own tokens (5 in row 0) are never penalised; nothing generated yet: unchanged
    got = OpenAIPenalties(prompt_len, 2.0, 2.0)(input_ids, scores.clone())
    assert got[0, 5] == pytest.approx(scores[0, 5].item())
    assert torch.equal(OpenAIPenalties(6, 2.0, 2.0)(input_ids, scores.clone()), scores)


def _reference_greedy(lm: LoadedModel, prompt: str, steps: int, presence: float, frequency: float) -> str:
    """Greedy decoding written out: one full forward pass per step, OpenAI's penalties on its logits."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated: list[int] = []
    eos = set(lm._eos_ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = lm.model(input_ids=ids).logits[0, -1].float().tolist()
            penalised = _reference_penalty(logits, generated, presence, frequency)
            token = max(range(len(penalised)), key=penalised.__getitem__)
            generated.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return lm.tokenizer.decode(generated, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir: Path) -> LoadedModel:
    return load_model(tiny_llm_dir, device="cpu")


PROMPTS = ["Q: what is 3 plus 4?\nA:", "count: one two"]


def test_greedy_generation_applies_openai_penalties(tiny: LoadedModel) -> None:
    steps = 20
    plain = [_reference_greedy(tiny, p, steps, 0.0, 0.0) for p in PROMPTS]
    for presence, frequency in ((1.5, 0.0), (0.0, 1.0), (0.4, 0.8)):
        want = [_reference_greedy(tiny, p, steps, presence, frequency) for p in PROMPTS]
        assert want != plain, "the penalty must change this model's greedy answer, or the test shows nothing"
        # one left-padded batch of prompts of different lengths, and each prompt alone
        batched = tiny.generate(PROMPTS, steps, presence_penalty=presence, frequency_penalty=frequency)
        assert [g.text for g in batched] == want, (presence, frequency)
        streamed = tiny.stream(PROMPTS[1], steps, presence_penalty=presence, frequency_penalty=frequency)
        assert "".join(streamed) == want[1]


def test_penalties_out_of_range_are_refused_naming_the_field(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="presence_penalty"):
        tiny.generate(PROMPTS[:1], 2, presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        tiny.generate(PROMPTS[:1], 2, frequency_penalty=float("nan"))
