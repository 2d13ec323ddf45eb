"""Render a :class:`ReleaseSummary` as the table ``lockgate run`` ends with (plain text, no deps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.release import ReleaseSummary

_METRICS = (
    ("perplexity", "{:.3f}"),
    ("accuracy", "{:.3f}"),
    ("ece", "{:.3f}"),
    ("latency_p50_ms", "{:.1f}"),
    ("latency_p95_ms", "{:.1f}"),
    ("latency_p99_ms", "{:.1f}"),
    ("tokens_per_s", "{:.1f}"),
    ("size_bytes", "{:,.0f}"),
)


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
    for name, evaluation in summary.candidates.items():
        base, cand = evaluation.baseline.as_dict(), evaluation.candidate.as_dict()
        rows = [["metric", "baseline", name, "change"]]
        rows += [
            [m, fmt.format(base[m]), fmt.format(cand[m]), _change(base[m], cand[m])] for m, fmt in _METRICS
        ]
        out.append(_table(rows))
        out.append("")
        gate_rows = [["gate", "threshold", "observed", "verdict"]]
        gate_rows += [
            [f"{g.metric}.{g.rule}", f"{g.threshold:g}", f"{g.observed:.4g}", "pass" if g.passed else "FAIL"]
            for g in evaluation.gates
        ]
        out.append(_table(gate_rows) if len(gate_rows) > 1 else "(no gates in the spec)")
        out.append("")
    reg = summary.registration
    if reg is not None:
        staged = f"v{reg.staged.version} ({reg.staged_candidate})" if reg.staged else "none"
        out.append(
            f"registry   {summary.registered_model}: stable v{reg.production.version}, staged {staged}"
        )
        for candidate, reason in reg.rejected.items():
            out.append(f"rejected   {candidate}: {reason}")
    if summary.bento_tag:
        out.append(f"bento      {summary.bento_tag}")
    if summary.canary is not None:
        verdicts = {"pass": "ok", "fail": "FAIL", "inconclusive": "HOLD"}
        steps = " ".join(
            f"{s.share:g}%:{verdicts[s.verdict]}{'+' * s.extensions}" for s in summary.canary.steps
        )
        c = summary.canary
        out.append(f"canary     {c.strategy}: {steps} -> {c.decision} ({c.reason})")
    if summary.drift is not None:
        where = f" -> {summary.drift.html_path}" if summary.drift.html_path else ""
        out.append(
            f"monitor    {summary.drift.verdict} (drift share {summary.drift.drift_share:.2f}, "
            f"{summary.drift.current_rows} requests){where}"
        )
    out.append(f"mlflow     {summary.mlflow_run_url}  (lockgate ui)")
    out.append(f"prefect    flow run {summary.prefect_flow_run_id}")
    return "\n".join(out)
