"""Pick the winning candidate: the best on the spec's objective among those that pass every gate.

Also explains the choice: a table of every candidate with the reason it lost, and the Pareto
fronts (quality vs p95 latency, quality vs size) drawn as a PNG for ``reports/`` and MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.flows.spec import ObjectiveSpec
    from lockgate.tasks.evaluate import Evaluation

#: Quality axis of the Pareto fronts, and whether higher is better for it.
_QUALITY = ("accuracy", True)


@dataclass(frozen=True)
class CandidateRow:
    name: str
    metrics: dict[str, float]
    passed: bool
    #: Empty for the winner; otherwise why this candidate was not chosen.
    reason: str
    pareto_latency: bool
    pareto_size: bool


@dataclass(frozen=True)
class Selection:
    winner: str | None
    objective: str
    rows: tuple[CandidateRow, ...]

    def markdown(self) -> str:
        head = (
            "| candidate | gates | accuracy | perplexity | p95 ms | size MB | Pareto (lat/size) | outcome |"
        )
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            m = r.metrics
            front = f"{'yes' if r.pareto_latency else 'no'}/{'yes' if r.pareto_size else 'no'}"
            outcome = "**chosen**" if r.name == self.winner else r.reason
            lines.append(
                f"| {r.name} | {'pass' if r.passed else 'FAIL'} | {m['accuracy']:.3f} | "
                f"{m['perplexity']:.3f} | {m['latency_p95_ms']:.1f} | {m['size_bytes'] / 1e6:.2f} | "
                f"{front} | {outcome} |"
            )
        return "\n".join(lines) + "\n"


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated when both coordinates are to be minimised."""
    front = set()
    for name, (x, y) in points.items():
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y)
            for other, (ox, oy) in points.items()
            if other != name
        )
        if not dominated:
            front.add(name)
    return front


def _quality_cost(metrics: dict[str, float]) -> float:
    metric, higher_is_better = _QUALITY
    return -metrics[metric] if higher_is_better else metrics[metric]


def select_candidate(names: list[str], evaluations: list[Evaluation], objective: ObjectiveSpec) -> Selection:
    """Winner = best ``objective`` among gate-passing candidates; ties go to the earlier-listed one."""
    metrics = {n: e.candidate.as_dict() for n, e in zip(names, evaluations, strict=True)}
    passed = {n: e.passed for n, e in zip(names, evaluations, strict=True)}
    sign = 1.0 if objective.goal == "minimize" else -1.0
    passing = [n for n in names if passed[n]]
    winner = min(passing, key=lambda n: (sign * metrics[n][objective.metric], names.index(n)), default=None)
    on_latency = pareto_front({n: (_quality_cost(m), m["latency_p95_ms"]) for n, m in metrics.items()})
    on_size = pareto_front({n: (_quality_cost(m), m["size_bytes"]) for n, m in metrics.items()})
    rows = []
    for name, evaluation in zip(names, evaluations, strict=True):
        if not evaluation.passed:
            reason = "failed gate: " + "; ".join(g.message for g in evaluation.gates if not g.passed)
        elif winner is not None and name != winner:
            reason = (
                f"lost on {objective.metric} ({objective.goal}): {metrics[name][objective.metric]:.4g} "
                f"vs {metrics[winner][objective.metric]:.4g} for {winner}"
            )
        else:
            reason = ""
        rows.append(
            CandidateRow(name, metrics[name], evaluation.passed, reason, name in on_latency, name in on_size)
        )
    return Selection(winner, f"{objective.goal} {objective.metric}", tuple(rows))


def plot_pareto(selection: Selection, baseline: dict[str, float], path: Path) -> Path:
    """Quality vs p95 latency and quality vs size, fronts joined, the winner ringed; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    quality, _ = _QUALITY
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (x_key, x_label, flag) in zip(
        axes,
        [
            ("latency_p95_ms", "p95 latency (ms)", "pareto_latency"),
            ("size_bytes", "weights (MB)", "pareto_size"),
        ],
        strict=True,
    ):
        scale = 1e-6 if x_key == "size_bytes" else 1.0
        for row in selection.rows:
            x, y = row.metrics[x_key] * scale, row.metrics[quality]
            color = "tab:green" if row.passed else "tab:red"
            ax.scatter([x], [y], color=color, s=50, zorder=3)
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            if row.name == selection.winner:
                ax.scatter([x], [y], s=220, facecolors="none", edgecolors="black", zorder=4)
        front = sorted(
            (r.metrics[x_key] * scale, r.metrics[quality]) for r in selection.rows if getattr(r, flag)
        )
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="tab:blue", linestyle="--", label="Pareto front")
        ax.scatter([baseline[x_key] * scale], [baseline[quality]], marker="*", s=160, color="gray")
        ax.annotate(
            "parent",
            (baseline[x_key] * scale, baseline[quality]),
            xytext=(5, -12),
            textcoords="offset points",
            fontsize=8,
        )
        ax.set_xlabel(x_label)
        ax.set_ylabel(quality)
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs latency (green: passed gates)")
    axes[1].set_title(f"quality vs size — objective: {selection.objective}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
