"""What the service says about itself on its OpenAPI page (``/docs.json``, ``/docs``): what it serves,
its endpoints, lockgate's version and the model. BentoML's own page shows a generic README and the
version ``None`` when served from source; the bento's README (tasks/package.py) reuses the endpoint
list from here, so the two cannot drift apart.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.bentos.config import ServiceEnv

#: The bento label that carries lockgate's version into a bento, where lockgate is not installed (the
#: bento holds the service code only; tasks/package.py sets the label at build time).
LOCKGATE_VERSION_LABEL = "lockgate_version"

SERVICE_TITLE = "lockgate LLM service"

ENDPOINTS = """\
- `POST /generate`: continue a `prompt` or answer chat `messages` (JSON; concurrent calls are
  micro-batched; `timings` and a `Server-Timing` header give the server time per phase)
- `POST /generate_batch`: a list of /generate bodies, answered in order, with per-item errors
- `POST /generate_stream`: the continuation as text chunks
- `/generate_ws`: WebSocket streaming, one message per token
- `GET /capacity`: the KV-cache plan and the queue
- `/v1`: the OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`,
  `GET /v1/models`
- `/readyz` (200 once the model is loaded and warmed up), `/livez`, `/metrics` (Prometheus)
"""


def lockgate_version(bento_labels: dict[str, str] | None = None) -> str:
    """lockgate's installed version; in a bento (lockgate not installed) the version it was built with."""
    try:
        return version("lockgate")
    except PackageNotFoundError:
        return (bento_labels or {}).get(LOCKGATE_VERSION_LABEL, "unknown")


def service_description(env: ServiceEnv) -> str:
    """The OpenAPI description: the model this process serves, then the endpoints."""
    uri = str(env.model_uri) if env.model_uri is not None else "no model URI set"
    return (
        f"Serves the LLM **{env.label_name}** version **{env.label_version}** (`{uri}`, role "
        f"`{env.role}`) through lockgate's BentoML service.\n\n"
        f"Endpoints:\n\n{ENDPOINTS}"
    )
