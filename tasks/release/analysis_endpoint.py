"""lockgate's canary analysis as an HTTP endpoint: pass / fail / inconclusive for a version pair.

``GET /analysis?model=M&stable=1&canary=2&window_s=600`` judges the live requests the routers logged
for the two versions in the last ``window_s`` seconds (every replica's log) with the same checks as
a live canary step (tasks/release/analysis.py): sequential checks over every request, window checks
once the canary has ``min_canary_requests``. An Argo Rollouts ``AnalysisTemplate`` (``lockgate export
k8s --rollout``) asks it with a ``web`` metric, so Argo shifts the traffic and lockgate's statistics
decide. ``inconclusive`` while there is not enough canary traffic, with the count in ``message``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from lockgate.tasks.release.analysis import CanaryAnalyzer, combine
from lockgate.tasks.release.live import live_store, row_outcome

if TYPE_CHECKING:
    from lockgate.bentos.live_store import LiveStore
    from lockgate.flows.spec import CanarySpec


def judge_versions(
    model: str, stable: str, canary: str, window_s: float, spec: CanarySpec, store: LiveStore | None = None
) -> dict:
    """The verdict on ``canary`` vs ``stable`` from the live requests of the last ``window_s`` s."""
    rows = (store or live_store(model)).read_rows(model, since=time.time() - window_s)
    arms = {("stable", stable), ("canary", canary)}
    outcomes = [row_outcome(r) for r in rows if (r.role, r.version) in arms]
    canary_out = [o for o in outcomes if o.target == "canary"]
    stable_out = [o for o in outcomes if o.target == "stable"]
    analyzer = CanaryAnalyzer.for_spec(spec)
    analyzer.observe_all(outcomes)
    need = spec.min_canary_requests
    failing = analyzer.sequential_failure()
    if failing:
        checks, verdict = failing, "fail"
    elif len(canary_out) < need:
        checks, verdict = (), "inconclusive"
    else:
        checks = analyzer.judge_window(canary_out, stable_out, need)
        verdict = combine(checks)
    message = (
        f"waiting for traffic: {len(canary_out)}/{need} canary requests"
        if not failing and len(canary_out) < need
        else "; ".join(f"{c.name}: {c.message}" for c in checks if c.verdict != "pass") or "all checks pass"
    )
    return {
        "model": model,
        "stable": stable,
        "canary": canary,
        "window_s": window_s,
        "verdict": verdict,
        "message": message,
        "canary_requests": len(canary_out),
        "stable_requests": len(stable_out),
        "checks": [_clean(asdict(c)) for c in checks],
    }


def _clean(check: dict) -> dict:
    """JSON has no NaN: an untested number becomes null."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in check.items()}


def create_app(spec: CanarySpec, store: LiveStore | None = None):  # -> Starlette
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def analysis(request: Request) -> JSONResponse:
        params = request.query_params
        missing = [name for name in ("model", "stable", "canary") if not params.get(name)]
        if missing:
            return JSONResponse(
                {"error": f"missing query parameter(s): {', '.join(missing)}"}, status_code=422
            )
        try:
            window_s = float(params.get("window_s", "600"))
        except ValueError:
            return JSONResponse({"error": "window_s must be a number of seconds"}, status_code=422)
        if not 0 < window_s <= 7 * 86_400:
            return JSONResponse({"error": "window_s must be in (0, 604800]"}, status_code=422)
        body = judge_versions(params["model"], params["stable"], params["canary"], window_s, spec, store)
        return JSONResponse(body)

    async def livez(_request: Request) -> JSONResponse:
        return JSONResponse({"alive": True})

    return Starlette(routes=[Route("/analysis", analysis), Route("/livez", livez)])
