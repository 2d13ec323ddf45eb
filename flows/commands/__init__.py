"""The CLI's command groups, one module each; flows/cli.py assembles them into one Typer app."""
