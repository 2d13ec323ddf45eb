"""The one configured logger of lockgate.

Inside a Prefect run, messages also go to the run's logs (Prefect's run logger); outside one they
go to stderr. Modules call ``get_logger(__name__)``.
"""

from __future__ import annotations

import logging
import sys

_ROOT = "lockgate"
_configured = False
#: Third-party loggers that talk at every import or call without saying anything a user acts on:
#: torchao's "Failed to load <CUDA kernel .so>" on CPU machines, torch's pytree deprecation note that
#: torchao triggers.
QUIET_LOGGERS = {
    "torchao": logging.ERROR,
    "torch.utils._pytree": logging.ERROR,
}


def quiet_third_party() -> None:
    """Raise the level of :data:`QUIET_LOGGERS` (before those libraries are imported, which set none)."""
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)


quiet_third_party()  # at import: lockgate's modules import this one before torch or torchao


def configure(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the ``lockgate`` logger (idempotent) and quiet the noisy
    third-party loggers (before they are imported: they configure nothing themselves)."""
    global _configured
    quiet_third_party()
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
