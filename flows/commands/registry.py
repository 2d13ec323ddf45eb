"""Registry commands: status, history, rollback, promote."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from lockgate.flows.commands.common import (
    JsonOut,
    fail,
    manual_change,
    use_tracking,
)
from lockgate.tasks.platform.errors import LockgateError


def status(
    model: Annotated[str | None, typer.Argument(help="Registered model; default: all.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Registered models, their versions, stages and last release outcome."""
    use_tracking()
    from lockgate.tasks.platform import model_registry as registry

    names = [model] if model else registry.registered_model_names()
    report = {}
    try:
        for name in names:
            report[name] = [
                {
                    "version": v.version,
                    "stage": v.stage,
                    "aliases": list(v.aliases),
                    "decision": v.tags.get(registry.TAG_DECISION, ""),
                    "reason": v.tags.get(registry.TAG_REASON, ""),
                    "candidate": v.tags.get(registry.TAG_CANDIDATE, v.tags.get("lockgate.role", "")),
                    "created": datetime.fromtimestamp(v.created_ms / 1000, UTC).isoformat(timespec="seconds"),
                }
                for v in registry.list_versions(name)
            ]
    except LockgateError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report:
        typer.echo("no registered models yet: run `lockgate run`")
    for name, versions in report.items():
        typer.echo(f"{name}")
        for v in versions:
            aliases = f" @{','.join(v['aliases'])}" if v["aliases"] else ""
            typer.echo(
                f"  v{v['version']:<4} {v['stage']:<10} {v['candidate']:<10} {v['decision']:<12}"
                f"{aliases}  {v['reason'][:80]}"
            )


def history(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    at: Annotated[
        str | None,
        typer.Option(help="ISO 8601 time (UTC unless it names a zone): show what was in Production then."),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Deployment history: every stage transition of MODEL, when, why and by whom (`--at TIME`: only
    the version that was in Production at that time)."""
    use_tracking()
    from dataclasses import asdict

    from lockgate.tasks.platform import model_registry as registry

    try:
        registry.list_versions(model)  # an unknown model exits non-zero, before reading any history
        if at is not None:
            when = _parse_time(at)
            version = registry.production_at(model, int(when.timestamp() * 1000))
            if as_json:
                typer.echo(json.dumps({"model": model, "at": when.isoformat(), "production": version}))
            else:
                typer.echo(f"{model} at {when.isoformat(timespec='seconds')}: Production v{version or '-'}")
            return
        events = registry.history(model)
    except LockgateError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in events], indent=2))
        return
    if not events:
        typer.echo(f"no recorded transitions for {model}")
    for e in events:
        when = datetime.fromtimestamp(e.time_ms / 1000, UTC).isoformat(timespec="seconds")
        typer.echo(
            f"{when}  v{e.version:<4} {e.from_stage:>10} -> {e.to_stage:<10} {e.trigger:<28} "
            + (f"[{e.action}] " if e.action else "")
            + e.reason[:90]
        )


def _parse_time(text: str) -> datetime:
    """An ISO 8601 time; UTC when it names no zone. A bad value exits 2 naming the option."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"--at: {text!r} is not an ISO 8601 time (e.g. 2026-12-03T18:00:00)", code=2) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on both versions.")] = "manual rollback",
    version: Annotated[
        str | None, typer.Option("--version", help="Version to restore; default: the one replaced.")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", hidden=True, help="Deprecated: use --version.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Put the previous (or the given) version back into Production (stage transitions and the
    champion alias move together, logged).

    Takes the model's release lock: refused while a release of MODEL is running."""
    use_tracking()
    from lockgate.tasks.platform import model_registry as registry

    if to is not None:
        if version is not None and version != to:
            raise fail("pass the version once: --version (--to is its deprecated name)", code=2)
        typer.echo("--to is deprecated: use --version", err=True)
    with manual_change(model, "rollback") as (trigger, _):
        restored, demoted = registry.roll_back_production(
            model, reason, trigger=trigger, to_version=version or to
        )
    if as_json:
        typer.echo(json.dumps({"model": model, "production": restored.version, "archived": demoted.version}))
    else:
        typer.echo(f"{model}: Production v{demoted.version} -> v{restored.version} ({reason})")


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version to promote; default: the Staging one.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; recorded on the version.")] = "manual promotion",
    as_json: JsonOut = False,
) -> None:
    """Promote the Staging (or given) version to Production; the old Production is archived after.

    Takes the model's release lock: refused while a release of MODEL is running."""
    use_tracking()
    from lockgate.tasks.platform import model_registry as registry
    from lockgate.tasks.platform.errors import RegistryError

    with manual_change(model, "promote") as (trigger, _):
        ref = (
            registry.ModelVersionRef(model, version)
            if version
            else registry.version_in_stage(model, "Staging")
        )
        if ref is None:
            raise RegistryError(f"{model} has no Staging version to promote; pass --version")
        registry.describe_version(ref)  # an unknown version fails here, before any transition
        old = registry.promote(ref, reason, trigger)
    previous = old.version if old else None
    if as_json:
        typer.echo(json.dumps({"model": model, "production": ref.version, "archived": previous}))
    else:
        typer.echo(f"{model}: Production v{previous or '-'} -> v{ref.version} ({reason})")


def register(app: typer.Typer) -> None:
    app.command()(status)
    app.command()(history)
    app.command()(rollback)
    app.command()(promote)
