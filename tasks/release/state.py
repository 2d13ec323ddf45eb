"""A canary in progress, persisted after every completed step, so a killed release can resume it.

``<home>/canary-state/MODEL.json`` holds a :class:`CanaryState`: the two versions, the bento and prompts
the canary replays, a hash of its spec, and the :class:`Checkpoint` it reached. tasks/release/recovery.py
decides whether a restarted release may resume it; the canary strategy writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.platform.settings import get_settings
from lockgate.tasks.release.analysis import CheckResult, Outcome, WindowStats
from lockgate.tasks.release.outcome import StepResult

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec

log = get_logger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """What a canary has completed, enough to resume it after its release was killed: the judged steps
    and every outcome the analysis observed, in order. Replaying the outcomes rebuilds the e-processes
    exactly, so a resumed canary keeps one always-valid error budget instead of starting a new test
    (each restart with a fresh test would spend ``alpha`` again)."""

    steps: tuple[StepResult, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    replayed: int = 0  # user requests replayed so far: the replayed users continue where they were


@dataclass(frozen=True)
class CanaryState:
    """A canary in progress, as persisted after every completed step (``<home>/canary-state/``).

    Enough for a restarted release to resume it (tasks/release/recovery.py decides whether it may): the two
    versions, the bento and prompts it replays, a hash of the canary spec (a changed plan is not
    resumed) and the :class:`Checkpoint`. A file of its own, not the release-lock row: the lock row
    is replaced when a restarted release takes the lock over, and the state must outlive that."""

    stable: ModelVersionRef
    candidate: ModelVersionRef
    bento_tag: str
    prompts: tuple[str, ...]
    spec_sha256: str
    request_log: str
    log_dir: str
    report_dir: str | None
    mlflow_run_id: str | None  # the release run that started the canary
    checkpoint: Checkpoint = Checkpoint()
    # The pipeline's package: section without its secrets (ServiceConfig JSON). `bentoml serve TAG`
    # does not apply the envs baked into a bento, so the strategies pass it to every service they start.
    service_config: str | None = None

    @classmethod
    def start(
        cls,
        spec: CanarySpec,
        *,
        bento_tag: str,
        stable: ModelVersionRef,
        candidate: ModelVersionRef,
        prompts: list[str] | tuple[str, ...],
        request_log: Path,
        log_dir: Path,
        report_dir: Path | None,
        mlflow_run_id: str | None,
        service_config: str | None = None,
    ) -> CanaryState:
        """The state of a release strategy about to start (no step completed)."""
        return cls(
            stable,
            candidate,
            bento_tag,
            tuple(prompts),
            canary_spec_sha256(spec),
            str(request_log),
            str(log_dir),
            str(report_dir) if report_dir else None,
            mlflow_run_id,
            service_config=service_config,
        )


def canary_spec_sha256(spec: CanarySpec) -> str:
    """What must be unchanged for a canary to be resumed: the plan and its analysis (not the
    ``on_interrupt`` choice itself)."""
    return hashlib.sha256(spec.model_dump_json(exclude={"on_interrupt"}).encode()).hexdigest()


def state_path(model: str) -> Path:
    return get_settings().home / "canary-state" / f"{model}.json"


def _outcome_row(o: Outcome) -> list:
    return [o.target, o.ok, o.latency_ms, o.status_code, o.output_tokens, o.empty, o.ttft_ms]


def _step_from_dict(d: dict) -> StepResult:
    return StepResult(
        share=d["share"],
        verdict=d["verdict"],
        checks=tuple(CheckResult(**c) for c in d["checks"]),
        canary=WindowStats(**d["canary"]),
        stable=WindowStats(**d["stable"]),
        extensions=d["extensions"],
        elapsed_s=d["elapsed_s"],
        stopped_early=d["stopped_early"],
    )


def save_state(state: CanaryState) -> Path:
    """Write the state atomically (a reader sees the previous or the new checkpoint, never half)."""
    path = state_path(state.candidate.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": 1,
        "stable": asdict(state.stable),
        "candidate": asdict(state.candidate),
        "bento_tag": state.bento_tag,
        "prompts": list(state.prompts),
        "spec_sha256": state.spec_sha256,
        "request_log": state.request_log,
        "log_dir": state.log_dir,
        "report_dir": state.report_dir,
        "mlflow_run_id": state.mlflow_run_id,
        "service_config": state.service_config,
        "steps": [asdict(step) for step in state.checkpoint.steps],
        "outcomes": [_outcome_row(o) for o in state.checkpoint.outcomes],
        "replayed": state.checkpoint.replayed,
        "saved_at": time.time(),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle)  # NaN stays NaN: Python's json reads it back
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_state(model: str) -> CanaryState | None:
    """The persisted canary of ``model``, or None (no file, or one this version cannot read)."""
    path = state_path(model)
    try:
        body = json.loads(path.read_text())
        checkpoint = Checkpoint(
            tuple(_step_from_dict(d) for d in body["steps"]),
            tuple(Outcome(*row) for row in body["outcomes"]),
            int(body["replayed"]),
        )
        return CanaryState(
            stable=ModelVersionRef(**body["stable"]),
            candidate=ModelVersionRef(**body["candidate"]),
            bento_tag=body["bento_tag"],
            prompts=tuple(body["prompts"]),
            spec_sha256=body["spec_sha256"],
            request_log=body["request_log"],
            log_dir=body["log_dir"],
            report_dir=body["report_dir"],
            mlflow_run_id=body["mlflow_run_id"],
            checkpoint=checkpoint,
            service_config=body.get("service_config"),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A state that cannot be read cannot be resumed: recovery rolls the candidate back instead.
        log.warning("canary state %s unreadable (%s): not resumable", path, exc)
        return None


def clear_state(model: str) -> bool:
    """Remove the persisted canary of ``model`` (decided, or rolled back); False when there was none."""
    try:
        state_path(model).unlink()
    except FileNotFoundError:
        return False
    return True
