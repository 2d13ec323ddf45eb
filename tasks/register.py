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

from lockgate.tasks.compression.selection import Selection, plot_pareto, select_candidate
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.log import run_logger
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import ObjectiveSpec
    from lockgate.tasks.compress import CompressedModel
    from lockgate.tasks.evaluate import Evaluation


@dataclass(frozen=True)
class Registration:
    production: ModelVersionRef
    staged: ModelVersionRef | None
    staged_candidate: str | None
    rejected: dict[str, str]  # candidate name -> reason
    versions: dict[str, ModelVersionRef]  # candidate name -> version
    selection: Selection | None = None  # every candidate's row and why it lost


def _version_tags(model: CompressedModel, evaluation: Evaluation) -> dict[str, str]:
    """Few tags (the registry UI lists them all): which candidate, its recipe, the gates' verdict.
    Metrics live on the LoggedModel and the evaluate run; the description tells the rest."""
    return {
        registry.TAG_CANDIDATE: model.candidate,
        "lockgate.recipe": " -> ".join(model.step_kinds),
        "lockgate.gates": "passed" if evaluation.passed else "failed",
    }


def version_description(model: CompressedModel, evaluation: Evaluation, pipeline_run_id: str | None) -> str:
    """A candidate version's description: recipe, metrics against the parent, every gate's verdict and
    where the full record is; decisions are appended to it as they happen."""
    base, cand = evaluation.baseline.as_dict(), evaluation.candidate.as_dict()
    lines = [
        f"**Candidate `{model.candidate}`**: {' -> '.join(model.step_kinds)} "
        f"({model.size_bytes / 1e6:.2f} MB, x{model.size_ratio:.2f} of the parent).",
        "",
        f"Logged model `{model.model_id}` (its compress run holds the recipe and step reports); "
        f"release run `{pipeline_run_id}`.",
        "",
        "| metric | parent | candidate |",
        "|---|---|---|",
        *(f"| {k} | {base[k]:.4g} | {cand[k]:.4g} |" for k in cand),
        "",
        f"**Gates: {'passed' if evaluation.passed else 'FAILED'}**",
        *(f"- {g.message}" for g in evaluation.gates),
    ]
    return "\n".join(lines)


def model_description(registered_model: str, pipeline: str) -> str:
    return (
        f"Released by lockgate from pipeline `{pipeline}`: compress -> evaluate -> register -> canary -> "
        "monitor. Version 1 is the uncompressed parent; later versions are compressed candidates.\n\n"
        "- Stage **Production** = alias **@champion** (what `models:/"
        f"{registered_model}@champion` serves); stage **Staging** = alias **@challenger** (the candidate "
        "under canary). Both move together on every promotion and rollback.\n"
        "- Each version's description has its recipe, metrics against the parent, gate verdicts and "
        "every decision with who or what triggered it.\n"
        f"- Deployment history: `lockgate history {registered_model}` "
        f"(`--at TIME`: what was in Production then)."
    )


def _log_selection(
    selection: Selection, baseline: dict[str, float], report_dir: Path, parent_run_id: str | None
) -> None:
    """The candidates table and Pareto PNG, in ``reports/``, in the register stage's MLflow run and on
    the release's parent run (where reviewers look first)."""
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
    if parent_run_id is not None:
        client = mlflow.MlflowClient()
        client.log_artifact(parent_run_id, str(table))
        client.log_artifact(parent_run_id, str(png))


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
    pipeline: str = "",
) -> Registration:
    logger = run_logger(__name__)
    with stage_run(parent_run_id, "register"):
        production = (
            registry.version_in_stage(registered_model, "Production") if _exists(registered_model) else None
        )
        if production is None:
            production = registry.log_model_version(
                parent_folder,
                registered_model,
                {"lockgate.role": "baseline"},
                description="**The uncompressed parent**, registered by the first release as the stable "
                "version every candidate is compared with.",
                model_name="parent",
            )
            registry.promote_first_production(
                production, "first release: uncompressed parent as stable", trigger
            )
            logger.info(
                "first release: baseline registered as %s v%s in Production",
                registered_model,
                production.version,
            )
        registry.describe_model(registered_model, model_description(registered_model, pipeline))
        names = [c.candidate for c in compressed]
        versions: dict[str, ModelVersionRef] = {}
        rejected: dict[str, str] = {}
        for model, evaluation in zip(compressed, evaluations, strict=True):
            tags = _version_tags(model, evaluation)
            description = version_description(model, evaluation, parent_run_id)
            if model.model_id:  # the compress run's LoggedModel: the version links back to it
                ref = registry.register_logged_model(model.model_id, registered_model, tags, description)
            else:
                ref = registry.log_model_version(
                    model.folder, registered_model, tags, description, model.candidate
                )
            versions[model.candidate] = ref
            if not evaluation.passed:
                reason = "; ".join(g.message for g in evaluation.gates if not g.passed)
                registry.reject_candidate(ref, reason, trigger)
                rejected[model.candidate] = reason
                logger.warning("candidate %s (v%s) rejected: %s", model.candidate, ref.version, reason)
        selection = select_candidate(names, evaluations, objective)
        _log_selection(selection, evaluations[0].baseline.as_dict(), report_dir, parent_run_id)
        chosen = selection.winner
        staged = None
        if chosen is not None:
            staged = versions[chosen]
            passing = sum(r.passed for r in selection.rows)
            registry.stage_candidate(
                staged, f"passed every gate; best {selection.objective} among {passing} passing", trigger
            )
            logger.info("candidate %s staged as %s v%s", chosen, registered_model, staged.version)
    return Registration(production, staged, chosen, rejected, versions, selection)


def _exists(name: str) -> bool:
    return name in registry.registered_model_names()
