"""The production entry point: a router in front of one LLM service per model version.

Clients call the router (`lockgate serve`); it serves the Production version and, while a canary is in
progress, sends the share of live requests the registry holds for the candidate (bentos/rollout.py) to
the candidate's service. Each replica polls the registry every ``poll_s`` seconds, so N replicas
route alike within one poll interval, and a restarted replica restores the share from the registry
before it says ready.

Why a router in front of per-version services, not both versions in one service (and not BentoML
composition): a failover needs a stable that does not share the candidate's fate — a candidate that
crashes, leaks memory, wedges its event loop or saturates its batcher inside the same process takes
stable down with it, and "zero failed user requests" becomes impossible. Separate processes also keep
each version's resources, request log, metrics and hot-swap exactly as the single service has them
(bentos/llm_service.py is unchanged), and are what Argo Rollouts / Flagger / KServe do (pods per
version, weighted routing in front). BentoML's composition (``bentoml.depends``) wires services
fixed at build time inside one deployment; the versions here are chosen at run time from the
registry, so the router is a small Starlette app (one HTTP hop on loopback, measured by
bench/bench_live_canary.py).

Sticky routing: the user id (body ``user_id``, or the OpenAI API's ``user``) or a session header
(``x-lockgate-session``) is consistently hashed (bentos/rollout.py ``choose_role``); requests without
either are routed by weight. Every response names who answered: headers ``x-lockgate-version``,
``x-lockgate-role``, ``x-lockgate-failover``, ``x-lockgate-replica``, and a ``lockgate_route`` field in
a JSON body.

Streams (``/generate_stream``, ``/v1/...`` with ``stream: true``): a backend's 200 answer that is not
JSON is passed through chunk by chunk as it arrives, never read in full first; its live-log row is
written when the stream ends (time to the first chunk, and the tokens an SSE ``usage`` chunk reports).
A stream fails over only before its first byte; one that breaks later is logged as the arm's failure.

The OpenAI API: ``/v1/chat/completions`` and ``/v1/completions`` are routed like ``/generate``;
``GET /v1/models`` lists the served versions (Production, and the candidate while it has a share),
each as its own service describes itself, with the role and version this router routes it as. A
request whose ``model`` pins a served version (``NAME:VERSION``, as the list gives it) goes to that
version whatever its user's bucket (the service then gets the plain name: the router resolved the pin;
failed over, Production answers it like any canary request).

Failover: a request the candidate cannot answer (connection refused or dropped, timeout, 5xx, 429) is
sent to stable within the same request; the row logged for it records the candidate's own failed
attempt (what the analysis judges) and that stable answered.

Backends: either fixed URLs per version (``LOCKGATE_ROUTER_BACKENDS``, e.g. services a platform runs)
or, by default, services the router starts itself with ``bentoml serve`` for each version it needs
(Production, the candidate, the previous Production while a promotion is watched); a version's
service is used only once it is ready, and one no longer needed is stopped after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lockgate.bentos import openai_protocol as oai
from lockgate.bentos.config import ModelUri, ServiceEnv
from lockgate.bentos.live_log import BackgroundLiveLog
from lockgate.bentos.processes import stop_service
from lockgate.bentos.request_log import hash_user
from lockgate.bentos.rollout import (
    LiveRow,
    Role,
    Rollout,
    WeightedSequence,
    choose_role,
    rollout_from_registry,
)
from lockgate.bentos.router_answers import (
    AnswerStats,
    BackendAnswer,
    Routed,
    body_stats,
    json_body,
    pass_through,
)
from lockgate.bentos.router_settings import RouterSettings

log = logging.getLogger("lockgate.router")
SESSION_HEADER = "x-lockgate-session"
#: Canary answers the router does not show a user: the same request goes to stable instead.
FAILOVER_STATUS = frozenset({429, *range(500, 600)})


def read_rollout(model: str, client: Any = None) -> Rollout:
    """The routing the registry holds now: one registry call (tags and aliases of the model)."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    registered = client.get_registered_model(model)
    return rollout_from_registry(model, dict(registered.tags), dict(registered.aliases))


# ------------------------------------------------------------------------------------- backends
@dataclass
class _Spawned:
    version: str
    url: str
    process: subprocess.Popen
    ready: bool = False
    unneeded_since: float | None = None


@dataclass
class Backends:
    """Version → service URL. Fixed (``urls``) or started on demand (``spawn``)."""

    settings: RouterSettings
    urls: dict[str, str] = field(default_factory=dict)
    spawned: dict[str, _Spawned] = field(default_factory=dict)

    @property
    def spawning(self) -> bool:
        return self.settings.backends is None

    def url(self, version: str | None) -> str | None:
        """The URL of a version's service once it is ready; None before (or without one)."""
        if version is None:
            return None
        if not self.spawning:
            return (self.settings.backends or {}).get(version)
        service = self.spawned.get(version)
        return service.url if service is not None and service.ready else None

    def ensure(self, versions: set[str], client: httpx.Client) -> None:
        """Start services for ``versions``, mark the started ones ready, stop unneeded ones (blocking:
        called from a worker thread)."""
        if not self.spawning:
            return
        now = time.monotonic()
        for version in versions:
            if version not in self.spawned or self.spawned[version].process.poll() is not None:
                self.spawned[version] = self._launch(version)
            self.spawned[version].unneeded_since = None
        for version, service in list(self.spawned.items()):
            if not service.ready and service.process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    service.ready = client.get(f"{service.url}/readyz", timeout=2).status_code == 200
            if version not in versions:
                service.unneeded_since = service.unneeded_since or now
                if now - service.unneeded_since >= self.settings.stop_grace_s:
                    stop_service(service.process)
                    del self.spawned[version]

    def _launch(self, version: str) -> _Spawned:
        with socket.socket() as sock:
            sock.bind((self.settings.host, 0))
            port = int(sock.getsockname()[1])
        log_dir = self.settings.live_log_dir / "services"
        log_dir.mkdir(parents=True, exist_ok=True)
        # The router's own service settings (config, request log, keys...) with this version pinned.
        service = ServiceEnv.from_env(os.environ).model_copy(
            update={
                "model_uri": ModelUri.version(self.settings.model, version),
                "model_name": self.settings.model,
                "model_version": version,
            }
        )
        env = service.process_env(os.environ)
        command = [self.settings.service_python, "-m", "bentoml", "serve", self.settings.service_target]
        command += ["--host", self.settings.host, "--port", str(port)]
        with (log_dir / f"v{version}-{port}.log").open("w") as sink:
            process = subprocess.Popen(
                command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        return _Spawned(version, f"http://{self.settings.host}:{port}", process)

    def stop_all(self) -> None:
        for service in self.spawned.values():
            stop_service(service.process)
        self.spawned.clear()


# --------------------------------------------------------------------------------------- router
@dataclass(frozen=True)
class _Attempt:
    response: BackendAnswer | None
    error: str | None
    latency_ms: float

    @property
    def answered(self) -> bool:
        return self.response is not None and self.response.status_code not in FAILOVER_STATUS


class Router:
    """Routing state of one replica: the registry's rollout, the backends and the live log."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.rollout = Rollout(settings.model, None)
        self.backends = Backends(settings)
        self.live_log = BackgroundLiveLog(settings.live_store().writer(settings.replica))
        self.polled_at: float | None = None
        self.poll_error: str | None = None
        self.poll_ms: float | None = (
            None  # how long the last registry read took (a slow registry delays routing)
        )
        self._client: Any = None  # aiohttp.ClientSession, opened in start()
        self._probe = httpx.Client(timeout=2)
        self._registry: Any = None
        self._weights = WeightedSequence()

    # -- registry ---------------------------------------------------------------------------
    def refresh(self) -> Rollout:
        """Read the registry once and bring the backends in line (blocking: run in a thread)."""
        started = time.perf_counter()
        try:
            if self._registry is None:  # one client for every poll: no store set-up per read
                from mlflow import MlflowClient

                self._registry = MlflowClient()
            rollout = read_rollout(self.settings.model, self._registry)
            self.poll_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # the registry being down must not stop serving
            # Keep routing as last known: a registry outage is no reason to change traffic.
            self.poll_error = f"{type(exc).__name__}: {exc}"
            log.warning("registry poll of %s failed, routing as before: %s", self.settings.model, exc)
            return self.rollout
        self.backends.ensure({v for v in (rollout.stable, rollout.candidate) if v}, self._probe)
        self.rollout, self.polled_at, self.poll_error = rollout, time.time(), None
        self._heartbeat()
        return rollout

    @property
    def heartbeat_path(self) -> Path:
        return self.settings.live_log_dir / "routers" / f"{self.settings.replica}.json"

    def _heartbeat(self) -> None:
        """Tell the release flow a production router is running (it then runs the canary live)."""
        path = self.heartbeat_path
        path.parent.mkdir(parents=True, exist_ok=True)
        beat = {"replica": self.settings.replica, "pid": os.getpid(), "polled_at": self.polled_at}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**beat, "poll_s": self.settings.poll_s}))
        os.replace(tmp, path)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.settings.poll_s)

    @property
    def ready(self) -> bool:
        return self.polled_at is not None and self.backends.url(self.rollout.stable) is not None

    # -- requests ---------------------------------------------------------------------------
    async def _call(
        self, url: str, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
    ) -> _Attempt:
        """One backend call. A 200 that is not JSON is a stream: returned open, its body unread."""
        import aiohttp

        assert self._client is not None
        started = time.perf_counter()
        try:
            response = await self._client.request(method, f"{url}{path}", data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:  # refused, dropped, timed out
            return _Attempt(None, type(exc).__name__, (time.perf_counter() - started) * 1000)
        content_type = response.headers.get("content-type", "")
        if response.status == 200 and "json" not in content_type:
            answer = BackendAnswer(response.status, b"", content_type, stream=response)
            return _Attempt(answer, None, (time.perf_counter() - started) * 1000)
        try:
            content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:  # dropped while sending its answer
            return _Attempt(None, type(exc).__name__, (time.perf_counter() - started) * 1000)
        finally:
            response.release()
        answer = BackendAnswer(response.status, content, content_type)
        return _Attempt(answer, None, (time.perf_counter() - started) * 1000)

    async def handle(self, path: str, body: bytes, headers: Mapping[str, str]) -> Routed:
        """Route one live request: the answer for the client (a stream is passed on as it comes)."""
        started = time.perf_counter()
        rollout = self.rollout
        key = _routing_key(body, headers)
        pinned = _pinned_version(path, body)
        if pinned is not None and pinned in (rollout.stable, rollout.candidate):
            # `model: NAME:VERSION` (as GET /v1/models lists it) asks for that version, not for a share.
            role, sticky = ("stable" if pinned == rollout.stable else "canary"), False
        else:
            role, sticky = choose_role(key, rollout.share if rollout.routing else 0.0, self._weights)
        version = rollout.candidate if role == "canary" else rollout.stable
        url = self.backends.url(version)
        if role == "canary" and url is None:  # candidate not (yet) served here: stable answers
            role, version, url = "stable", rollout.stable, self.backends.url(rollout.stable)
        if url is None or version is None:
            return self._not_serving(path)
        forward = _forwarded_headers(headers)
        if pinned is not None and pinned == version:
            body = _unpinned(body)  # chosen here: the service gets its plain name
        attempt = await self._call(url, path, body, forward)
        final, answered_version, answered_role = attempt, version, role
        failover = False
        if role == "canary" and not attempt.answered:
            stable_url = self.backends.url(rollout.stable)
            if stable_url is not None:
                failover = True
                final = await self._call(stable_url, path, body, forward)
                answered_version, answered_role = rollout.stable, "stable"
        out_headers = {
            "x-lockgate-version": str(answered_version),
            "x-lockgate-role": answered_role,
            "x-lockgate-failover": "1" if failover else "0",
            "x-lockgate-replica": self.settings.replica,
        }
        if final.response is not None:
            out_headers["content-type"] = final.response.content_type or "application/json"

        def log(stats: AnswerStats, stream_error: str | None = None) -> None:
            self._log(
                rollout, version, role, sticky, key, attempt, final, failover, answered_version, started,
                stats, stream_error,
            )  # fmt: skip

        if final.response is not None and final.response.stream is not None:
            out_headers["cache-control"] = "no-cache"
            chunks = pass_through(final.response.stream, started, log)
            return Routed(200, out_headers, chunks=chunks)
        status = final.response.status_code if final.response is not None else 502
        payload = final.response.content if final.response is not None else b""
        parsed = json_body(final.response)
        route = {
            "version": answered_version,
            "role": answered_role,
            "failover": failover,
            "replica": self.settings.replica,
        }
        if isinstance(parsed, dict):
            payload = json.dumps({**parsed, "lockgate_route": route}).encode()
        elif final.response is None:
            payload = json.dumps({"error": f"no answer: {final.error}", "lockgate_route": route}).encode()
        arm_body = json_body(attempt.response) if attempt.answered else None
        log(body_stats(arm_body))
        return Routed(status, out_headers, payload)

    def _not_serving(self, path: str) -> Routed:
        message = f"no version of {self.settings.model} is being served yet"
        detail = oai.error_object(503, message, None) if path.startswith("/v1/") else {"error": message}
        headers = {"retry-after": "1", "content-type": "application/json"}
        return Routed(503, headers, json.dumps(detail).encode())

    async def models(self, headers: Mapping[str, str]) -> Routed:
        """``GET /v1/models``: Production and, while it has a share, the candidate, each as its service
        names itself (the id its requests take) with the role and version the router routes it as.
        Each service answers through its own auth: a caller without a valid key is refused here too."""
        rollout = self.rollout
        served: list[tuple[str, str]] = [("stable", rollout.stable)] if rollout.stable else []
        if rollout.routing and rollout.candidate and self.backends.url(rollout.candidate) is not None:
            served.append(("canary", rollout.candidate))
        if not served or self.backends.url(rollout.stable) is None:
            return self._not_serving("/v1/models")
        forward = _forwarded_headers(headers)
        calls = [self._call(self.backends.url(v) or "", "/v1/models", b"", forward, "GET") for _, v in served]
        entries: list[oai.ServedModel] = []
        for (role, version), attempt in zip(served, await asyncio.gather(*calls), strict=True):
            answer = attempt.response
            if answer is None or answer.status_code != 200:
                if role == "canary":  # its share is answered by Production: not a served version now
                    log.warning("candidate %s did not list its models: %s", version, attempt.error or answer)
                    continue
                if answer is None:
                    error = oai.error_object(502, f"Production did not answer: {attempt.error}", None)
                    return Routed(502, {"content-type": "application/json"}, json.dumps(error).encode())
                return Routed(answer.status_code, {"content-type": answer.content_type}, answer.content)
            listed = json_body(answer)
            data = listed.get("data", []) if isinstance(listed, dict) else []
            for model in data:
                ready = bool((model.get("metadata") or {}).get("ready", True))
                entries.append(oai.served_model(str(model["id"]), role, version, ready))
        headers_out = {"content-type": "application/json", "x-lockgate-replica": self.settings.replica}
        return Routed(200, headers_out, json.dumps(oai.models_list(entries)).encode())

    def _log(
        self,
        rollout: Rollout,
        version: str,
        role: Role,
        sticky: bool,
        key: str | None,
        attempt: _Attempt,
        final: _Attempt,
        failover: bool,
        answered_version: str | None,
        started: float,
        stats: AnswerStats,
        stream_error: str | None = None,
    ) -> None:
        arm_ok = attempt.answered and not (stream_error is not None and final is attempt)
        final_ok = final.answered and stream_error is None
        outcome = "ok" if arm_ok else "failover" if failover and final_ok else "failed"
        self.live_log.put(
            LiveRow(
                ts=time.time(),
                request_id=uuid.uuid4().hex,
                replica=self.settings.replica,
                model_name=rollout.model,
                version=version,
                role=role,
                sticky=sticky,
                user_hash=hash_user(key),
                outcome=outcome,
                arm_ok=arm_ok,
                status_code=attempt.response.status_code if attempt.response is not None else 0,
                latency_ms=attempt.latency_ms,
                total_ms=(time.perf_counter() - started) * 1000,
                answered_version=answered_version if final_ok else None,
                ttft_ms=stats.ttft_ms,
                output_tokens=stats.output_tokens,
                empty=stats.empty,
                error=attempt.error or stream_error,
            )
        )

    async def start(self) -> None:
        # aiohttp, not httpx, on the hot path: its client costs a fraction of httpx.AsyncClient's per
        # request (bench/bench_live_canary.py measures the router's added latency).
        import aiohttp

        # The timeout bounds each wait for the backend (its answer, or a stream's next chunk), not the
        # whole exchange: a stream may run longer than one timeout while it keeps sending.
        timeout_s = self.settings.timeout_s
        self._client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s),
            connector=aiohttp.TCPConnector(limit=512),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._probe.close()
        await asyncio.to_thread(self.backends.stop_all)
        await asyncio.to_thread(self.live_log.close)
        self.heartbeat_path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        return {
            "replica": self.settings.replica,
            "rollout": asdict(self.rollout),
            "routing": self.rollout.routing,
            "backends": {v: self.backends.url(v) for v in (self.rollout.stable, self.rollout.candidate) if v},
            "services": {
                v: {"url": sp.url, "ready": sp.ready, "pid": sp.process.pid}
                for v, sp in self.backends.spawned.items()
            },
            "polled_at": self.polled_at,
            "poll_error": self.poll_error,
            "poll_ms": self.poll_ms,
            "poll_s": self.settings.poll_s,
        }


def _forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    forward = {"content-type": headers.get("content-type", "application/json")}
    if "authorization" in headers:
        forward["authorization"] = headers["authorization"]
    return forward


def _routing_key(body: bytes, headers: Mapping[str, str]) -> str | None:
    """The user id of a JSON body (``user_id``; the OpenAI API's ``user``), else the session header,
    else None (routed by weight)."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body) if body else None
        if isinstance(parsed, dict):
            user = parsed.get("user_id") or parsed.get("user") or (parsed.get("request") or {}).get("user_id")
            if isinstance(user, str | int) and str(user):
                return str(user)
    return headers.get(SESSION_HEADER) or None


def _openai_model(path: str, body: bytes) -> str | None:
    if not path.startswith("/v1/") or not body:
        return None
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body)
        model = parsed.get("model") if isinstance(parsed, dict) else None
        return model if isinstance(model, str) else None
    return None


def _pinned_version(path: str, body: bytes) -> str | None:
    """The version an OpenAI request pins with ``model: NAME:VERSION``, else None (the share decides)."""
    model = _openai_model(path, body)
    return model.rsplit(":", 1)[1] if model is not None and ":" in model else None


def _unpinned(body: bytes) -> bytes:
    parsed = json.loads(body)
    parsed["model"] = str(parsed["model"]).rsplit(":", 1)[0]
    return json.dumps(parsed).encode()


# ------------------------------------------------------------------------------------------ app
def create_app(settings: RouterSettings | None = None):  # -> Starlette (imported lazily)
    """The ASGI app (``uvicorn --factory lockgate.bentos.router:create_app``)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    router = Router(settings or RouterSettings.from_env())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        await router.start()
        await asyncio.to_thread(router.refresh)  # routing restored from the registry before serving
        poller = asyncio.create_task(router.poll_forever())
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await router.close()

    def respond(routed: Routed) -> Response:
        if routed.chunks is not None:
            return StreamingResponse(routed.chunks, status_code=routed.status, headers=routed.headers)
        return Response(routed.body, status_code=routed.status, headers=routed.headers)

    async def forward(request: Request) -> Response:
        body = await request.body()
        return respond(await router.handle(request.url.path, body, request.headers))

    async def models(request: Request) -> Response:
        return respond(await router.models(request.headers))

    async def livez(_request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(_request: Request) -> Response:
        code = 200 if router.ready else 503
        return JSONResponse({"ready": router.ready, **router.describe()}, status_code=code)

    async def rollout(_request: Request) -> Response:
        return JSONResponse(router.describe())

    app = Starlette(
        routes=[
            Route("/livez", livez, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/rollout", rollout, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/{path:path}", forward, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.router = router
    return app
