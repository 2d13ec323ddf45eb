"""Shared pieces of the CLI: option types, the one error exit (:func:`fail`), the manual-change lock."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lockgate.tasks.platform.errors import LockgateError, SpecError

if TYPE_CHECKING:
    from collections.abc import Iterator


SpecFile = Annotated[Path, typer.Option("--file", "-f", help="The spec file.")]


JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")]


def cli_trigger() -> str:
    """Who triggered a manual registry change (recorded on the versions and in the history)."""
    return f"cli:{os.environ.get('USER', 'unknown')}"


@contextlib.contextmanager
def manual_change(model: str, action: str) -> Iterator[tuple[str, bool]]:
    """Hold MODEL's release lock for a manual registry change; yields (trigger, replaced) where
    ``replaced`` says a dead release's lock was taken over. A lockgate error exits with its message."""
    from lockgate.tasks.release import lock as release_lock

    trigger = cli_trigger()
    try:
        with release_lock.hold(model, release_lock.owner_label(f"{trigger} {action}")) as (_, replaced):
            yield trigger, replaced
    except LockgateError as exc:
        raise fail(exc) from None


def fail(problem: LockgateError | str, code: int | None = None, verbose: bool = False) -> typer.Exit:
    """The one error exit of the CLI: the problem on stderr (every problem of a bad spec, one per line),
    and the exit code (the error's own: 2 spec, 1 stage; or ``code``). Use as ``raise fail(...)``."""
    if verbose and isinstance(problem, BaseException):
        import traceback

        traceback.print_exception(problem)
    messages = problem.problems if isinstance(problem, SpecError) else [str(problem)]
    for message in messages:
        typer.echo(message, err=True)
    exit_code = code if code is not None else problem.exit_code if isinstance(problem, LockgateError) else 1
    return typer.Exit(exit_code)


def pipeline_name(file: Path, pipeline: str | None) -> str:
    """The pipeline's name (the first when None); a bad spec or name exits 2 with every problem."""
    from lockgate.flows.spec_loader import load_spec

    try:
        return load_spec(file).pipeline(pipeline)[0]
    except SpecError as exc:
        raise fail(exc) from None
    except KeyError as exc:
        raise fail(str(exc.args[0]), code=2) from None


def use_tracking() -> None:
    import mlflow

    from lockgate.tasks.platform.settings import export_environment, get_settings

    export_environment()
    mlflow.set_tracking_uri(get_settings().tracking_uri)
