"""Housekeeping of LOCKGATE_HOME: `lockgate gc`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lockgate.flows.commands.common import JsonOut


def gc(
    keep_runs: Annotated[int, typer.Option(min=0, help="Keep the newest N release runs' files.")] = 3,
    delete: Annotated[bool, typer.Option("--delete", help="Delete; without it gc is a dry run.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be freed (default).")
    ] = False,
    min_age_hours: Annotated[float, typer.Option(min=0, help="Never touch files newer than this.")] = 1.0,
    as_json: JsonOut = False,
) -> None:
    """Free LOCKGATE_HOME: work folders, candidate caches, Bentos and registry copies that neither the
    registry nor the newest --keep-runs releases use (tasks/platform/storage.py). Dry run by default."""
    from lockgate.tasks.platform.storage import collect, human_bytes

    plan, freed = collect(keep_runs, min_age_hours * 3600, delete and not dry_run)
    if as_json:
        items = [{"path": str(i.path), "bytes": i.size_bytes, "reason": i.reason} for i in plan.items]
        typer.echo(
            json.dumps(
                {
                    "home": str(plan.home),
                    "home_bytes": plan.home_bytes,
                    "items": items,
                    "reclaimable_bytes": plan.freed_bytes,
                    "freed_bytes": freed,
                }
            )
        )
        return
    for item in plan.items:
        typer.echo(f"{human_bytes(item.size_bytes):>9}  {item.path}  ({item.reason})")
    verb = "freed" if freed else "would free (dry run; --delete to delete)"
    typer.echo(
        f"{plan.home}: {human_bytes(plan.home_bytes)}; kept {len(plan.kept_runs)} release run(s); "
        f"{verb} {human_bytes(plan.freed_bytes)} in {len(plan.items)} item(s)"
    )


def register(app: typer.Typer) -> None:
    app.command()(gc)
