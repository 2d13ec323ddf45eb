"""The release's story where reviewers look: one page on the MLflow parent run, artifacts in Prefect.

Both are rendered from the :class:`ReleaseSummary` the flow returns, so the terminal, MLflow and
Prefect tell the same story: what was released, every candidate against the parent with each gate and
why it lost, the winner and why, the canary's steps and decision, the drift verdict, where the reports
are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.flows.release import ReleaseSummary

#: MLflow's run description ("note") is this tag; the UI renders it as markdown on the run page.
NOTE_TAG = "mlflow.note.content"
#: Winner metrics put on the parent run (the experiment's runs table compares releases on them).
KEY_METRICS = ("accuracy", "perplexity", "ece", "latency_p95_ms", "tokens_per_s", "size_bytes")


@dataclass(frozen=True)
class CandidateLine:
    """One candidate as every view shows it."""

    name: str
    version: str
    gates: str  # pass | FAIL
    accuracy: float
    accuracy_change: float  # candidate − parent, absolute
    perplexity: float
    ece: float
    latency_p95_ms: float
    speedup_p50: float  # parent p50 / candidate p50
    size_mb: float
    size_ratio: float
    outcome: str  # chosen | why it lost


def candidate_lines(summary: ReleaseSummary) -> list[CandidateLine]:
    reg = summary.registration
    reasons = {r.name: r.reason for r in reg.selection.rows} if reg and reg.selection else {}
    lines = []
    for name, evaluation in summary.candidates.items():
        base, cand = evaluation.baseline, evaluation.candidate
        version = reg.versions[name].version if reg and name in reg.versions else "-"
        chosen = reg is not None and reg.staged_candidate == name
        lines.append(
            CandidateLine(
                name=name,
                version=version,
                gates="pass" if evaluation.passed else "FAIL",
                accuracy=cand.accuracy,
                accuracy_change=cand.accuracy - base.accuracy,
                perplexity=cand.perplexity,
                ece=cand.ece,
                latency_p95_ms=cand.latency_p95_ms,
                speedup_p50=base.latency_p50_ms / cand.latency_p50_ms if cand.latency_p50_ms else math.nan,
                size_mb=cand.size_bytes / 1e6,
                size_ratio=cand.size_bytes / base.size_bytes if base.size_bytes else math.nan,
                outcome="chosen" if chosen else reasons.get(name, ""),
            )
        )
    return lines


CANDIDATE_HEADER = (
    "candidate",
    "version",
    "gates",
    "accuracy",
    "Δ accuracy",
    "perplexity",
    "ECE",
    "p95 ms",
    "p50 speed-up",
    "size MB",
    "size ×",
    "outcome",
)


def candidate_cells(line: CandidateLine) -> tuple[str, ...]:
    """The row's cells as text (ECE with four digits: its differences are in the third)."""
    return (
        line.name,
        f"v{line.version}",
        line.gates,
        f"{line.accuracy:.3f}",
        f"{line.accuracy_change:+.3f}",
        f"{line.perplexity:.3f}",
        f"{line.ece:.4f}",
        f"{line.latency_p95_ms:.1f}",
        f"{line.speedup_p50:.2f}×",
        f"{line.size_mb:.2f}",
        f"{line.size_ratio:.2f}",
        line.outcome,
    )


def _md_table(header: tuple[str, ...] | list[str], rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gate_rows(summary: ReleaseSummary) -> list[tuple[str, ...]]:
    return [
        (
            name,
            f"{g.metric} {g.rule}",
            f"{g.threshold:g}",
            f"{g.baseline:.4g}",
            f"{g.candidate:.4g}",
            f"{g.observed:.4g}",
            "pass" if g.passed else "FAIL",
        )
        for name, evaluation in summary.candidates.items()
        for g in evaluation.gates
    ]


GATE_HEADER = ("candidate", "gate", "threshold", "parent", "candidate value", "observed", "verdict")
CANARY_HEADER = (
    "step",
    "traffic %",
    "verdict",
    "canary requests",
    "stable requests",
    "canary success",
    "canary p50 ms",
    "stable p50 ms",
    "extensions",
    "why",
)


def canary_rows(summary: ReleaseSummary) -> list[tuple[str, ...]]:
    if summary.canary is None:
        return []
    return [
        (
            str(i),
            f"{s.share:g}",
            s.verdict,
            str(s.canary.requests),
            str(s.stable.requests),
            f"{s.canary.success_rate:.3f}",
            f"{s.canary.latency_p50_ms:.1f}",
            f"{s.stable.latency_p50_ms:.1f}",
            str(s.extensions),
            "; ".join(s.reasons) or "-",
        )
        for i, s in enumerate(summary.canary.steps, start=1)
    ]


def _released(summary: ReleaseSummary) -> str:
    reg = summary.registration
    model = f"`{summary.registered_model}`"
    if reg is None:
        return f"Registered model {model}: nothing registered (the release stopped before the registry)."
    if reg.staged is None:
        return (
            f"Registered model {model}: no candidate passed its gates; Production (@champion) stays "
            f"v{reg.production.version}."
        )
    candidate = f"Registered model {model}: v{reg.staged.version} (candidate `{reg.staged_candidate}`)"
    stable = f"v{reg.production.version}"
    if summary.outcome == "promoted":
        return f"{candidate} is now Production (@champion), replacing {stable}."
    if summary.outcome == "rolled_back":
        return f"{candidate} was rolled back; Production (@champion) stays {stable}."
    return f"{candidate} is in Staging (@challenger); Production (@champion) stays {stable}."


def registry_lines(name: str) -> list[str]:
    """Every version of ``name`` now: stage, aliases, candidate, decision (newest first)."""
    from lockgate.tasks.platform import model_registry as registry

    if name not in registry.registered_model_names():
        return []
    lines = []
    for v in registry.list_versions(name):
        aliases = " ".join(f"@{a}" for a in v.aliases) or "-"
        what = v.tags.get(registry.TAG_CANDIDATE, v.tags.get("lockgate.role", ""))
        decision = v.tags.get(registry.TAG_DECISION, "")
        lines.append(f"v{v.version:<4} {v.stage:<10} {aliases:<12} {what:<12} {decision}")
    return lines


def prefect_flow_run_url(flow_run_id: str) -> str:
    """Where the Prefect UI shows the flow run: the server's UI, or `lockgate ui --prefect`'s (the local
    state persists under LOCKGATE_HOME/prefect, so the run is there after the release)."""
    import os

    if not flow_run_id:
        return ""
    api = os.environ.get("PREFECT_API_URL", "")
    base = api.removesuffix("/").removesuffix("/api") if api else f"http://127.0.0.1:{PREFECT_UI_PORT}"
    return f"{base}/runs/flow-run/{flow_run_id}"


#: Port of `lockgate ui --prefect`.
PREFECT_UI_PORT = 4200


def release_note(summary: ReleaseSummary, links: dict[str, str] | None = None) -> str:
    """The parent run's description (markdown): the whole release on one page."""
    out = [
        f"# Release `{summary.pipeline}` → **{summary.outcome.upper()}**",
        "",
        _released(summary),
        "",
        f"Run time {summary.elapsed_s:.0f} s; Prefect flow run "
        + (
            f"[{summary.prefect_flow_run_id}]({summary.prefect_flow_run_url})"
            if summary.prefect_flow_run_url
            else "-"
        )
        + ".",
    ]
    if summary.recovered:
        out += [
            "",
            "Repaired first (left by an interrupted release):",
            *(f"- {a}" for a in summary.recovered),
        ]
    reg = summary.registration
    if summary.candidates:
        objective = reg.selection.objective if reg and reg.selection else "-"
        out += [
            "",
            f"## Candidates (objective: {objective}; Δ and × are against the parent)",
            "",
            _md_table(CANDIDATE_HEADER, [candidate_cells(line) for line in candidate_lines(summary)]),
            "",
            "### Gates",
            "",
            _md_table(GATE_HEADER, gate_rows(summary)) if gate_rows(summary) else "(no gates in the spec)",
        ]
    out += ["", "## Winner", ""]
    if reg is not None and reg.staged_candidate is not None:
        winner = summary.candidates[reg.staged_candidate].candidate
        objective = reg.selection.objective if reg.selection else "the objective"
        out.append(
            f"**{reg.staged_candidate}** (v{reg.staged.version}): passed every gate and is the best on "
            f"{objective} among the passing candidates — accuracy {winner.accuracy:.3f}, "
            f"ECE {winner.ece:.4f}, p95 {winner.latency_p95_ms:.1f} ms, {winner.size_bytes / 1e6:.2f} MB."
        )
    else:
        out.append("No winner: no candidate passed every gate.")
    if summary.registry_after:
        out += ["", f"## Registry `{summary.registered_model}` after the release", "", "```"]
        out += [*summary.registry_after, "```"]
    if summary.canary is not None:
        c = summary.canary
        out += [
            "",
            f"## Canary ({c.strategy})",
            "",
            _md_table(CANARY_HEADER, canary_rows(summary)) if c.steps else "(no steps ran)",
            "",
            f"**Decision: {c.decision}** — {c.reason}",
        ]
    if summary.drift is not None:
        d = summary.drift
        out += [
            "",
            "## Drift",
            "",
            f"**{d.verdict}**: drift share {d.drift_share:.2f} ({d.drifted_columns} drifted column(s)) over "
            f"{d.current_rows} served requests against {d.reference_rows} reference rows.",
        ]
    report_links = {**(links or {})}
    if summary.drift is not None and summary.drift.html_path:
        report_links.setdefault("Drift report (HTML)", f"file://{summary.drift.html_path}")
    if summary.bento_tag:
        report_links.setdefault("Bento", f"`{summary.bento_tag}`")
    if report_links:
        out += ["", "## Links", ""]
        out += [
            f"- {label}: {target}" if target.startswith("`") else f"- [{label}]({target})"
            for label, target in report_links.items()
        ]
    return "\n".join(out) + "\n"


def winner_metrics(summary: ReleaseSummary) -> dict[str, float]:
    """The winner's key metrics (``winner_*``) and the parent's (``parent_*``) for the parent run."""
    reg = summary.registration
    if reg is None or reg.staged_candidate is None:
        return {}
    evaluation = summary.candidates[reg.staged_candidate]
    cand, base = evaluation.candidate.as_dict(), evaluation.baseline.as_dict()
    return {
        **{f"winner_{k}": cand[k] for k in KEY_METRICS},
        **{f"parent_{k}": base[k] for k in KEY_METRICS},
    }


def publish_to_mlflow(summary: ReleaseSummary, links: dict[str, str]) -> None:
    """The note, the decision and the winner's key metrics on the active (parent) run."""
    import mlflow

    reg = summary.registration
    tags = {NOTE_TAG: release_note(summary, links), "lockgate.outcome": summary.outcome}
    if summary.canary is not None:
        tags["lockgate.decision"] = summary.canary.decision
    if reg is not None and reg.staged_candidate is not None:
        tags["lockgate.winner"] = reg.staged_candidate
        tags["lockgate.winner_version"] = reg.staged.version
    mlflow.set_tags(tags)
    mlflow.log_metrics(
        {
            **winner_metrics(summary),
            "elapsed_s": summary.elapsed_s,
            "promoted": float(summary.outcome == "promoted"),
            "candidates_passed": float(sum(e.passed for e in summary.candidates.values())),
        }
    )


def _artifact_key(pipeline: str, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    raw = f"{pipeline}-{what}".lower()
    return "".join(ch if ch.isalnum() else "-" for ch in raw)


def publish_to_prefect(summary: ReleaseSummary, mlflow_url: str) -> list[str]:
    """Table and markdown artifacts on the running flow run; returns the artifact keys."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    def rows(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> list[dict[str, str]]:
        return [dict(zip(header, row, strict=True)) for row in cells]

    keys = []

    def table(what: str, header: tuple[str, ...], cells: list[tuple[str, ...]], description: str) -> None:
        key = _artifact_key(summary.pipeline, what)
        create_table_artifact(rows(header, cells), key=key, description=description)
        keys.append(key)

    if summary.candidates:
        lines = [candidate_cells(line) for line in candidate_lines(summary)]
        table("candidates", CANDIDATE_HEADER, lines, "Every candidate against the parent, and why it lost")
        table("gates", GATE_HEADER, gate_rows(summary), "Every gate of every candidate")
    if summary.canary is not None:
        c = summary.canary
        table("canary", CANARY_HEADER, canary_rows(summary), f"Canary steps -> {c.decision}: {c.reason}")
    verdict = summary.drift.verdict if summary.drift is not None else "not run"
    key = _artifact_key(summary.pipeline, "release")
    create_markdown_artifact(
        release_note(summary, {"MLflow run": mlflow_url}),
        key=key,
        description=f"Release {summary.outcome}; drift verdict: {verdict}",
    )
    keys.append(key)
    key = _artifact_key(summary.pipeline, "mlflow-run")
    create_link_artifact(mlflow_url, link_text="The release's MLflow run", key=key)
    keys.append(key)
    return keys
