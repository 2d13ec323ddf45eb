"""Stage 3: evaluate baseline and candidate on the same data, then apply the spec's gates.

Quality: perplexity, exact-match accuracy, first-answer-token calibration (ECE, M=10 bins as in
the chapter). Speed: per-request latency p50/p95/p99 and tokens/s, timed *interleaved* (baseline,
candidate, baseline, …) so machine noise hits both alike. Size: bytes of weight files.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import task

from bentos.runtime import LoadedModel, load_model, weights_size_bytes
from tasks.calibration import expected_calibration_error
from tasks.log import get_logger
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import EvaluateSpec, RelativeGate

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

    @property
    def message(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{self.metric} {self.rule} {self.threshold:g}: observed {self.observed:.4g} "
            f"(baseline {self.baseline:.4g}, candidate {self.candidate:.4g}) -> {verdict}"
        )


@dataclass(frozen=True)
class Evaluation:
    baseline: ModelMetrics
    candidate: ModelMetrics
    gates: tuple[GateResult, ...]
    table: pd.DataFrame  # per-example predictions of both models

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def exact_match(generated: str, answer: str) -> bool:
    """The first line of the continuation, stripped, equals the answer."""
    return generated.split("\n", 1)[0].strip() == str(answer).strip()


def _teacher_forced(
    lm: LoadedModel, prompts: list[str], answers: list[str]
) -> tuple[float, np.ndarray, np.ndarray]:
    """Perplexity of ``prompt + ' ' + answer`` and first-answer-token (confidence, correct)."""
    import torch

    tok, model = lm.tokenizer, lm.model
    nll_sum, token_count = 0.0, 0
    confidence, correct = [], []
    # One sequence at a time: no padding to mask, and eval sets are small (hundreds of rows).
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tok(f"{prompt} {answer}", add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            full_ids = [*full_ids, tok.eos_token_id]
        ids = torch.tensor([full_ids], device=lm.device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        targets = ids[0, 1:]
        nll_sum += float(-log_probs.gather(1, targets[:, None]).sum())
        token_count += len(targets)
        # First answer token: predicted at the position of the prompt's last token.
        pos = min(len(prompt_ids), len(full_ids) - 1) - 1
        probs = log_probs[pos].exp()
        confidence.append(float(probs.max()))
        correct.append(int(probs.argmax()) == int(targets[pos]))
    return math.exp(nll_sum / max(token_count, 1)), np.array(confidence), np.array(correct, dtype=float)


def _generate_all(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(prompts), _BATCH):
        texts += [g.text for g in lm.generate(prompts[start : start + _BATCH], max_new_tokens=max_new_tokens)]
    return texts


def _quality(lm: LoadedModel, frame: pd.DataFrame, spec: EvaluateSpec) -> tuple[dict, list[str]]:
    prompts, answers = frame["prompt"].astype(str).tolist(), frame["answer"].astype(str).tolist()
    perplexity, confidence, correct = _teacher_forced(lm, prompts, answers)
    outputs = _generate_all(lm, prompts, spec.max_new_tokens)
    accuracy = float(np.mean([exact_match(o, a) for o, a in zip(outputs, answers, strict=True)]))
    return {
        "perplexity": perplexity,
        "accuracy": accuracy,
        "ece": expected_calibration_error(confidence, correct),
    }, outputs


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


def check_gate(metric: str, gate: RelativeGate, baseline: float, candidate: float) -> list[GateResult]:
    """Every bound of one gate, as separate results (a gate may carry several bounds)."""
    change_pct = (
        0.0
        if baseline == candidate
        else ((candidate - baseline) / abs(baseline) * 100 if baseline else math.inf)
    )
    ratio = 1.0 if baseline == candidate else (candidate / baseline if baseline else math.inf)
    # A speed-up is baseline / candidate for times and candidate / baseline for throughput.
    speedup = 1 / ratio if metric in LATENCY_METRICS else ratio
    rules = [
        ("max_increase_pct", gate.max_increase_pct, change_pct, lambda obs, t: obs <= t),
        ("max_drop_pct", gate.max_drop_pct, -change_pct, lambda obs, t: obs <= t),
        ("max_ratio", gate.max_ratio, ratio, lambda obs, t: obs <= t),
        ("min_ratio", gate.min_ratio, ratio, lambda obs, t: obs >= t),
        ("min_speedup", gate.min_speedup, speedup, lambda obs, t: obs >= t),
    ]
    return [
        GateResult(metric, rule, threshold, baseline, candidate, observed, bool(ok(observed, threshold)))
        for rule, threshold, observed, ok in rules
        if threshold is not None
    ]


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
) -> tuple[GateResult, ...]:
    base, cand = baseline.as_dict(), candidate.as_dict()
    results = [
        r for metric, gate in gates.items() for r in check_gate(metric, gate, base[metric], cand[metric])
    ]
    if quantized_must_not_be_slower:
        results.append(not_slower_than_parent(baseline, candidate))
    return tuple(results)


# The baseline's quality on the same rows is the same for every candidate of a release (teacher-forced
# scores and greedy outputs are deterministic): computed once per process, keyed by what it depends on.
_BASELINE_QUALITY: dict[tuple[object, ...], tuple[dict, list[str]]] = {}
_BASELINE_QUALITY_LOCK = threading.Lock()


def _baseline_quality(
    lm: LoadedModel, folder: Path, frame: pd.DataFrame, spec: EvaluateSpec
) -> tuple[dict, list[str]]:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    rows = pd.util.hash_pandas_object(frame[["prompt", "answer"]].astype(str), index=False).sum()
    key = (str(folder.resolve()), tuple(weights), int(rows), len(frame), spec.max_new_tokens)
    with _BASELINE_QUALITY_LOCK:  # candidates may be evaluated from several threads
        if key not in _BASELINE_QUALITY:
            _BASELINE_QUALITY[key] = _quality(lm, frame, spec)
        else:
            log.info("baseline quality of %s reused from an earlier candidate of this release", folder)
        quality, outputs = _BASELINE_QUALITY[key]
    return dict(quality), list(outputs)


def evaluate_pair(
    baseline_dir: Path,
    candidate_dir: Path,
    frame: pd.DataFrame,
    spec: EvaluateSpec,
    quantized_must_not_be_slower: bool = False,
) -> Evaluation:
    """Both models on the same rows; gates compare candidate with baseline."""
    frame = frame.head(spec.max_samples).reset_index(drop=True)
    models = [load_model(baseline_dir), load_model(candidate_dir)]
    quality, outputs = [], []
    for lm, cached in zip(models, (True, False), strict=True):
        q, out = _baseline_quality(lm, baseline_dir, frame, spec) if cached else _quality(lm, frame, spec)
        quality.append(q)
        outputs.append(out)
    latency_prompts = frame["prompt"].astype(str).tolist()[: spec.latency_prompts]
    speed = _interleaved_latency(models, latency_prompts, spec)
    metrics = [
        ModelMetrics(**q, **s, size_bytes=weights_size_bytes(folder))
        for q, s, folder in zip(quality, speed, [baseline_dir, candidate_dir], strict=True)
    ]
    table = pd.DataFrame(
        {
            "prompt": frame["prompt"],
            "answer": frame["answer"],
            "baseline_output": outputs[0],
            "candidate_output": outputs[1],
        }
    )
    table["baseline_correct"] = [
        exact_match(o, a) for o, a in zip(table.baseline_output, table.answer, strict=True)
    ]
    table["candidate_correct"] = [
        exact_match(o, a) for o, a in zip(table.candidate_output, table.answer, strict=True)
    ]
    gates = check_gates(metrics[0], metrics[1], dict(spec.gates), quantized_must_not_be_slower)
    for gate in gates:
        log.info("gate %s", gate.message)
    return Evaluation(metrics[0], metrics[1], gates, table)


@task(name="evaluate", task_run_name="evaluate-{candidate_name}")
def evaluate_task(
    baseline_dir: Path,
    candidate_dir: Path,
    candidate_name: str,
    frame: pd.DataFrame,
    spec: EvaluateSpec,
    parent_run_id: str | None,
    quantized_must_not_be_slower: bool = False,
) -> Evaluation:
    """Evaluate in a nested MLflow run: both models' metrics, every gate verdict, the per-row table."""
    import mlflow

    with stage_run(parent_run_id, f"evaluate-{candidate_name}", **{"lockgate.candidate": candidate_name}):
        evaluation = evaluate_pair(baseline_dir, candidate_dir, frame, spec, quantized_must_not_be_slower)
        mlflow.log_metrics({f"baseline_{k}": v for k, v in evaluation.baseline.as_dict().items()})
        mlflow.log_metrics({f"candidate_{k}": v for k, v in evaluation.candidate.as_dict().items()})
        mlflow.log_metrics({f"gate_{g.metric}_{g.rule}_passed": float(g.passed) for g in evaluation.gates})
        mlflow.log_dict(
            {"gates": [asdict(g) | {"message": g.message} for g in evaluation.gates]}, "gates.json"
        )
        mlflow.log_table(evaluation.table, "evaluation_table.json")
        mlflow.set_tag("lockgate.gates", "passed" if evaluation.passed else "failed")
    return evaluation
