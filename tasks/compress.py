"""Stage 2: compress the parent into candidates, one recipe (list of steps) per candidate.

Steps run in order; each reads the previous step's folder and writes its own, so a failed step
never leaves a half-written candidate behind (the candidate folder appears atomically at the end).
Step kinds live in ``tasks.compression``, one module each.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from lockgate.bentos.runtime import weights_size_bytes
from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import CandidateSpec

log = get_logger(__name__)


@dataclass(frozen=True)
class CompressedModel:
    candidate: str
    folder: Path
    size_bytes: int
    parent_size_bytes: int
    #: Step kinds in order, e.g. ("prune", "recover", "quantize").
    step_kinds: tuple[str, ...]
    #: Metrics of every step, keys prefixed "<index>.<kind>.".
    metrics: dict[str, float] = field(default_factory=dict)
    #: The resolved recipe (every parameter, defaults filled) as JSON: a model-version tag.
    recipe_json: str = "[]"
    #: The MLflow 3 LoggedModel (named after the candidate) its compress run logged; evaluation
    #: metrics link to it and the registered version is made from it.
    model_id: str | None = None

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.parent_size_bytes

    @property
    def quantized(self) -> bool:
        """True when the weights end up as integers (the "never slower than the parent" rule)."""
        return any(kind in ("quantize", "qat") for kind in self.step_kinds)


def run_step(kind: str, current: Path, out: Path, params: object, context: StepContext) -> StepOutcome:
    """Run one step through its module in ``lockgate.tasks.compression`` (imported lazily: torch is heavy).

    Imported by its package name: ``tasks`` alone resolves only when the repository root is on sys.path
    (pytest), not from the installed ``lockgate`` command."""
    module = importlib.import_module(f"lockgate.tasks.compression.{kind}")
    return module.apply(current, out, params, context)


#: Code whose changes must invalidate cached candidates (the steps and the checkpoint format).
_CODE = (Path(__file__), *sorted(Path(__file__).with_name("compression").glob("*.py")))


def candidate_key(parent: Path, candidate: CandidateSpec, context: StepContext) -> str:
    """Content key of a candidate's result: the steps' code, the parent's files, the resolved recipe
    and the data the steps see. Equal keys give equal models (every step is seeded)."""
    from lockgate.bentos import quantized

    digest = hashlib.sha256()
    for source in (*_CODE, Path(quantized.__file__)):
        digest.update(source.read_bytes())
    for path in sorted(p for p in Path(parent).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    recipe = [s.model_dump(mode="json") for s in candidate.steps]
    data = [context.calibration_prompts, context.train_pairs, context.device, context.seed]
    digest.update(json.dumps([recipe, data]).encode())
    return digest.hexdigest()


def cached_candidate(
    parent: Path, candidate: CandidateSpec, target: Path, key: str
) -> CompressedModel | None:
    """The candidate a finished earlier run (or a crashed one) left at ``target``, if its key matches."""
    report_path = target / "model" / "lockgate_compress.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    if report.get("key") != key:
        return None
    return _compressed_model(parent, candidate, target / "model", report)


def _compressed_model(parent: Path, candidate: CandidateSpec, folder: Path, report: dict) -> CompressedModel:
    """The result as the candidate's folder and its ``lockgate_compress.json`` report describe it."""
    return CompressedModel(
        candidate=candidate.name,
        folder=folder,
        size_bytes=weights_size_bytes(folder),
        parent_size_bytes=weights_size_bytes(parent),
        step_kinds=tuple(s.kind for s in candidate.steps),
        metrics={k: float(v) for k, v in report["metrics"].items()},
        recipe_json=json.dumps(report["recipe"]),
    )


def compress_candidate(
    parent: Path,
    candidate: CandidateSpec,
    out_root: Path,
    context: StepContext,
    target: Path | None = None,
    key: str | None = None,
) -> CompressedModel:
    """Run the candidate's steps in order; each step reads the previous step's folder. The result
    lands at ``target`` (default ``out_root / candidate.name``) atomically, tagged with ``key``."""
    target = target or out_root / candidate.name
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    current = parent
    metrics: dict[str, float] = {}
    reports = []
    for index, step in enumerate(candidate.steps):
        step_out = staging / f"step-{index}-{step.kind}"
        log.info("candidate %s: step %d/%d %s", candidate.name, index + 1, len(candidate.steps), step.kind)
        following = candidate.steps[index + 1] if index + 1 < len(candidate.steps) else None
        context = StepContext(
            **{**context.__dict__, "next_quantize": following.quantize if following else None}
        )
        outcome = run_step(step.kind, current, step_out, step.params, context)
        context = StepContext(**{**context.__dict__, "auto_ignore": outcome.auto_ignore})
        metrics.update({f"{index}.{step.kind}.{k}": float(v) for k, v in outcome.metrics.items()})
        reports.append({"step": index, "kind": step.kind, **outcome.report})
        current = outcome.folder
    final = staging / "model"
    os.replace(current, final)
    report = {
        "candidate": candidate.name,
        "recipe": [s.model_dump(mode="json", exclude_none=True) for s in candidate.steps],
        "steps": reports,
        "metrics": metrics,
        "key": key,
    }
    (final / "lockgate_compress.json").write_text(json.dumps(report, indent=2))
    for leftover in staging.glob("step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    result = _compressed_model(parent, candidate, target / "model", report)
    log.info(
        "candidate %s (%s): weights %.2f MB -> %.2f MB (x%.2f)",
        candidate.name,
        " -> ".join(result.step_kinds),
        result.parent_size_bytes / 1e6,
        result.size_bytes / 1e6,
        result.size_ratio,
    )
    return result


@task(name="compress", task_run_name="compress-{candidate.name}")
def compress_task(
    parent: Path,
    candidate: CandidateSpec,
    out_root: Path,
    context: StepContext,
    parent_run_id: str | None,
) -> CompressedModel:
    """One candidate in its own nested MLflow run: resolved recipe, per-step report, size."""
    import mlflow

    with stage_run(parent_run_id, f"compress-{candidate.name}", **{"lockgate.candidate": candidate.name}):
        # Content-addressed: a re-run (e.g. after a crashed worker) reuses a finished candidate.
        key = candidate_key(parent, candidate, context)
        target = out_root / f"{candidate.name}-{key[:16]}"
        cached = cached_candidate(parent, candidate, target, key)
        if cached is None:
            result = compress_candidate(parent, candidate, out_root, context, target, key)
        else:
            log.info("candidate %s: reusing %s (same code, parent, recipe and data)", candidate.name, target)
            result = cached
        mlflow.set_tag("lockgate.cached", "true" if cached is not None else "false")
        mlflow.log_dict({"steps": [s.model_dump(mode="json") for s in candidate.steps]}, "recipe.json")
        mlflow.log_artifact(str(result.folder / "lockgate_compress.json"))
        model_id = _log_candidate_model(result, context)
        mlflow.log_metrics(
            {
                "size_bytes": result.size_bytes,
                "parent_size_bytes": result.parent_size_bytes,
                "size_ratio": result.size_ratio,
                **result.metrics,
            },
            model_id=model_id,
        )
    return replace(result, model_id=model_id)


def _log_candidate_model(result: CompressedModel, context: StepContext) -> str:
    """The candidate as an MLflow 3 LoggedModel named after it, in the active (compress) run, with the
    calibration prompts the steps saw logged as its input dataset (MLflow records the digest)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelInput

    from lockgate.tasks.platform import model_registry as registry

    info = registry.log_pyfunc_model(
        result.folder,
        result.candidate,
        params={
            "recipe": " -> ".join(result.step_kinds),
            "device": context.device,
            "seed": str(context.seed),
        },
        tags={"lockgate.candidate": result.candidate},
    )
    calibration = mlflow.data.from_pandas(
        pd.DataFrame({"prompt": list(context.calibration_prompts)}), name="calibration"
    )
    mlflow.log_input(calibration, context="calibration", model=LoggedModelInput(info.model_id))
    return info.model_id
