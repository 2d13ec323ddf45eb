"""Stage 3: evaluate baseline and candidate on the same data, then apply the spec's gates.

Quality, per named task (evaluate.tasks) and pooled: the task metric (exact match, contains, regex,
numeric, multiple choice by log-likelihood), perplexity of the *answer tokens given the prompt* (a
shared few-shot prefix is never scored), first-answer-token calibration (ECE, M=10 bins as in the
chapter); each with a paired bootstrap interval. Distance from the parent: answers flipping between
correct and wrong, top-1 next-token agreement, KL(parent || candidate), recovery.

Speed: per-request latency p50/p95/p99 and tokens/s, timed *interleaved* (baseline, candidate,
baseline, …) so machine noise hits both alike. Size: bytes of weight files.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import task

from lockgate.bentos.chat import render_prompt, uses_chat
from lockgate.bentos.runtime import LoadedModel, load_model, weights_size_bytes
from lockgate.tasks import eval_metrics as metrics
from lockgate.tasks.monitoring.calibration import expected_calibration_error
from lockgate.tasks.platform.errors import DataValidationError
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import ConfidenceSpec, DistanceSpec, EvaluateSpec, RelativeGate

log = get_logger(__name__)
_BATCH = 16
LATENCY_METRICS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


@dataclass(frozen=True)
class ModelMetrics:
    perplexity: float
    accuracy: float
    ece: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    tokens_per_s: float
    size_bytes: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class GateResult:
    metric: str
    rule: str
    threshold: float
    baseline: float
    candidate: float
    observed: float
    passed: bool
    #: Bootstrap interval of ``observed`` (quality gates), and which end decided: see check_gate.
    interval: tuple[float, float] | None = None
    decided_on: str = "estimate"

    @property
    def message(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        ci = (
            f" [{self.interval[0]:.4g}, {self.interval[1]:.4g}] decided on {self.decided_on}"
            if self.interval
            else ""
        )
        return (
            f"{self.metric} {self.rule} {self.threshold:g}: observed {self.observed:.4g}{ci} "
            f"(baseline {self.baseline:.4g}, candidate {self.candidate:.4g}) -> {verdict}"
        )


@dataclass(frozen=True)
class Evaluation:
    baseline: ModelMetrics
    candidate: ModelMetrics
    gates: tuple[GateResult, ...]
    table: pd.DataFrame  # per-example predictions of both models
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    distance: Distance | None = None
    intervals: dict[str, MetricInterval] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def exact_match(generated: str, answer: str) -> bool:
    """The first line of the continuation, stripped, equals the answer (the data.eval task's rule)."""
    return generated.split("\n", 1)[0].strip() == str(answer).strip()


@dataclass(frozen=True)
class PreparedTask:
    """One task's rows as the model sees them: prompts already rendered (chat template or not)."""

    name: str
    metric: str
    prompts: list[str]
    answers: list[str]
    choices: list[list[str]] | None = None
    pattern: str | None = None
    tolerance: float = 0.0
    max_new_tokens: int = 8
    gate: RelativeGate | None = None
    chat: bool = False


def _choices(value: object) -> list[str]:
    if isinstance(value, str):
        return [c.strip() for c in value.split("|")]
    return [str(c) for c in value]  # a JSON list


def prepare_task(
    tokenizer: object,
    name: str,
    frame: pd.DataFrame,
    metric: str = "exact_match",
    prompt_format: str = "auto",
    few_shot: int = 0,
    system: str | None = None,
    max_samples: int | None = None,
    max_new_tokens: int = 8,
    pattern: str | None = None,
    tolerance: float = 0.0,
    gate: RelativeGate | None = None,
) -> PreparedTask:
    """Render ``frame``'s rows for the model: the first ``few_shot`` rows become the examples before
    every question (and are not scored), with the same rendering the service applies to chat."""
    missing = [c for c in ("prompt", "answer") if c not in frame.columns]
    if metric == "multiple_choice" and "choices" not in frame.columns:
        missing.append("choices")
    if missing:
        raise DataValidationError(f"evaluate.tasks.{name}", [f"missing columns {missing}"])
    if len(frame) <= few_shot:
        raise DataValidationError(
            f"evaluate.tasks.{name}", [f"{len(frame)} rows leave nothing to score after few_shot: {few_shot}"]
        )
    shots = tuple(
        zip(frame["prompt"].astype(str)[:few_shot], frame["answer"].astype(str)[:few_shot], strict=True)
    )
    rows = frame.iloc[few_shot:]
    if max_samples is not None:
        rows = rows.head(max_samples)
    chat = uses_chat(tokenizer, prompt_format)
    prompts = [render_prompt(tokenizer, p, prompt_format, shots, system) for p in rows["prompt"].astype(str)]
    choices = [_choices(c) for c in rows["choices"]] if metric == "multiple_choice" else None
    answers = rows["answer"].astype(str).tolist()
    if choices is not None:
        bad = [i for i, (a, c) in enumerate(zip(answers, choices, strict=True)) if a not in c]
        if bad:
            raise DataValidationError(
                f"evaluate.tasks.{name}", [f"rows {bad[:5]}: the answer is not one of the choices"]
            )
    return PreparedTask(
        name, metric, prompts, answers, choices, pattern, tolerance, max_new_tokens, gate, chat
    )


def score_output(task: PreparedTask, output: str, answer: str) -> bool:
    """Whether one generated ``output`` answers correctly under the task's metric."""
    if task.metric == "exact_match":
        return metrics.exact_match_normalised(output, answer)
    if task.metric == "contains":
        return metrics.contains(output, answer)
    if task.metric == "regex":
        return metrics.regex_match(output, answer, task.pattern or "")
    if task.metric == "numeric":
        return metrics.numeric_match(output, answer, task.tolerance)
    if task.metric == "exact":  # data.eval without tasks: the unnormalised rule lockgate always used
        return exact_match(output, answer)
    raise ValueError(f"metric {task.metric!r} is not scored from generated text")


@dataclass
class TaskScores:
    """Per-row scores of one model on one task."""

    correct: np.ndarray  # 0/1
    nll: np.ndarray  # answer tokens' negative log-likelihood, summed per row
    tokens: np.ndarray  # answer tokens per row (end-of-turn included)
    confidence: np.ndarray  # P(first answer token)
    first_correct: np.ndarray  # the first answer token is the most likely one
    next_logprobs: object  # torch tensor [rows, vocab]: next-token log-probs at the prompt's end
    outputs: list[str]


def _continuation_ids(tokenizer: object, chat: bool, text: str, end_of_turn: bool = True) -> list[int]:
    # Chat: the answer is the assistant's turn, right after its header; completion: after a space.
    ids = tokenizer(text if chat else f" {text}", add_special_tokens=False)["input_ids"]
    if end_of_turn and tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def _loglik(lm: LoadedModel, prompt_ids: list[int], cont_ids: list[int]) -> tuple[object, object]:
    """Log-probs of each continuation token given the prompt, and the full next-token log-probs at
    the prompt's end (one forward pass; prompt and continuation tokenized apart, as lm-eval does)."""
    import torch

    ids = torch.tensor([[*prompt_ids, *cont_ids]], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids).logits[0].float()
    start = len(prompt_ids) - 1
    log_probs = torch.log_softmax(logits[start : start + len(cont_ids)], dim=-1)
    target = torch.tensor(cont_ids, device=log_probs.device)[:, None]
    return log_probs.gather(1, target)[:, 0].cpu(), log_probs[0].cpu()


def score_task(lm: LoadedModel, task: PreparedTask) -> TaskScores:
    """Teacher-forced answer scores (perplexity counts answer tokens only, never the prompt), then
    generation (or, for multiple choice, the most likely choice)."""
    import torch

    tok = lm.tokenizer
    n = len(task.prompts)
    nll, tokens, confidence, first_correct = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    next_rows, picked = [], []
    for i, (prompt, answer) in enumerate(zip(task.prompts, task.answers, strict=True)):
        prompt_ids = tok(prompt)["input_ids"]  # as the runtime encodes a served prompt
        cont = _continuation_ids(tok, task.chat, answer)
        token_lp, next_lp = _loglik(lm, prompt_ids, cont)
        nll[i], tokens[i] = float(-token_lp.sum()), len(cont)
        probs = next_lp.exp()
        confidence[i] = float(probs.max())
        first_correct[i] = float(int(probs.argmax()) == cont[0])
        next_rows.append(next_lp)
        if task.choices is not None:
            # lm-evaluation-harness's acc: the choice whose tokens (end-of-turn excluded) are most likely.
            scores = [
                float(
                    _loglik(lm, prompt_ids, _continuation_ids(tok, task.chat, c, end_of_turn=False))[0].sum()
                )
                for c in task.choices[i]
            ]
            picked.append(task.choices[i][int(np.argmax(scores))])
    if task.choices is not None:
        outputs = picked
        correct = np.array([o == a for o, a in zip(outputs, task.answers, strict=True)], dtype=float)
    else:
        outputs = _generate_all(lm, task.prompts, task.max_new_tokens)
        correct = np.array(
            [score_output(task, o, a) for o, a in zip(outputs, task.answers, strict=True)], dtype=float
        )
    return TaskScores(correct, nll, tokens, confidence, first_correct, torch.stack(next_rows), outputs)


def _generate_all(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(prompts), _BATCH):
        texts += [g.text for g in lm.generate(prompts[start : start + _BATCH], max_new_tokens=max_new_tokens)]
    return texts


def _quality(lm: LoadedModel, tasks: list[PreparedTask]) -> dict[str, TaskScores]:
    return {task.name: score_task(lm, task) for task in tasks}


def pooled(scores: dict[str, TaskScores]) -> TaskScores:
    """Every task's rows as one set (the summary's accuracy and perplexity)."""
    import torch

    parts = list(scores.values())
    return TaskScores(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("correct", "nll", "tokens", "confidence", "first_correct")
        ),
        next_logprobs=torch.cat([p.next_logprobs for p in parts]),
        outputs=[o for p in parts for o in p.outputs],
    )


def quality_metrics(scores: TaskScores) -> dict[str, float]:
    return {
        "perplexity": math.exp(scores.nll.sum() / max(scores.tokens.sum(), 1)),
        "accuracy": float(scores.correct.mean()),
        "ece": expected_calibration_error(scores.confidence, scores.first_correct),
    }


def _interleaved_latency(
    models: list[LoadedModel], prompts: list[str], spec: EvaluateSpec
) -> list[dict[str, float]]:
    """Batch-1 latency of each model, alternating models per prompt so noise is shared."""
    for lm in models:
        for prompt in prompts[: spec.warmup]:
            lm.generate([prompt], max_new_tokens=spec.max_new_tokens)
    latencies: list[list[float]] = [[] for _ in models]
    tokens = [0 for _ in models]
    for prompt in prompts:
        for i, lm in enumerate(models):
            started = time.perf_counter()
            out = lm.generate([prompt], max_new_tokens=spec.max_new_tokens)[0]
            latencies[i].append(time.perf_counter() - started)
            tokens[i] += out.output_tokens
    stats = []
    for lat, count in zip(latencies, tokens, strict=True):
        ms = np.array(lat) * 1000
        stats.append(
            {
                "latency_p50_ms": float(np.percentile(ms, 50)),
                "latency_p95_ms": float(np.percentile(ms, 95)),
                "latency_p99_ms": float(np.percentile(ms, 99)),
                "tokens_per_s": count / max(sum(lat), 1e-9),
            }
        )
    return stats


def _decision_value(rule: str, observed: float, interval: tuple[float, float] | None, how: str) -> float:
    """The value a bound is checked against: the estimate, or the interval's end the rule names.

    noise_tolerant takes the end most favourable to the candidate (fail only when the whole interval
    is out of bounds), conservative the least favourable (pass only when all of it is in bounds)."""
    if interval is None or how == "estimate" or any(math.isnan(v) for v in interval):
        return observed
    upper_bounded = rule.startswith("max_")
    favourable = min(interval) if upper_bounded else max(interval)
    unfavourable = max(interval) if upper_bounded else min(interval)
    return favourable if how == "noise_tolerant" else unfavourable


def check_gate(
    metric: str,
    gate: RelativeGate,
    baseline: float,
    candidate: float,
    change_pct_interval: tuple[float, float] | None = None,
    how: str = "estimate",
) -> list[GateResult]:
    """Every bound of one gate, as separate results (a gate may carry several bounds).

    With ``change_pct_interval`` (bootstrap interval of the percent change, quality metrics) the
    bounds on change and ratio are decided by ``how`` (evaluate.confidence.gate_rule)."""
    change_pct = (
        0.0
        if baseline == candidate
        else ((candidate - baseline) / abs(baseline) * 100 if baseline else math.inf)
    )
    ratio = 1.0 if baseline == candidate else (candidate / baseline if baseline else math.inf)
    # A speed-up is baseline / candidate for times and candidate / baseline for throughput.
    speedup = 1 / ratio if metric in LATENCY_METRICS else ratio
    ci = change_pct_interval
    intervals = {
        "max_increase_pct": ci,
        "max_drop_pct": (-ci[1], -ci[0]) if ci else None,
        "max_ratio": (1 + ci[0] / 100, 1 + ci[1] / 100) if ci else None,
        "min_ratio": (1 + ci[0] / 100, 1 + ci[1] / 100) if ci else None,
        "min_speedup": None,
    }
    rules = [
        ("max_increase_pct", gate.max_increase_pct, change_pct, lambda obs, t: obs <= t),
        ("max_drop_pct", gate.max_drop_pct, -change_pct, lambda obs, t: obs <= t),
        ("max_ratio", gate.max_ratio, ratio, lambda obs, t: obs <= t),
        ("min_ratio", gate.min_ratio, ratio, lambda obs, t: obs >= t),
        ("min_speedup", gate.min_speedup, speedup, lambda obs, t: obs >= t),
    ]
    results = []
    for rule, threshold, observed, ok in rules:
        if threshold is None:
            continue
        interval = intervals[rule]
        decided = _decision_value(rule, observed, interval, how)
        passed = bool(ok(decided, threshold))
        results.append(
            GateResult(
                metric,
                rule,
                threshold,
                baseline,
                candidate,
                observed,
                passed,
                interval,
                how if interval else "estimate",
            )
        )
    return results


def not_slower_than_parent(baseline: ModelMetrics, candidate: ModelMetrics) -> GateResult:
    """The issue's rule: no quantized model ships if it is slower than its parent on this device.

    Judged on median latency: p95 of a few dozen requests swings with one scheduler hiccup, the
    median measures the kernels."""
    ratio = candidate.latency_p50_ms / baseline.latency_p50_ms if baseline.latency_p50_ms else math.inf
    return GateResult(
        "latency_p50_ms",
        "quantized_not_slower",
        1.0,
        baseline.latency_p50_ms,
        candidate.latency_p50_ms,
        ratio,
        ratio <= 1.0,
    )


def check_gates(
    baseline: ModelMetrics,
    candidate: ModelMetrics,
    gates: dict[str, RelativeGate],
    quantized_must_not_be_slower: bool = False,
    change_intervals: dict[str, tuple[float, float]] | None = None,
    how: str = "estimate",
) -> tuple[GateResult, ...]:
    base, cand = baseline.as_dict(), candidate.as_dict()
    intervals = change_intervals or {}
    results = [
        r
        for metric, gate in gates.items()
        for r in check_gate(metric, gate, base[metric], cand[metric], intervals.get(metric), how)
    ]
    if quantized_must_not_be_slower:
        results.append(not_slower_than_parent(baseline, candidate))
    return tuple(results)


# ------------------------------------------------------------------------------ distance to parent
@dataclass(frozen=True)
class Distance:
    """How differently the candidate behaves from its parent on the same rows."""

    flip_pct: float  # rows whose verdict flipped correct <-> wrong, percent
    flips_to_wrong: int
    flips_to_right: int
    top1_agreement: float  # share of prompts whose most likely next token is the parent's
    kl_mean: float  # mean KL(parent || candidate) of the next-token distribution at the prompt's end
    recovery: float  # candidate accuracy / parent accuracy

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def behavioural_distance(parent: TaskScores, candidate: TaskScores) -> Distance:
    import torch

    flipped = parent.correct != candidate.correct
    p_lp, c_lp = parent.next_logprobs.float(), candidate.next_logprobs.float()
    kl = (p_lp.exp() * (p_lp - c_lp)).sum(dim=-1)
    agreement = (p_lp.argmax(dim=-1) == c_lp.argmax(dim=-1)).float().mean()
    base_acc, cand_acc = float(parent.correct.mean()), float(candidate.correct.mean())
    return Distance(
        flip_pct=float(flipped.mean() * 100),
        flips_to_wrong=int((flipped & (parent.correct == 1)).sum()),
        flips_to_right=int((flipped & (parent.correct == 0)).sum()),
        top1_agreement=float(agreement),
        kl_mean=float(torch.clamp(kl, min=0).mean()),
        recovery=cand_acc / base_acc if base_acc else (1.0 if cand_acc == 0 else math.inf),
    )


def check_distance(distance: Distance, spec: DistanceSpec) -> list[GateResult]:
    """The evaluate.distance gates (absolute bounds: the parent's own distance is 0)."""
    checks = [
        ("flips", "max_pct", spec.flips and spec.flips.max_pct, distance.flip_pct, True),
        ("kl", "max", spec.kl and spec.kl.max, distance.kl_mean, True),
        (
            "top1_agreement",
            "min",
            spec.top1_agreement and spec.top1_agreement.min,
            distance.top1_agreement,
            False,
        ),
        ("recovery", "min", spec.recovery and spec.recovery.min, distance.recovery, False),
    ]
    return [
        GateResult(metric, rule, float(t), 0.0, observed, observed, observed <= t if upper else observed >= t)
        for metric, rule, t, observed, upper in checks
        if t is not None
    ]


# ------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class MetricInterval:
    """A quality metric of both models with bootstrap intervals (paired resampling of rows)."""

    metric: str
    baseline: float
    candidate: float
    baseline_ci: tuple[float, float]
    candidate_ci: tuple[float, float]
    change_pct_ci: tuple[float, float]


def _intervals(
    name: str, base: TaskScores, cand: TaskScores, conf: ConfidenceSpec
) -> dict[str, MetricInterval]:
    """Accuracy, perplexity and ECE of ``base`` and ``cand`` with intervals, keyed by metric name."""
    from lockgate.tasks.monitoring.calibration import expected_calibration_error as ece

    idx = metrics.bootstrap_indices(len(base.correct), conf.resamples, conf.seed)
    out = {}
    stats = {
        "accuracy": lambda s, i: s.correct[i].mean(axis=1),
        "perplexity": lambda s, i: np.exp(s.nll[i].sum(axis=1) / np.maximum(s.tokens[i].sum(axis=1), 1)),
        "ece": lambda s, i: np.array([ece(s.confidence[row], s.first_correct[row]) for row in i]),
    }
    for metric, stat in stats.items():
        b, c = stat(base, idx), stat(cand, idx)
        point_b, point_c = quality_metrics(base)[metric], quality_metrics(cand)[metric]
        out[metric] = MetricInterval(
            f"{name}.{metric}" if name else metric,
            point_b,
            point_c,
            metrics.percentile_interval(b, conf.level),
            metrics.percentile_interval(c, conf.level),
            metrics.percentile_interval(metrics.change_pct_samples(b, c), conf.level),
        )
    return out


@dataclass(frozen=True)
class TaskResult:
    """One evaluation task's scores for both models (score = the task metric's mean, 0-1)."""

    name: str
    metric: str
    rows: int
    score: MetricInterval
    gates: tuple[GateResult, ...]


# The baseline's quality on the same rows is the same for every candidate of a release (teacher-forced
# scores and greedy outputs are deterministic): computed once, keyed by what it depends on. Bounded, least
# recently used dropped first: a long-lived process (a served Prefect deployment, the team stack's worker)
# runs release after release, and each entry holds a whole eval set's outputs.
_BASELINE_QUALITY_MAX = 4
_BASELINE_QUALITY: OrderedDict[tuple[object, ...], dict[str, TaskScores]] = OrderedDict()
_BASELINE_QUALITY_LOCK = threading.Lock()


def _baseline_quality(lm: LoadedModel, folder: Path, tasks: list[PreparedTask]) -> dict[str, TaskScores]:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    rows = hash(
        tuple((t.name, t.metric, tuple(t.prompts), tuple(t.answers), t.max_new_tokens) for t in tasks)
    )
    key = (str(folder.resolve()), tuple(weights), rows, sum(len(t.prompts) for t in tasks))
    with _BASELINE_QUALITY_LOCK:  # candidates may be evaluated from several threads
        if key not in _BASELINE_QUALITY:
            _BASELINE_QUALITY[key] = _quality(lm, tasks)
            while len(_BASELINE_QUALITY) > _BASELINE_QUALITY_MAX:
                _BASELINE_QUALITY.popitem(last=False)
        else:
            _BASELINE_QUALITY.move_to_end(key)
            log.info("baseline quality of %s reused from an earlier candidate of this release", folder)
        return dict(_BASELINE_QUALITY[key])


def prepare_tasks(
    tokenizer: object,
    frame: pd.DataFrame,
    spec: EvaluateSpec,
    task_frames: dict[str, pd.DataFrame] | None = None,
    eval_format: str = "auto",
) -> list[PreparedTask]:
    """The spec's evaluate.tasks, or, without any, the data.eval rows as task 'eval' (exact match)."""
    if not spec.tasks:
        return [
            prepare_task(
                tokenizer,
                "eval",
                frame,
                "exact",
                eval_format,
                max_samples=spec.max_samples,
                max_new_tokens=spec.max_new_tokens,
            )
        ]
    frames = task_frames or {}
    missing = [t.name for t in spec.tasks if t.name not in frames]
    if missing:
        raise DataValidationError("evaluate.tasks", [f"no rows loaded for tasks {missing}"])
    return [
        prepare_task(
            tokenizer,
            t.name,
            frames[t.name],
            t.metric,
            t.format,
            t.few_shot,
            t.system,
            t.max_samples or spec.max_samples,
            t.max_new_tokens or spec.max_new_tokens,
            t.pattern,
            t.tolerance,
            t.gate,
        )
        for t in spec.tasks
    ]


def evaluate_pair(
    baseline_dir: Path,
    candidate_dir: Path,
    frame: pd.DataFrame,
    spec: EvaluateSpec,
    quantized_must_not_be_slower: bool = False,
    task_frames: dict[str, pd.DataFrame] | None = None,
    eval_format: str = "auto",
) -> Evaluation:
    """Both models on the same rows; gates compare candidate with baseline."""
    models = [load_model(baseline_dir), load_model(candidate_dir)]
    tasks = prepare_tasks(models[0].tokenizer, frame, spec, task_frames, eval_format)
    base_scores = _baseline_quality(models[0], baseline_dir, tasks)
    cand_scores = _quality(models[1], tasks)
    base_all, cand_all = pooled(base_scores), pooled(cand_scores)
    latency_prompts = [p for t in tasks for p in t.prompts][: spec.latency_prompts]
    speed = _interleaved_latency(models, latency_prompts, spec)
    metrics_ = [
        ModelMetrics(**quality_metrics(q), **s, size_bytes=weights_size_bytes(folder))
        for q, s, folder in zip((base_all, cand_all), speed, [baseline_dir, candidate_dir], strict=True)
    ]
    conf = spec.confidence
    intervals = _intervals("", base_all, cand_all, conf)
    task_results = {}
    for prepared in tasks:
        name = prepared.name
        score = _intervals(name, base_scores[name], cand_scores[name], conf)["accuracy"]
        gates = (
            tuple(
                check_gate(
                    f"task.{prepared.name}",
                    prepared.gate,
                    score.baseline,
                    score.candidate,
                    score.change_pct_ci,
                    conf.gate_rule,
                )
            )
            if prepared.gate
            else ()
        )
        rows = len(prepared.prompts)
        task_results[prepared.name] = TaskResult(prepared.name, prepared.metric, rows, score, gates)
    distance = behavioural_distance(base_all, cand_all)
    table = pd.DataFrame(
        {
            "task": [t.name for t in tasks for _ in t.prompts],
            "prompt": [p for t in tasks for p in t.prompts],
            "answer": [a for t in tasks for a in t.answers],
            "baseline_output": base_all.outputs,
            "candidate_output": cand_all.outputs,
            "baseline_correct": base_all.correct.astype(bool),
            "candidate_correct": cand_all.correct.astype(bool),
        }
    )
    gates = [
        *check_gates(
            metrics_[0],
            metrics_[1],
            dict(spec.gates),
            quantized_must_not_be_slower,
            {m: iv.change_pct_ci for m, iv in intervals.items()},
            conf.gate_rule,
        ),
        *(g for r in task_results.values() for g in r.gates),
        *check_distance(distance, spec.distance),
    ]
    for gate in gates:
        log.info("gate %s", gate.message)
    return Evaluation(metrics_[0], metrics_[1], tuple(gates), table, task_results, distance, intervals)


@task(name="evaluate", task_run_name="evaluate-{candidate_name}")
def evaluate_task(
    baseline_dir: Path,
    candidate_dir: Path,
    candidate_name: str,
    frame: pd.DataFrame,
    spec: EvaluateSpec,
    parent_run_id: str | None,
    quantized_must_not_be_slower: bool = False,
    task_frames: dict[str, pd.DataFrame] | None = None,
    eval_format: str = "auto",
    model_id: str | None = None,
) -> Evaluation:
    """Evaluate in a nested MLflow run: both models' metrics with intervals, per-task scores, distance
    from the parent, every gate verdict, the per-row table. With ``model_id`` (the candidate's
    LoggedModel) the candidate's metrics and the eval dataset are linked to that model too, so MLflow's
    Models tab compares candidates."""
    import mlflow

    with stage_run(parent_run_id, f"evaluate-{candidate_name}", **{"lockgate.candidate": candidate_name}):
        evaluation = evaluate_pair(
            baseline_dir, candidate_dir, frame, spec, quantized_must_not_be_slower, task_frames, eval_format
        )
        mlflow.log_metrics({f"baseline_{k}": v for k, v in evaluation.baseline.as_dict().items()})
        mlflow.log_metrics({f"candidate_{k}": v for k, v in evaluation.candidate.as_dict().items()})
        mlflow.log_metrics(
            {f"distance_{k}": v for k, v in evaluation.distance.as_dict().items()}
            if evaluation.distance
            else {}
        )
        mlflow.log_metrics(_interval_metrics(evaluation))
        mlflow.log_metrics({f"gate_{g.metric}_{g.rule}_passed": float(g.passed) for g in evaluation.gates})
        mlflow.log_dict(
            {"gates": [asdict(g) | {"message": g.message} for g in evaluation.gates]}, "gates.json"
        )
        mlflow.log_dict(
            {
                "perplexity": "answer tokens (and end of turn) given the prompt; prompt tokens not counted",
                "intervals": {k: asdict(v) for k, v in evaluation.intervals.items()},
                "tasks": {k: asdict(v) for k, v in evaluation.tasks.items()},
            },
            "quality.json",
        )
        mlflow.log_table(evaluation.table, "evaluation_table.json")
        mlflow.set_tag("lockgate.gates", "passed" if evaluation.passed else "failed")
        if model_id is not None:
            _link_to_model(model_id, frame, evaluation)
    return evaluation


def _interval_metrics(evaluation: Evaluation) -> dict[str, float]:
    out: dict[str, float] = {}
    items = [(k, v) for k, v in evaluation.intervals.items()]
    items += [(f"task_{name}", r.score) for name, r in evaluation.tasks.items()]
    for key, iv in items:
        if key.startswith("task_"):
            out[f"{key}_baseline"], out[f"{key}_candidate"] = iv.baseline, iv.candidate
        for who, (low, high) in (
            ("baseline", iv.baseline_ci),
            ("candidate", iv.candidate_ci),
            ("change_pct", iv.change_pct_ci),
        ):
            out[f"{key}_{who}_ci_low"], out[f"{key}_{who}_ci_high"] = low, high
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _link_to_model(model_id: str, frame: pd.DataFrame, evaluation: Evaluation) -> None:
    """The eval dataset as the LoggedModel's input (with MLflow's digest) and the candidate's metrics
    on the model, measured on that dataset."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    dataset = mlflow.data.from_pandas(frame, name="eval")
    mlflow.log_input(dataset, context="eval", model=LoggedModelInput(model_id))
    metrics = {**evaluation.candidate.as_dict(), "gates_passed": float(evaluation.passed)}
    mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
