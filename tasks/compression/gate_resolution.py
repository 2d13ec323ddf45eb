"""Can the evaluation set resolve a gate? Warnings for gates tighter than its sampling noise.

A gate compares the candidate with its parent on the same ``n`` evaluation rows. A bound smaller than
what ``n`` rows can tell apart decides on noise: with 65 right answers a 5 % accuracy drop is 3
questions, and a numerically no-op INT8 model flipped 2. The rules, in one place (README
*Gates and noise*):

* **accuracy** (``max_drop_pct``, or ``min_ratio`` as a drop of ``(1 - r) * 100`` %): the allowed
  drop in questions is ``d/100 * p * n`` at parent accuracy ``p``. It must be at least one question,
  and the allowed absolute drop ``d/100 * p`` at least two binomial standard errors of the parent's
  accuracy, ``2 * sqrt(p (1 - p) / n)``. Before a run ``p`` is unknown: the gate warns when it is
  under one question even at ``p = 1``, or when it needs ``p`` above ``VALIDATE_MAX_ACCURACY`` to
  clear two standard errors (it clears them when ``p >= 4 / (4 + n (d/100)^2)``).
* **perplexity** (``max_increase_pct``, or ``max_ratio`` as ``(r - 1) * 100`` %): both models score
  the same rows, so the noise is that of the mean per-row log-likelihood *difference*. Its typical
  per-row spread is taken as ``TYPICAL_NLL_DIFF_STD`` = 0.25 nat (a heuristic: a mild compression
  moves most rows' answer NLL by a few tenths of a nat), and the gate warns when it is below two
  standard errors of that mean: ``100 * (exp(2 * 0.25 / sqrt(n)) - 1)`` % (3.6 % at 200 rows,
  11.8 % at 20).

Warnings, never errors: a gate may be tight on purpose. Pure Python, no pandas: ``lockgate validate``
uses it and must stay fast.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.flows.spec import PipelineSpec, RelativeGate
    from lockgate.tasks.evaluate import GateResult

#: Standard errors a gate must span to be told apart from sampling noise.
STANDARD_ERRORS = 2.0
#: Typical per-row spread (nats) of the answer log-likelihood difference of a compressed model and
#: its parent on the same rows: the perplexity rule's noise scale (a documented heuristic).
TYPICAL_NLL_DIFF_STD = 0.25
#: Before a run: an accuracy gate that clears two standard errors only if the parent answers more
#: than this share right is flagged (a parent that good is the exception, not the rule).
VALIDATE_MAX_ACCURACY = 0.9

Finding = tuple[tuple[str, ...], str]  # (path inside the pipeline, message)


def accuracy_drop_pct(gate: RelativeGate) -> tuple[str, float] | None:
    """The accuracy gate's allowed relative drop in percent, with the bound that sets it."""
    bounds = []
    if gate.max_drop_pct is not None:
        bounds.append(("max_drop_pct", gate.max_drop_pct))
    if gate.min_ratio is not None:
        bounds.append(("min_ratio", (1 - gate.min_ratio) * 100))
    return min(bounds, key=lambda b: b[1]) if bounds else None


def perplexity_increase_pct(gate: RelativeGate) -> tuple[str, float] | None:
    """The perplexity gate's allowed relative rise in percent, with the bound that sets it."""
    bounds = []
    if gate.max_increase_pct is not None:
        bounds.append(("max_increase_pct", gate.max_increase_pct))
    if gate.max_ratio is not None:
        bounds.append(("max_ratio", (gate.max_ratio - 1) * 100))
    return min(bounds, key=lambda b: b[1]) if bounds else None


def perplexity_noise_pct(rows: int) -> float:
    """Two standard errors of the paired mean log-likelihood over ``rows``, as a perplexity change in %."""
    return 100 * math.expm1(STANDARD_ERRORS * TYPICAL_NLL_DIFF_STD / math.sqrt(rows))


def accuracy_needed(drop_pct: float, rows: int) -> float:
    """The parent accuracy from which a ``drop_pct`` gate spans two binomial standard errors."""
    k = STANDARD_ERRORS**2
    return k / (k + rows * (drop_pct / 100) ** 2)


def accuracy_warning(drop_pct: float, rows: int, parent_accuracy: float | None) -> str | None:
    """Why an accuracy gate of ``drop_pct`` % cannot be resolved on ``rows`` rows, or None."""
    if rows <= 0:
        return None
    if parent_accuracy is None:  # before a run: the best case, p = 1, and the accuracy it needs
        if drop_pct / 100 * rows < 1:
            return (
                f"a {drop_pct:g} % accuracy drop is less than one question of {rows} evaluation rows "
                f"even if the parent answers all of them (one question is {100 / rows:.2g} %)"
            )
        needed = accuracy_needed(drop_pct, rows)
        if needed > VALIDATE_MAX_ACCURACY:
            return (
                f"a {drop_pct:g} % accuracy drop on {rows} evaluation rows is within 2 standard errors "
                f"of a binomial unless the parent answers more than {needed:.0%} right: it would "
                "decide on noise - evaluate more rows or loosen the gate"
            )
        return None
    p = parent_accuracy
    correct = p * rows
    if correct <= 0:
        return None
    allowed = drop_pct / 100 * correct
    if allowed < 1:
        return (
            f"a {drop_pct:g} % drop of the parent's {correct:.0f} right answers is {allowed:.2g} "
            f"questions: one flipped answer ({100 / correct:.2g} %) fails it"
        )
    noise = STANDARD_ERRORS * math.sqrt(p * (1 - p) / rows)
    if drop_pct / 100 * p < noise:
        return (
            f"a {drop_pct:g} % drop ({allowed:.1f} of {correct:.0f} right answers) is below 2 standard "
            f"errors of the parent's accuracy {p:.3f} on {rows} rows ({noise / p * 100:.1f} % "
            "relative): it decides on noise"
        )
    return None


def perplexity_warning(increase_pct: float, rows: int) -> str | None:
    """Why a perplexity gate of ``increase_pct`` % cannot be resolved on ``rows`` rows, or None."""
    if rows <= 0:
        return None
    noise = perplexity_noise_pct(rows)
    if increase_pct < noise:
        return (
            f"a {increase_pct:g} % perplexity rise is below its typical noise on {rows} evaluation "
            f"rows ({noise:.1f} %: 2 standard errors of a {TYPICAL_NLL_DIFF_STD} nat per-row "
            "log-likelihood spread)"
        )
    return None


# ------------------------------------------------------------------------------- after a run
def result_warnings(results: tuple[GateResult, ...], rows: int) -> list[str]:
    """Gates of one evaluation its ``rows`` rows could not resolve, at the parent's measured accuracy."""
    warnings = []
    for result in results:
        message = None
        if result.metric == "accuracy" and result.rule in ("max_drop_pct", "min_ratio"):
            drop = result.threshold if result.rule == "max_drop_pct" else (1 - result.threshold) * 100
            message = accuracy_warning(drop, rows, result.baseline)
        elif result.metric == "perplexity" and result.rule in ("max_increase_pct", "max_ratio"):
            rise = result.threshold if result.rule == "max_increase_pct" else (result.threshold - 1) * 100
            message = perplexity_warning(rise, rows)
        if message:
            warnings.append(f"{result.metric}.{result.rule} {result.threshold:g}: {message}")
    return warnings


# ------------------------------------------------------------------------------ before a run
def count_rows(path: Path) -> int | None:
    """Rows of a local dataset file (JSON lines, CSV with a header, Parquet); None when unreadable."""
    suffix = path.suffix.lower()
    try:
        if suffix in {".jsonl", ".ndjson"}:
            with path.open(encoding="utf-8") as handle:
                return sum(1 for line in handle if line.strip())
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError):
        return None  # the data stage reports unreadable files with their cause
    except Exception as exc:  # pyarrow's own errors: same, reported by the data stage
        if type(exc).__module__.startswith("pyarrow"):
            return None
        raise
    return None


def eval_rows(spec: PipelineSpec, base_dir: Path) -> int | None:
    """Evaluation rows a release of ``spec`` will use, when the set is known before the run."""
    source = spec.data.eval.source
    if source == "demo":
        from lockgate.tasks.demo.corpus import DEFAULT_ROWS

        available: int | None = DEFAULT_ROWS["eval"]
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base_dir / path
        available = count_rows(path) if path.is_file() else None
    if available is None:
        return None
    limits = [available, spec.evaluate.max_samples]
    if spec.data.eval.max_samples is not None:
        limits.append(spec.data.eval.max_samples)
    return min(limits)


def gate_findings(spec: PipelineSpec, base_dir: Path) -> list[Finding]:
    """Gates of ``spec`` its evaluation set cannot resolve, each at the bound that sets it."""
    gates = spec.evaluate.gates
    if not ({"accuracy", "perplexity"} & set(gates)):
        return []
    rows = eval_rows(spec, base_dir)
    if rows is None:
        return []
    findings: list[Finding] = []
    accuracy = accuracy_drop_pct(gates["accuracy"]) if "accuracy" in gates else None
    if accuracy is not None:
        message = accuracy_warning(accuracy[1], rows, None)
        if message:
            findings.append((("evaluate", "gates", "accuracy", accuracy[0]), message))
    perplexity = perplexity_increase_pct(gates["perplexity"]) if "perplexity" in gates else None
    if perplexity is not None:
        message = perplexity_warning(perplexity[1], rows)
        if message:
            findings.append((("evaluate", "gates", "perplexity", perplexity[0]), message))
    return findings
