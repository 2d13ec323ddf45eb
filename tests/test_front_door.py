"""The front door against a real server (``bentoml serve``, tiny random Llama): body cap before parsing,
JSON only, unknown fields, bounded fields, the concurrency limit, one log line per refusal. No mocks."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_service import Server, serve

from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.request_log import RequestLog

BODY_CAP = 200_000
CONCURRENCY = 2
PROMPT = "Q: what is 3 plus 4?\nA:"


@pytest.fixture(scope="module")
def server(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServiceConfig.model_validate(
        {
            "limits": {"max_new_tokens": 64, "concurrency": CONCURRENCY, "max_body_bytes": BODY_CAP},
            "batching": {"engine": "static", "max_batch_size": 1, "max_latency_ms": 1},
            "warmup_requests": 1,
        }
    )
    with serve(tiny_llm_dir, tmp_path_factory.mktemp("front-door"), config) as running:
        yield running


def _post(server: Server, endpoint: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/{endpoint}", json=body, timeout=60)


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_unknown_field_is_refused_naming_it(server: Server, endpoint: str) -> None:
    response = _post(server, endpoint, {"prompt": PROMPT, "max_tokens": 50})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["field"] == "max_tokens" and "unknown field" in body["error"]
    assert "max_new_tokens" in body["error"]  # it says what is accepted
    batch = _post(server, "generate_batch", {"requests": [{"prompt": PROMPT, "max_tokens": 50}]})
    assert batch.json()["results"][0]["field"] == "requests.0.max_tokens"
    extra = _post(server, "generate_batch", {"requests": [{"prompt": PROMPT}], "mode": "fast"})
    assert extra.status_code == 400 and extra.json()["field"] == "mode"


def test_oversized_body_is_refused_before_it_is_read(server: Server) -> None:
    huge = json.dumps({"prompt": "x" * 50_000_000}).encode()  # 50 MB, declared in Content-Length
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{server.url}/generate", content=huge, headers={"content-type": "application/json"}, timeout=60
        )
    except httpx.TransportError as exc:  # the server may close while the client is still writing
        pytest.fail(f"no 413 came back: {exc!r}")
    elapsed = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert response.json()["field"] == "body" and str(BODY_CAP) in response.json()["error"]
    print(f"50 MB body refused in {elapsed * 1000:.0f} ms")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"y" * 10_000
        yield b'"}'

    chunked = httpx.post(
        f"{server.url}/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert chunked.status_code == 413, chunked.text


def test_non_json_body_is_refused_naming_the_type(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/generate", content=PROMPT, headers={"content-type": "text/plain"}, timeout=30
    )
    assert response.status_code == 415
    assert response.json()["field"] == "content-type" and "text/plain" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "  \n\t "}, "prompt"),
        ({"prompt": PROMPT, "stop": ["x" * 100_000]}, "stop"),
        ({"prompt": PROMPT, "stop": ["a"] * 20_000}, "stop"),
        ({"prompt": PROMPT, "user_id": "u" * 150_000}, "user_id"),
    ],
)
def test_unbounded_fields_are_refused(server: Server, body: dict[str, object], field: str) -> None:
    response = _post(server, "generate", body)
    assert response.status_code in (413, 422), response.text
    named = response.json()["field"]
    assert named in (field, "body"), response.text
    if response.status_code == 422:
        assert named == field


def test_user_id_over_its_limit_gets_422(server: Server) -> None:
    response = _post(server, "generate", {"prompt": PROMPT, "user_id": "u" * 1000})
    assert response.status_code == 422 and response.json()["field"] == "user_id"


def test_concurrency_limit_is_enforced_with_retry_after(server: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 64, "temperature": 1.0, "seed": 1}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(server, "generate", body), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["field"] == "concurrency"
    assert _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


def test_a_refusal_is_one_structured_log_line(server: Server) -> None:
    before_err = server.stderr.read_text(errors="replace")
    response = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": "many"})
    assert response.status_code == 400
    request_id = response.json()["request_id"]
    time.sleep(0.5)
    new_err = server.stderr.read_text(errors="replace")[len(before_err) :]
    assert "Traceback" not in new_err, new_err
    lines = [ln for ln in server.stdout.read_text(errors="replace").splitlines() if request_id in ln]
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["http_status"] == 400 and line["status"] == "rejected"
    frame = RequestLog(server.request_log).read_frame()
    assert (frame.request_id == request_id).sum() == 1
