"""Evaluation tasks: metric types on hand-made rows with known answers, bootstrap intervals that cover
the truth, behavioural distance gates, answer-only perplexity, one chat rendering for eval and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lockgate.flows.spec import ConfidenceSpec, DistanceSpec, EvalTaskSpec, RelativeGate
from lockgate.tasks import eval_metrics as m
from lockgate.tasks.evaluate import (
    PreparedTask,
    TaskScores,
    _intervals,
    behavioural_distance,
    check_distance,
    check_gate,
    prepare_task,
    score_output,
    score_task,
)


def _task(metric: str, **kw: object) -> PreparedTask:
    return PreparedTask("t", metric, [], [], **kw)


def test_exact_match_is_normalised() -> None:
    t = _task("exact_match")
    assert score_output(t, " The Paris.\nmore text", "paris")
    assert score_output(t, "an  Apple!", "apple")
    assert not score_output(t, "Paris is the capital", "Paris")
    assert not score_output(t, "", "paris")


def test_contains() -> None:
    t = _task("contains")
    assert score_output(t, "I think the answer is Paris, France.", "paris")
    assert not score_output(t, "Parisian food", "paris")  # whole words only


def test_regex_extracts_the_answer() -> None:
    t = _task("regex", pattern=r"answer is (\w+)")
    assert score_output(t, "so the answer is Blue.", "blue")
    assert not score_output(t, "so the answer is red", "blue")
    assert not score_output(t, "no idea", "blue")


def test_numeric_with_tolerance() -> None:
    exact, loose = _task("numeric"), _task("numeric", tolerance=0.5)
    assert score_output(exact, "It is 1,024 bytes", "1024")
    assert score_output(exact, "-3.0", "-3")
    assert not score_output(exact, "42.4", "42")
    assert score_output(loose, "about 42.4", "42")
    assert not score_output(loose, "no number", "42")
    with pytest.raises(ValueError, match="not a number"):
        score_output(exact, "1", "one")


def test_task_spec_checks_metric_parameters() -> None:
    with pytest.raises(ValueError, match="metric regex needs a pattern"):
        EvalTaskSpec(name="t", data="x.jsonl", metric="regex")
    with pytest.raises(ValueError, match="tolerance applies to metric numeric"):
        EvalTaskSpec(name="t", data="x.jsonl", metric="contains", tolerance=1)


def _loglik_by_hand(model: object, tok: object, prompt: str, continuation: str) -> float:
    import torch

    prompt_ids = tok(prompt)["input_ids"]
    cont_ids = tok(f" {continuation}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*prompt_ids, *cont_ids]])
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(lp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(cont_ids)))


def test_multiple_choice_picks_the_most_likely_choice(tiny_llm_dir: Path) -> None:
    """The answer key is whichever choice the model itself finds most likely (computed here by hand,
    one full forward pass per choice): the task must score 1.0 with it and 0.0 with another choice."""
    from lockgate.bentos.runtime import load_model

    lm = load_model(tiny_llm_dir, "cpu")
    prompts = ["Q: what is 3 plus 4?\nA:", "Q: what is 10 plus 2?\nA:"]
    choices = [["7", "9", "12"], ["12", "3", "21"]]
    best, worst = [], []
    for p, cs in zip(prompts, choices, strict=True):
        scores = [_loglik_by_hand(lm.model, lm.tokenizer, p, c) for c in cs]
        best.append(cs[int(np.argmax(scores))])
        worst.append(cs[int(np.argmin(scores))])
    for key, expected in ((best, 1.0), (worst, 0.0)):
        frame = pd.DataFrame({"prompt": prompts, "answer": key, "choices": ["|".join(c) for c in choices]})
        task = prepare_task(lm.tokenizer, "mc", frame, "multiple_choice", "completion")
        scores = score_task(lm, task)
        assert scores.outputs == best
        assert scores.correct.mean() == expected


def test_few_shot_rows_are_examples_not_scored(tiny_llm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    frame = pd.DataFrame({"prompt": ["Q: 1+1?\nA:", "Q: 2+2?\nA:", "Q: 3+3?\nA:"], "answer": ["2", "4", "6"]})
    task = prepare_task(tok, "fs", frame, "exact_match", "completion", few_shot=2)
    assert task.answers == ["6"]
    assert task.prompts == ["Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"]


def test_perplexity_scores_answer_tokens_only(tiny_llm_dir: Path) -> None:
    """A shared few-shot prefix must not dominate perplexity: only the answer (+ end) tokens count,
    and each row's NLL is the answer's alone, computed here by hand."""
    import torch

    from lockgate.bentos.runtime import load_model

    lm = load_model(tiny_llm_dir, "cpu")
    tok = lm.tokenizer
    prefix = "".join(f"Q: what is {a} plus 1?\nA: {a + 1}\n\n" for a in range(12))
    frame = pd.DataFrame({"prompt": [f"{prefix}Q: what is 5 plus 2?\nA:"], "answer": ["7"]})
    scores = score_task(lm, prepare_task(tok, "p", frame, "exact", "completion", max_new_tokens=2))
    cont = [*tok(" 7", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert scores.tokens.tolist() == [len(cont)]  # not the ~150 prompt tokens
    prompt_ids = tok(frame.prompt[0])["input_ids"]
    ids = torch.tensor([[*prompt_ids, *cont]])
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    expected = -sum(float(lp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(cont))
    assert scores.nll[0] == pytest.approx(expected, rel=1e-4)


def test_bootstrap_intervals_cover_the_true_value() -> None:
    """Seeded simulation: 200 evaluation sets of 123 Bernoulli(0.55) answers; the 95 % interval of the
    accuracy covers 0.55 in about 95 % of them (a percentile bootstrap runs slightly narrow)."""
    rng = np.random.default_rng(7)
    truth, n, trials = 0.55, 123, 200
    covered = 0
    for trial in range(trials):
        answers = (rng.random(n) < truth).astype(float)
        idx = m.bootstrap_indices(n, 500, seed=trial)
        low, high = m.mean_interval(answers, idx, 0.95)
        covered += low <= truth <= high
    assert 0.90 <= covered / trials <= 0.99


def _scores(correct: list[int], seed: int = 0) -> TaskScores:
    import torch

    n = len(correct)
    torch.manual_seed(seed)
    return TaskScores(
        correct=np.array(correct, dtype=float),
        nll=np.full(n, 2.0),
        tokens=np.full(n, 2.0),
        confidence=np.full(n, 0.5),
        first_correct=np.array(correct, dtype=float),
        next_logprobs=torch.log_softmax(torch.randn(n, 11), dim=-1),
        outputs=[""] * n,
    )


def test_flipped_answers_with_equal_accuracy_fail_the_flips_gate() -> None:
    parent = _scores([1] * 10 + [0] * 10)
    candidate = _scores([0] * 2 + [1] * 8 + [1] * 2 + [0] * 8)  # 2 right->wrong, 2 wrong->right
    assert parent.correct.mean() == candidate.correct.mean()
    distance = behavioural_distance(parent, candidate)
    assert distance.flip_pct == pytest.approx(20.0)
    assert (distance.flips_to_wrong, distance.flips_to_right) == (2, 2)
    assert distance.recovery == 1.0
    accuracy_gate = check_gate("accuracy", RelativeGate(max_drop_pct=5), 0.5, 0.5)
    assert all(g.passed for g in accuracy_gate)
    [flips] = check_distance(distance, DistanceSpec(flips={"max_pct": 5}))
    assert not flips.passed and "flips max_pct 5" in flips.message
    # The same candidate against itself: nothing flips, same next token, zero KL.
    same = behavioural_distance(parent, parent)
    assert (same.flip_pct, same.top1_agreement, same.kl_mean) == (0.0, 1.0, 0.0)
    gates = check_distance(
        same, DistanceSpec(flips={"max_pct": 5}, kl={"max": 0.01}, top1_agreement={"min": 1})
    )
    assert all(g.passed for g in gates)


def test_gates_account_for_intervals() -> None:
    """Accuracy 0.53 -> 0.51 on 123 rows: a 5 % drop bound fails on the point estimate alone, but
    the interval of the change reaches well inside the bound, so the noise-tolerant rule passes and
    the conservative rule fails."""
    rng = np.random.default_rng(3)
    base = _scores((rng.random(123) < 0.53).astype(int).tolist())
    cand_correct = base.correct.copy()
    cand_correct[np.flatnonzero(cand_correct == 1)[:3]] = 0  # 3 fewer correct answers
    cand = _scores(cand_correct.astype(int).tolist())
    iv = _intervals("", base, cand, ConfidenceSpec(resamples=500))["accuracy"]
    low, high = iv.change_pct_ci
    assert low < -5 < high <= 0
    gate = RelativeGate(max_drop_pct=5)
    rules = {
        how: check_gate("accuracy", gate, iv.baseline, iv.candidate, iv.change_pct_ci, how)[0]
        for how in ("estimate", "noise_tolerant", "conservative")
    }
    assert rules["estimate"].passed == (-(iv.candidate - iv.baseline) / iv.baseline * 100 <= 5)
    assert rules["noise_tolerant"].passed and not rules["conservative"].passed
    assert "decided on noise_tolerant" in rules["noise_tolerant"].message


def test_chat_rows_render_to_the_token_ids_the_service_serves() -> None:
    """Evaluation's prompt for a chat row and the service's rendering of the same ``messages`` are the
    same token ids, and both equal transformers' own apply_chat_template ids (no doubled BOS)."""
    from transformers import AutoTokenizer

    from lockgate.bentos.chat import ChatMessage, render_chat
    from lockgate.tasks.platform.gguf import packaged_gguf_path

    gguf = packaged_gguf_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    frame = pd.DataFrame(
        {"prompt": ["Name a primary colour.", "What is 6 times 7?"], "answer": ["red", "42"]}
    )
    task = prepare_task(tok, "chat", frame, "contains", "auto", few_shot=1, system="Answer briefly.")
    assert task.chat
    messages = [
        ChatMessage(role="system", content="Answer briefly."),
        ChatMessage(role="user", content="Name a primary colour."),
        ChatMessage(role="assistant", content="red"),
        ChatMessage(role="user", content="What is 6 times 7?"),
    ]
    served = render_chat(tok, messages)  # what POST /generate with these messages renders
    eval_ids = tok(task.prompts)["input_ids"][0]  # evaluation encodes as the runtime does
    assert eval_ids == tok([served], padding=True)["input_ids"][0]
    hf_ids = tok.apply_chat_template([msg.model_dump() for msg in messages], add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert eval_ids == list(hf_ids)
    assert task.prompts[0].endswith("<|im_start|>assistant\n")
