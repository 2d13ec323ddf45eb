"""Render a :class:`ReleaseSummary` as the table ``lockgate run`` ends with (plain text, no deps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.flows.story import (
    CANDIDATE_HEADER,
    GATE_HEADER,
    candidate_cells,
    candidate_lines,
    gate_rows,
)
from lockgate.tasks.compression.gate_resolution import result_warnings
from lockgate.tasks.platform.storage import human_bytes

if TYPE_CHECKING:
    from lockgate.flows.release import ReleaseSummary


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _change(base: float, cand: float) -> str:
    return f"{(cand - base) / abs(base) * 100:+.1f}%" if base else "n/a"


def render_summary(summary: ReleaseSummary) -> str:
    out = [f"\nrelease {summary.pipeline} -> {summary.outcome.upper()}  ({summary.elapsed_s:.0f}s)\n"]
    out += [f"recovered  {action}" for action in summary.recovered]  # left by a killed earlier release
    if summary.candidates:  # one row per candidate: Δ and × against the parent, why each lost
        rows = [list(CANDIDATE_HEADER)] + [list(candidate_cells(c)) for c in candidate_lines(summary)]
        out += [_table(rows), ""]
        gates = gate_rows(summary)
        out.append(_table([list(GATE_HEADER), *map(list, gates)]) if gates else "(no gates in the spec)")
        out.append("perplexity: answer tokens given the prompt (prompt tokens are not scored)")
    for name, evaluation in summary.candidates.items():
        extra: list[str] = []
        if evaluation.intervals:
            extra.append("bootstrap intervals (evaluate.confidence.level) of the change vs the parent:")
            for metric, iv in evaluation.intervals.items():
                extra.append(
                    f"  {metric}: {_change(iv.baseline, iv.candidate)} "
                    f"[{iv.change_pct_ci[0]:+.1f}%, {iv.change_pct_ci[1]:+.1f}%]"
                )
        if evaluation.tasks:
            task_rows = [["task", "metric", "rows", "baseline", name, "baseline CI", "candidate CI"]]
            task_rows += [
                [
                    t.name,
                    t.metric,
                    str(t.rows),
                    f"{t.score.baseline:.3f}",
                    f"{t.score.candidate:.3f}",
                    f"[{t.score.baseline_ci[0]:.3f}, {t.score.baseline_ci[1]:.3f}]",
                    f"[{t.score.candidate_ci[0]:.3f}, {t.score.candidate_ci[1]:.3f}]",
                ]
                for t in evaluation.tasks.values()
            ]
            extra.append(_table(task_rows))
        d = evaluation.distance
        if d is not None:
            extra.append(
                f"distance from parent: flips {d.flip_pct:.1f}% ({d.flips_to_wrong} to wrong, "
                f"{d.flips_to_right} to right), top-1 agreement {d.top1_agreement:.3f}, "
                f"KL {d.kl_mean:.4f}, recovery {d.recovery:.3f}"
            )
        extra += [f"warning    {w}" for w in result_warnings(evaluation.gates, len(evaluation.table))]
        if extra:
            out += [f"{name}:", *extra]
        out.append("")
    reg = summary.registration
    if reg is not None:
        staged = f"v{reg.staged.version} ({reg.staged_candidate})" if reg.staged else "none"
        out.append(
            f"registered {summary.registered_model}: stable v{reg.production.version}, staged {staged}"
        )
        for candidate, reason in reg.rejected.items():
            out.append(f"rejected   {candidate}: {reason}")
    if summary.bento_tag:
        out.append(f"bento      {summary.bento_tag}")
    if summary.canary is not None:
        verdicts = {"pass": "ok", "fail": "FAIL", "inconclusive": "HOLD"}
        steps = " ".join(
            f"{s.share:g}%:{verdicts[s.verdict]}{'+' * s.extensions}({s.canary.requests}/{s.stable.requests})"
            for s in summary.canary.steps
        )
        c = summary.canary
        out.append(f"canary     {c.strategy} (requests canary/stable): {steps} -> {c.decision} ({c.reason})")
        if "traffic" in c.details:
            out.append(f"traffic    {c.details['traffic']}: {c.details.get('traffic_reason', '')}")
        if c.details.get("traffic") == "live":
            d = c.details
            out.append(
                f"users      {d.get('client_requests', 0)} live requests, "
                f"{d.get('client_failed', 0)} failed, "
                f"{d.get('failovers', 0)} failed over to stable"
                + (
                    f"; first canary request to decision {d['first_canary_request_to_decision_s']}s"
                    if "first_canary_request_to_decision_s" in d
                    else ""
                )
            )
        for key, engine in c.details.items():
            if key.startswith("engine_"):
                out.append(f"engine     {key.removeprefix('engine_')}: {engine}")
    if summary.drift is not None:
        drift = summary.drift
        where = f" -> {drift.html_path}" if drift.html_path else ""
        if drift.verdict == "insufficient_data":  # say why instead of a share that decided nothing
            why = drift.notes[-1] if drift.notes else "too few requests"
            out.append(f"monitor    insufficient_data over {drift.current_rows} requests: {why}{where}")
        else:
            out.append(
                f"monitor    {drift.verdict} (drift share {drift.drift_share:.2f}, "
                f"{drift.current_rows} requests){where}"
            )
        if drift.window:  # which live window and versions were judged
            out.append(f"window     {drift.window}")
    if summary.home_added_bytes is not None and summary.home_bytes is not None:
        out.append(
            f"storage    {'+' if summary.home_added_bytes >= 0 else '-'}"
            f"{human_bytes(abs(summary.home_added_bytes))} in LOCKGATE_HOME (now "
            f"{human_bytes(summary.home_bytes)}; `lockgate gc` frees what old releases left)"
        )
    if summary.registry_after:  # after the decision: what each version is now
        out.append(f"\nregistry {summary.registered_model} after the release:")
        out += [f"  {line}" for line in summary.registry_after]
    out.append(f"mlflow     {summary.mlflow_run_url}  (lockgate ui)")
    out.append(
        f"prefect    {summary.prefect_flow_run_url or summary.prefect_flow_run_id}  (lockgate ui --prefect)"
    )
    return "\n".join(out)
