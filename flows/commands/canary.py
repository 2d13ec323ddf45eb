"""`lockgate canary ...`: releases in progress."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lockgate.tasks.platform.errors import LockgateError

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec
    from lockgate.tasks.release.state import CanaryState

from lockgate.flows.commands.common import (
    JsonOut,
    SpecFile,
    cli_trigger,
    fail,
    manual_change,
    use_tracking,
)

canary_app = typer.Typer(help="Releases in progress: status and recovery.", no_args_is_help=True)


@canary_app.command("status")
def canary_status(
    model: Annotated[str | None, typer.Argument(help="Registered model; default: all.")] = None,
    as_json: JsonOut = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh until no release is running (Ctrl-C stops it too).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes with --watch.")] = 5.0,
) -> None:
    """Release locks (who runs a release, in which phase), each model's Staging candidate and the
    persisted canary a restarted `lockgate run` would resume."""
    use_tracking()
    try:
        while True:
            report = _status_report(model)
            if watch:
                typer.echo(time.strftime("-- %H:%M:%S --"))
            _print_status(report, as_json)
            if not watch or not any(item["release"] for item in report.values()):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def _status_report(model: str | None) -> dict[str, dict]:
    from lockgate.tasks.platform import model_registry as registry
    from lockgate.tasks.release import lock as release_lock
    from lockgate.tasks.release.state import load_state

    locks = {lock.model: lock for lock in release_lock.all_locks()}
    registered = set(registry.registered_model_names())
    names = [model] if model else sorted(registered | set(locks))
    report: dict[str, dict] = {}
    try:
        for name in names:
            lock = locks.get(name)
            staged = registry.version_in_stage(name, "Staging") if name in registered else None
            production = registry.version_in_stage(name, "Production") if name in registered else None
            decision = registry.describe_version(staged).tags.get(registry.TAG_DECISION, "") if staged else ""
            report[name] = {
                "release": None
                if lock is None
                else {
                    "state": lock.state(),
                    "owner": lock.owner,
                    "phase": lock.phase,
                    "expires_in_s": round(lock.expires_at - time.time()),
                },
                "production": production.version if production else None,
                "staging": {"version": staged.version, "decision": decision} if staged else None,
                "checkpoint": _checkpoint_status(load_state(name)),
            }
    except LockgateError as exc:
        raise fail(exc) from None
    return report


def _print_status(report: dict[str, dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report:
        typer.echo("no registered models and no releases")
    for name, item in report.items():
        release, staging = item["release"], item["staging"]
        running = (
            f"release {release['state']} ({release['phase']}) by {release['owner']}"
            if release
            else "no release running"
        )
        staged_text = (
            f"staging v{staging['version']} ({staging['decision']})" if staging else "nothing in Staging"
        )
        saved = item["checkpoint"]
        saved_text = (
            f"; canary of v{saved['candidate']} saved after {saved['completed_steps']} step(s)"
            if saved
            else ""
        )
        typer.echo(f"{name}: production v{item['production'] or '-'}; {staged_text}; {running}{saved_text}")


def _checkpoint_status(state: CanaryState | None) -> dict | None:
    """The persisted canary as `canary status` shows it."""
    if state is None:
        return None
    return {
        "candidate": state.candidate.version,
        "stable": state.stable.version,
        "completed_steps": len(state.checkpoint.steps),
    }


@canary_app.command("recover")
def canary_recover(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: JsonOut = False,
) -> None:
    """Clean up after a release that died: stop its services, complete a half-done promotion, roll back
    a candidate whose canary never decided. `lockgate run` does the same before it starts, except that
    it resumes such a canary instead where canary.on_interrupt is resume and the state allows it."""
    use_tracking()
    from lockgate.tasks.release.recovery import recover_interrupted

    with manual_change(model, "recover") as (trigger, replaced):
        actions = recover_interrupted(model, replaced, trigger)
    if as_json:
        typer.echo(json.dumps({"model": model, "actions": actions}))
    else:
        typer.echo("\n".join(actions) if actions else f"{model}: nothing to recover")


# -- live canary: operators in control (state held in the registry: tasks/release/live.py) ------------
def _canary_spec(canary_spec: Path | None, file: Path, pipeline: str | None) -> CanarySpec:
    """The canary section to run: a YAML file holding just it, else the pipeline's, forced live."""
    import yaml
    from pydantic import ValidationError

    from lockgate.flows.spec import CanarySpec

    try:
        if canary_spec is not None:
            spec = CanarySpec.model_validate(yaml.safe_load(canary_spec.read_text()) or {})
        elif file.is_file():
            from lockgate.flows.spec_loader import load_spec

            spec = load_spec(file).pipeline(pipeline)[1].canary
        else:
            spec = CanarySpec()
    except ValidationError as exc:
        raise fail(f"{canary_spec or file}: canary spec invalid: {exc}", code=2) from None
    if spec.strategy != "canary":
        raise fail(f"canary.strategy is {spec.strategy!r}: a live canary needs strategy canary", code=2)
    return spec.model_copy(update={"traffic": "live"})


@canary_app.command("start")
def canary_start(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Option("--version", help="The already-registered version to release.")],
    canary_spec: Annotated[
        Path | None, typer.Option(help="YAML file holding a canary section; default: the pipeline's.")
    ] = None,
    file: SpecFile = Path("pipelines.yaml"),
    pipeline: Annotated[str | None, typer.Option(help="Pipeline whose canary section to use.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Live canary of an already-registered version against Production (no compress/evaluate): the
    production routers (`lockgate serve`) send each step's share of the users' requests to it. Run it
    again after a crash: it continues at the step the registry holds (an approval wait included)."""
    use_tracking()
    from lockgate.tasks.platform import model_registry as registry
    from lockgate.tasks.platform.errors import RegistryError
    from lockgate.tasks.release.live import live_canary, running_routers

    spec = _canary_spec(canary_spec, file, pipeline)
    candidate = registry.ModelVersionRef(model, version)
    with manual_change(model, "canary start") as (trigger, _replaced):
        try:
            stable = registry.version_in_stage(model, "Production")
            if stable is None:
                raise RegistryError(f"{model} has no Production version to compare v{version} with")
            if stable.version == version:
                raise RegistryError(f"{model} v{version} is already in Production")
            info = registry.describe_version(candidate)
            if info.stage != "Staging":
                registry.stage_candidate(candidate, "live canary started by an operator", trigger)
            routers = running_routers(model)
            why = f"`lockgate canary start` ({len(routers)} production router(s) running on this machine)"
            if not routers:
                typer.echo(
                    f"warning: no production router of {model} is running here; waiting for traffic", err=True
                )
            result = live_canary(
                stable, candidate, spec, trigger, why, progress=lambda note: typer.echo(note)
            )
        except LockgateError as exc:
            raise fail(exc) from None
    payload = {"model": model, "version": version, "decision": result.decision, "reason": result.reason}
    if as_json:
        typer.echo(json.dumps({**payload, "details": result.details}))
    else:
        typer.echo(f"{model} v{version}: {result.decision} ({result.reason})")
    if result.decision == "rollback":
        raise typer.Exit(1)


def _set_control(model: str, tags: dict[str, str], action: str, reason: str) -> dict[str, str]:
    """Set rollout tags an operator controls, and put the action into the history."""
    from lockgate.bentos.rollout import TAG_CANDIDATE, TAG_STATE
    from lockgate.tasks.platform import model_registry as registry

    current = registry.rollout_tags(model)
    if TAG_CANDIDATE not in current or current.get(TAG_STATE) in (None, "done"):
        raise fail(f"{model}: no live canary in progress", code=1)
    registry.set_rollout(model, tags)
    ref = registry.ModelVersionRef(model, current[TAG_CANDIDATE])
    registry.record_action(ref, action, reason, cli_trigger())
    return current


@canary_app.command("pause")
def canary_pause(model: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Hold the live canary at its step (the share stays; safety checks keep running)."""
    use_tracking()
    from lockgate.bentos.rollout import TAG_STATE

    current = _set_control(model, {TAG_STATE: "paused"}, "canary_pause", "paused by an operator")
    typer.echo(f"{model}: paused at {current.get('lockgate.rollout.step', '?')}")


@canary_app.command("resume")
def canary_resume(model: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Continue a paused live canary at the same step."""
    use_tracking()
    from lockgate.bentos.rollout import TAG_STATE

    current = _set_control(model, {TAG_STATE: "running"}, "canary_resume", "resumed by an operator")
    typer.echo(f"{model}: resumed at {current.get('lockgate.rollout.step', '?')}")


@canary_app.command("approve")
def canary_approve(model: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Let a live canary waiting for approval (canary.require_approval) take its last step."""
    use_tracking()
    from datetime import UTC, datetime

    from lockgate.bentos.rollout import TAG_APPROVED_AT, TAG_APPROVED_BY, TAG_STATE
    from lockgate.tasks.platform import model_registry as registry

    if registry.rollout_tags(model).get(TAG_STATE) != "awaiting_approval":
        raise fail(f"{model}: no live canary is waiting for approval", code=1)
    approver, now = cli_trigger(), datetime.now(UTC).isoformat(timespec="seconds")
    _set_control(
        model, {TAG_APPROVED_BY: approver, TAG_APPROVED_AT: now}, "canary_approve", f"approved at {now}"
    )
    typer.echo(f"{model}: approved by {approver} at {now}")


@canary_app.command("abort")
def canary_abort(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version and in the history.")],
    wait_s: Annotated[
        float, typer.Option(help="Seconds to wait for the canary's worker to roll back.")
    ] = 4.0,
) -> None:
    """Roll the live canary back now: the routers drop its share at their next poll, its worker rolls the
    candidate back (or, when no worker runs, this command does)."""
    use_tracking()
    from lockgate.bentos.rollout import TAG_ABORT_REASON, TAG_SHARE, TAG_STATE
    from lockgate.tasks.platform import model_registry as registry

    current = _set_control(
        model, {TAG_SHARE: "0", TAG_STATE: "aborting", TAG_ABORT_REASON: reason[:500]}, "canary_abort", reason
    )
    candidate = registry.ModelVersionRef(model, current["lockgate.rollout.candidate"])
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and registry.describe_version(candidate).stage == "Staging":
        time.sleep(0.2)
    if registry.describe_version(candidate).stage == "Staging":  # no worker acted: roll back here
        with manual_change(model, "canary abort") as (trigger, _replaced):
            registry.roll_back_candidate(candidate, f"aborted by an operator: {reason}", trigger)
            registry.clear_rollout(model)
    typer.echo(f"{model}: canary of v{candidate.version} aborted ({reason}); Production only")


@canary_app.command("watch")
def canary_watch(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    interval_s: Annotated[float, typer.Option(help="Refresh period.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Step, share, live requests per arm (all replicas) and the state of a live canary, refreshing."""
    use_tracking()
    from lockgate.tasks.release.live import watch_snapshot

    while True:
        snapshot = watch_snapshot(model)
        if as_json:
            typer.echo(json.dumps(snapshot))
        else:
            typer.echo(format_snapshot(snapshot))
        if once or snapshot["state"] in ("", "done"):
            return
        time.sleep(interval_s)


def format_snapshot(s: dict) -> str:
    arms = "  ".join(
        f"{role} v{a['version']}: {a['requests']} req, {a['errors']} err, p50 {a['latency_p50_ms']:.1f} ms"
        for role, a in s["arms"].items()
    )
    return (
        f"{s['model']}: {s['state'] or 'no live canary'} {s['step']} share {s['share']}% "
        f"(production v{s['production']}, candidate v{s['candidate'] or '-'}) | {arms} | "
        f"routers {s['routers']} | {s['note']}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")
