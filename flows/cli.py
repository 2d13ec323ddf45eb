"""The ``lockgate`` command line: one Typer app assembled from the command groups in flows/commands/.

Heavy libraries are imported inside commands, so ``validate`` and ``schema`` answer in well under a
second without importing torch, MLflow or BentoML.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lockgate.flows.commands import canary, registry, release, serving, stack, storage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Declarative LLM releases: compress -> evaluate -> package -> canary -> monitor.",
)

for group in (release, registry, canary, serving, stack, storage):
    group.register(app)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lockgate {version('lockgate')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Declarative LLM releases: compress -> evaluate -> package -> canary -> monitor."""


if __name__ == "__main__":
    app()
