"""Stage 4: register candidates as model versions; stage the best one that passed every gate.

The first ever release also registers the uncompressed parent and puts it into Production, so the
canary always has a stable version to compare against. A candidate that failed a gate is
registered (so its evaluation is reviewable in the MLflow UI), tagged ``rejected``, never staged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from tasks import registry
from tasks.log import run_logger
from tasks.registry import ModelVersionRef
from tasks.selection import Selection, plot_pareto, select_candidate
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import ObjectiveSpec
    from tasks.compress import CompressedModel
    from tasks.evaluate import Evaluation


@dataclass(frozen=True)
class Registration:
    production: ModelVersionRef
    staged: ModelVersionRef | None
    staged_candidate: str | None
    rejected: dict[str, str]  # candidate name -> reason
    versions: dict[str, ModelVersionRef]  # candidate name -> version


def _evaluation_tags(evaluation: Evaluation) -> dict[str, str]:
    tags = {f"lockgate.eval.{k}": f"{v:.6g}" for k, v in evaluation.candidate.as_dict().items()}
    tags.update({f"lockgate.baseline.{k}": f"{v:.6g}" for k, v in evaluation.baseline.as_dict().items()})
    tags["lockgate.gates"] = "passed" if evaluation.passed else "failed"
    return tags


def _log_selection(selection: Selection, baseline: dict[str, float], report_dir: Path) -> None:
    """The candidates table and Pareto PNG, in ``reports/`` and in the register stage's MLflow run."""
    import mlflow

    report_dir.mkdir(parents=True, exist_ok=True)
    table = report_dir / "candidates.md"
    table.write_text(f"# Candidates — objective: {selection.objective}\n\n{selection.markdown()}")
    png = plot_pareto(selection, baseline, report_dir / "candidates-pareto.png")
    mlflow.log_artifact(str(table))
    mlflow.log_artifact(str(png))
    mlflow.log_dict(
        {
            "objective": selection.objective,
            "winner": selection.winner,
            "candidates": [asdict(r) for r in selection.rows],
        },
        "selection.json",
    )


@task(name="register")
def register_task(
    registered_model: str,
    parent_folder: Path,
    compressed: list[CompressedModel],
    evaluations: list[Evaluation],
    objective: ObjectiveSpec,
    report_dir: Path,
    parent_run_id: str | None,
    trigger: str,
) -> Registration:
    logger = run_logger(__name__)
    with stage_run(parent_run_id, "register"):
        production = (
            registry.version_in_stage(registered_model, "Production") if _exists(registered_model) else None
        )
        if production is None:
            production = registry.log_model_version(
                parent_folder, registered_model, {"lockgate.role": "baseline"}
            )
            registry.promote_first_production(
                production, "first release: uncompressed parent as stable", trigger
            )
            logger.info(
                "first release: baseline registered as %s v%s in Production",
                registered_model,
                production.version,
            )
        names = [c.candidate for c in compressed]
        versions: dict[str, ModelVersionRef] = {}
        rejected: dict[str, str] = {}
        for model, evaluation in zip(compressed, evaluations, strict=True):
            tags = {
                "lockgate.role": "candidate",
                registry.TAG_CANDIDATE: model.candidate,
                "lockgate.recipe": " -> ".join(model.step_kinds),
                # MLflow caps a tag value at 5,000 characters; the full recipe is in the compress run.
                "lockgate.recipe_json": model.recipe_json[:5000],
                **_evaluation_tags(evaluation),
            }
            ref = registry.log_model_version(model.folder, registered_model, tags)
            versions[model.candidate] = ref
            if not evaluation.passed:
                reason = "; ".join(g.message for g in evaluation.gates if not g.passed)
                registry.reject_candidate(ref, reason, trigger)
                rejected[model.candidate] = reason
                logger.warning("candidate %s (v%s) rejected: %s", model.candidate, ref.version, reason)
        selection = select_candidate(names, evaluations, objective)
        _log_selection(selection, evaluations[0].baseline.as_dict(), report_dir)
        chosen = selection.winner
        staged = None
        if chosen is not None:
            staged = versions[chosen]
            passing = sum(r.passed for r in selection.rows)
            registry.stage_candidate(
                staged, f"passed every gate; best {selection.objective} among {passing} passing", trigger
            )
            logger.info("candidate %s staged as %s v%s", chosen, registered_model, staged.version)
    return Registration(production, staged, chosen, rejected, versions)


def _exists(name: str) -> bool:
    return name in registry.registered_model_names()
