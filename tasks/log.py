"""The one configured logger of lockgate.

Inside a Prefect run, messages also go to the run's logs (Prefect's run logger); outside one they
go to stderr. Modules call ``get_logger(__name__)``.
"""

from __future__ import annotations

import logging
import sys

_ROOT = "lockgate"
_configured = False


def configure(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the ``lockgate`` logger (idempotent)."""
    global _configured
    root = logging.getLogger(_ROOT)
    root.setLevel(level)
    if not _configured and not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.propagate = False
        _configured = True


def get_logger(name: str) -> logging.Logger:
    short = name.split(".", 1)[-1] if "." in name else name
    return logging.getLogger(f"{_ROOT}.{short}")


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger when inside a flow or task run, else lockgate's own."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() or TaskRunContext.get():
        return get_run_logger()
    return get_logger(name)
