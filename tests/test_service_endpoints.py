"""Chat messages, the batch endpoint, WebSocket streaming, KV-cache backpressure and phase timings of
the LLM service, over real HTTP/WebSocket against one ``bentoml serve`` (tiny random Llama). No mocks."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_service import Server, serve
from websockets.sync.client import connect

from lockgate.bentos.auth import add_key
from lockgate.bentos.chat import ChatMessage, plain_transcript, render_chat
from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.kv_budget import KVAdmission, KVShape, QueueFull, kv_cache_bytes, kv_shape, plan_budget
from lockgate.bentos.profiling import parse_server_timing
from lockgate.bentos.request_log import RequestLog
from lockgate.tasks.release.serving import start_services

MAX_NEW_TOKENS = 200
MAX_PROMPT_CHARS = 400
MAX_QUEUE = 2
# The tiny Llama: 2 layers x 2 KV heads x head_dim 16 (64 / 4 heads) x 2 (K, V) x 4 bytes (fp32).
BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4
CAPACITY_TOKENS = 600  # three requests of ~12 prompt + 180 new tokens at once
MAX_POSITIONS = 256
PROMPT = "Q: what is 3 plus 4?\nA:"


@pytest.fixture(scope="module")
def server(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServiceConfig.model_validate(
        {
            "limits": {
                "max_new_tokens": MAX_NEW_TOKENS,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "concurrency": 64,
                "max_batch_items": 8,
            },
            "batching": {"max_batch_size": 8, "max_latency_ms": 25},
            "warmup_requests": 1,
            "capacity": {
                "kv_cache_budget_mb": CAPACITY_TOKENS * BYTES_PER_TOKEN / 1e6,
                "max_queue": MAX_QUEUE,
            },
        }
    )
    with serve(tiny_llm_dir, tmp_path_factory.mktemp("endpoints"), config) as running:
        yield running


def _post(server: Server, endpoint: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/{endpoint}", json=body, timeout=60)


def _healthy(server: Server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    resp = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": 2})
    assert resp.status_code == 200, resp.text


def _ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/generate_ws"


def _rows(server: Server) -> dict[str, dict]:
    frame = RequestLog(server.request_log).read_frame()
    return {row["request_id"]: row for row in frame.to_dict("records")}


# -- chat messages -------------------------------------------------------------------------------


def test_chat_messages_use_the_plain_transcript_without_a_template(server: Server) -> None:
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "what is 3 plus 4?"},
    ]
    chat = _post(server, "generate", {"messages": messages, "max_new_tokens": 6})
    assert chat.status_code == 200, chat.text
    # The tiny tokenizer has no chat template: the documented "role: content" join, ending "assistant:".
    transcript = "system: You add numbers.\nuser: what is 3 plus 4?\nassistant:"
    plain = _post(server, "generate", {"prompt": transcript, "max_new_tokens": 6})
    assert (chat.json()["text"], chat.json()["prompt_tokens"]) == (
        plain.json()["text"],
        plain.json()["prompt_tokens"],
    )


CHAT_REFUSALS = [
    ({"max_new_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * MAX_PROMPT_CHARS}]}, 422, "messages"),
]


@pytest.mark.parametrize(("body", "status", "field"), CHAT_REFUSALS)
def test_prompt_xor_messages_refusals_name_the_field(
    server: Server, body: dict, status: int, field: str
) -> None:
    resp = _post(server, "generate", body)
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field and resp.json()["error"].startswith(f"{field}:")


def test_render_chat_uses_the_tokenizer_template_when_there_is_one(tiny_llm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    messages = [ChatMessage(role="user", content="what is 1 plus 2?")]
    assert render_chat(tokenizer, messages) == plain_transcript(
        [{"role": "user", "content": "what is 1 plus 2?"}]
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    )
    assert render_chat(tokenizer, messages) == "<|user|>what is 1 plus 2?<|assistant|>"


# -- batch endpoint ------------------------------------------------------------------------------


def test_batch_answers_in_order_with_per_item_errors(server: Server) -> None:
    items = [
        {"prompt": PROMPT, "max_new_tokens": 5},
        {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS + 1},
        "not an object",
        {"messages": [{"role": "user", "content": "what is 3 plus 4?"}], "max_new_tokens": 3},
        {"prompt": PROMPT, "temperature": "hot"},
    ]
    resp = _post(server, "generate_batch", {"requests": items})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status_code"] for r in results] == [200, 422, 400, 200, 400]
    assert [r.get("field") for r in results] == [
        None, "requests.1.max_new_tokens", "requests.2", None, "requests.4.temperature",
    ]  # fmt: skip
    # The batched item is the same greedy continuation /generate gives alone.
    alone = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": 5}).json()
    assert results[0]["text"] == alone["text"] and results[0]["output_tokens"] == 5
    # Each item is accounted on its own: one request-log row per item, none for the envelope.
    rows = _rows(server)
    batch_id = resp.json()["request_id"]
    assert batch_id not in rows
    statuses = [rows[f"{batch_id}-{i}"]["status"] for i in range(len(items))]
    assert statuses == ["ok", "rejected", "rejected", "ok", "rejected"]
    assert {rows[f"{batch_id}-{i}"]["endpoint"] for i in range(len(items))} == {"generate_batch"}


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (b'{"requests": []}', 422, "requests"),
        (json.dumps({"requests": [{"prompt": "a"}] * 9}).encode(), 422, "requests"),
        (b'{"requests": {"prompt": "a"}}', 400, "requests"),
        (b'{"requests": [', 400, "body"),
    ],
)
def test_bad_batch_envelope_is_refused_naming_the_field(
    server: Server, raw: bytes, status: int, field: str
) -> None:
    resp = httpx.post(
        f"{server.url}/generate_batch", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field
    _healthy(server)


# -- WebSocket -----------------------------------------------------------------------------------


def test_websocket_streams_token_messages_then_done(server: Server) -> None:
    with connect(_ws_url(server)) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_new_tokens": 10}))
        messages = [json.loads(m) for m in ws]  # iteration ends when the server closes (1000)
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 2, kinds
    text = "".join(m["text"] for m in messages if m["type"] == "token")
    unary = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": 10}).json()
    assert text == unary["text"]  # greedy: the same continuation
    done = messages[-1]
    assert done["output_tokens"] == unary["output_tokens"] and done["request_id"] == messages[0]["request_id"]
    assert _rows(server)[done["request_id"]]["status"] == "ok"


def test_websocket_disconnect_stops_generation(server: Server) -> None:
    budget = MAX_NEW_TOKENS
    # A prompt the model does not end early by itself (EOS): it would run the whole budget.
    full = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": budget}).json()
    assert full["finish_reason"] == "length", full
    with connect(_ws_url(server)) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_new_tokens": budget}))
        request_id = json.loads(ws.recv())["request_id"]
        assert json.loads(ws.recv())["type"] == "token"
    # closed after the first token: the server cancels generation after the model's current step
    row = _wait_for_row(server, request_id)
    assert row["status"] == "error" and "client disconnected" in row["error"], row
    assert row["output_tokens"] < budget, row  # the model stopped early: it did not run the budget out
    _healthy(server)


@pytest.mark.parametrize(
    ("message", "status", "field"),
    [
        ("{not json", 400, "body"),
        ('{"prompt": 3}', 400, "prompt"),
        (json.dumps({"prompt": "hi", "max_new_tokens": MAX_NEW_TOKENS + 1}), 422, "max_new_tokens"),
        ('{"prompt": "hi", "colour": "red"}', 400, "colour"),
    ],
)
def test_websocket_bad_request_gets_error_message_naming_the_field(
    server: Server, message: str, status: int, field: str
) -> None:
    with connect(_ws_url(server)) as ws:
        ws.send(message)
        reply = json.loads(ws.recv())
    assert (reply["type"], reply["status"], reply["field"]) == ("error", status, field), reply
    _healthy(server)


def _wait_for_row(server: Server, request_id: str, timeout_s: float = 15) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = _rows(server).get(request_id)
        if row is not None:
            return row
        time.sleep(0.1)
    pytest.fail(f"no request-log row for {request_id}\n{server.logs()}")


# -- KV-cache budget and backpressure ------------------------------------------------------------


def test_capacity_is_reported_from_the_formula(server: Server) -> None:
    plan = httpx.get(f"{server.url}/capacity", timeout=5).json()
    assert plan["bytes_per_token"] == BYTES_PER_TOKEN
    assert (plan["layers"], plan["kv_heads"], plan["head_dim"], plan["dtype_bytes"]) == (2, 2, 16, 4)
    assert plan["capacity_tokens"] == CAPACITY_TOKENS and plan["budget_source"] == "configured"
    assert plan["max_context_tokens"] == MAX_POSITIONS and plan["full_context_requests"] == 2
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert f"llm_kv_cache_capacity_tokens {float(CAPACITY_TOKENS)}" in metrics
    assert "llm_queue_depth " in metrics


def test_request_that_can_never_fit_is_422_naming_max_new_tokens(server: Server) -> None:
    prompt = "x" * 100  # 100 tokens: no merges for "x" in the tiny tokenizer
    resp = _post(server, "generate", {"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS})
    assert resp.status_code == 422 and resp.json()["field"] == "max_new_tokens", resp.text
    assert "must fit 256 tokens" in resp.json()["error"]


def test_full_queue_answers_503_with_retry_after_and_service_recovers(server: Server) -> None:
    def one(i: int) -> httpx.Response:
        return _post(server, "generate", {"prompt": f"Q: what is {i} plus 2?\nA:", "max_new_tokens": 180})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    codes = sorted(r.status_code for r in responses)
    # ~192 tokens each: 3 fit the 600-token cache, MAX_QUEUE more wait, the rest are turned away.
    assert set(codes) <= {200, 503}, [r.text for r in responses if r.status_code not in (200, 503)]
    assert codes.count(200) >= 3 and codes.count(503) >= 1, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert "max_queue" in refused.json()["error"]
    plan = httpx.get(f"{server.url}/capacity", timeout=5).json()
    assert (plan["reserved_tokens"], plan["waiting"]) == (0, 0)  # every reservation was given back
    _healthy(server)


def test_kv_formula_and_admission_fifo() -> None:
    from transformers import Qwen2Config

    # Qwen2-0.5B: 24 layers, 2 KV heads, head_dim 896 / 14 = 64, bf16: 12 KiB per token.
    qwen = kv_shape(Qwen2Config(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                hidden_size=896, max_position_embeddings=32768), dtype_bytes=2)  # fmt: skip
    assert qwen.bytes_per_token == 12 * 1024
    assert kv_cache_bytes(64, 1024, qwen) == 64 * 1024 * 24 * 2 * 64 * 2 * 2
    budget = plan_budget(qwen, budget_mb=None, free_bytes=10**9, max_context_tokens=4096)
    assert budget.capacity_tokens == 10**9 // (12 * 1024) and budget.full_context_requests == 19
    assert plan_budget(KVShape(1, 1, 1, 1, 100), 0.001, 0, 500).max_context_tokens == 100

    import asyncio

    async def scenario() -> list[str]:
        admission = KVAdmission(capacity_tokens=100, max_queue=1)
        order: list[str] = []
        await admission.acquire(60)

        async def wait(name: str, tokens: int) -> None:
            await admission.acquire(tokens)
            order.append(name)

        waiter = asyncio.create_task(wait("b", 50))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await admission.acquire(10)  # b already waits: the queue (1) is full
        admission.release(60)
        await waiter
        return [*order, str(admission.in_use)]

    assert asyncio.run(scenario()) == ["b", "50"]

    async def cancel_and_resize() -> tuple[int, int]:
        admission = KVAdmission(capacity_tokens=100, max_queue=4)
        await admission.acquire(80)
        cancelled = asyncio.create_task(admission.acquire(50))
        too_big = asyncio.create_task(admission.acquire(90))
        await asyncio.sleep(0)
        cancelled.cancel()  # a client that went away while waiting takes no room
        await asyncio.sleep(0)
        admission.resize(60)  # a hot swap to a model with less room: 90 can never fit any more
        with pytest.raises(ValueError, match="exceeds the capacity"):
            await too_big
        admission.release(80)
        return admission.in_use, admission.waiting

    assert asyncio.run(cancel_and_resize()) == (0, 0)


def test_padded_batches_are_split_to_fit_the_cache() -> None:
    import asyncio

    from lockgate.bentos.batching import _Pending, fit_padded_kv
    from lockgate.bentos.protocol import GenerateRequest

    loop = asyncio.new_event_loop()
    try:

        def pending(prompt_tokens: int, budget: int) -> _Pending:
            request = GenerateRequest("p", budget, 0.0, 1.0, None, (), None, prompt_tokens=prompt_tokens)
            return _Pending(request, loop.create_future())

        group = [pending(10, 20), pending(100, 20), pending(12, 20)]
        # Together: 3 rows x (100 + 20) = 360 tokens > 130; the two short prompts: 2 x 32 = 64.
        chunks = fit_padded_kv(group, 130)
        assert [[p.request.prompt_tokens for p in chunk] for chunk in chunks] == [[10, 12], [100]]
        assert fit_padded_kv(group, 360) == [sorted(group, key=lambda p: p.request.prompt_tokens or 0)]
        assert fit_padded_kv(group, None) == [group]
    finally:
        loop.close()


# -- phase timings -------------------------------------------------------------------------------


def test_generate_reports_phase_timings_in_body_and_server_timing(server: Server) -> None:
    resp = _post(server, "generate", {"prompt": PROMPT, "max_new_tokens": 8})
    timings = resp.json()["timings"]
    header = parse_server_timing(resp.headers["server-timing"])
    assert header == timings
    assert set(timings) == {"auth", "tokenize", "queue", "prefill", "decode", "postprocess", "total"}
    assert timings["prefill"] > 0 and timings["decode"] > 0
    parts = sum(v for k, v in timings.items() if k != "total")
    assert parts <= timings["total"] + 1.0, timings  # phases do not overlap (1 ms of rounding)


# -- with API keys -------------------------------------------------------------------------------


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps every POSTed ExportTraceServiceRequest body."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        type(self).bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def otlp_collector() -> Iterator[tuple[str, list[bytes]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", _Collector.bodies
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def keyed(
    tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory, otlp_collector: tuple[str, list[bytes]]
) -> Iterator[tuple[str, str]]:
    """A service with API keys, prices, the response cache and OTLP tracing: (url, key)."""
    root = tmp_path_factory.mktemp("endpoints-keyed")
    key = add_key(root / "keys.json", "team-ws", rate_per_s=100, burst=100)
    config = {
        "pricing": {"prompt_per_1k_tokens": 1.0, "completion_per_1k_tokens": 2.0},
        "warmup_requests": 1,
        "response_cache": {"enabled": True, "max_entries": 64},
        "tracing": {"exporter": "otlp", "endpoint": otlp_collector[0], "export_interval_ms": 100},
    }
    launch = {
        "target": "lockgate.bentos.llm_service:LLMService",
        "role": "stable",
        "model_uri": str(tiny_llm_dir),
        "request_log": root / "requests.db",
        "log_dir": root / "logs",
        "api_keys_file": root / "keys.json",
        "config": ServiceConfig.model_validate(config),
    }
    [service] = start_services([launch])
    try:
        yield service.url, key
    finally:
        service.stop()


def _cache_lookups(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        s.labels["result"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llm_response_cache_total"
    }


def test_response_cache_answers_repeated_greedy_requests(keyed: tuple[str, str]) -> None:
    url, key = keyed
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "Q: what is 17 plus 5?\nA:", "max_new_tokens": 6}
    before = _cache_lookups(url)
    first = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60).json()
    second = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60).json()
    other_budget = httpx.post(
        f"{url}/generate", json={**body, "max_new_tokens": 5}, headers=headers, timeout=60
    )
    sampled = [
        httpx.post(f"{url}/generate", json={**body, "temperature": 0.9}, headers=headers, timeout=60).json()
        for _ in range(2)
    ]
    assert (first["cached"], second["cached"]) == (False, True)
    assert (second["text"], second["output_tokens"], second["confidence"]) == (
        first["text"], first["output_tokens"], first["confidence"],
    )  # fmt: skip
    assert second["timings"]["prefill"] == 0.0 and second["latency_ms"] < first["latency_ms"]
    assert other_budget.json()["cached"] is False, "a different max_new_tokens is another answer"
    assert [r["cached"] for r in sampled] == [False, False], "sampling is never cached"
    after = _cache_lookups(url)
    assert after.get("hit", 0) - before.get("hit", 0) == 1
    assert after.get("miss", 0) - before.get("miss", 0) == 2


def _exported_spans(bodies: list[bytes]) -> list[object]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for body in list(bodies):
        request = ExportTraceServiceRequest.FromString(body)
        spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    return spans


def test_request_phases_are_exported_as_opentelemetry_spans(
    keyed: tuple[str, str], otlp_collector: tuple[str, list[bytes]]
) -> None:
    url, key = keyed
    resp = httpx.post(
        f"{url}/generate",
        json={"prompt": "Q: what is 9 plus 9?\nA:", "max_new_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    request_id = resp.json()["request_id"]
    deadline = time.monotonic() + 15
    root = None
    while root is None and time.monotonic() < deadline:
        time.sleep(0.2)
        spans = _exported_spans(otlp_collector[1])
        root = next(
            (
                s
                for s in spans
                if s.name == "llm.request"
                and any(
                    a.key == "lockgate.request_id" and a.value.string_value == request_id
                    for a in s.attributes
                )
            ),
            None,
        )
    assert root is not None, f"no llm.request span for {request_id} reached the collector"
    children = [s for s in spans if s.parent_span_id == root.span_id]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time_unix_nano)]
    assert names[:6] == ["auth", "tokenize", "queue", "prefill", "decode", "postprocess"], names
    assert all(s.trace_id == root.trace_id for s in children)
    assert all(root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano for s in children)
    assert all(s.end_time_unix_nano <= root.end_time_unix_nano for s in children)
    prefill = next(s for s in children if s.name == "prefill")
    assert prefill.end_time_unix_nano > prefill.start_time_unix_nano, "prefill took no time?"
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["gen_ai.usage.output_tokens"].int_value >= 1
    assert attributes["http.response.status_code"].int_value == 200


def _cost(url: str, customer: str, key: str) -> float:
    # With keys on, the per-customer series are shown only to a caller with a valid key.
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llm_api_cost_dollars_total" and s.labels.get("customer") == customer
    )


def test_websocket_and_batch_use_api_keys_and_cost_accounting(keyed: tuple[str, str]) -> None:
    url, key = keyed
    ws_url = url.replace("http://", "ws://") + "/generate_ws"
    with connect(ws_url) as ws:  # no key: refused at once, before the request is read
        reply = json.loads(ws.recv())
    assert (reply["type"], reply["status"], reply["field"]) == ("error", 401, "authorization"), reply
    before = _cost(url, "team-ws", key)
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_new_tokens": 4}))
        kinds = [json.loads(m)["type"] for m in ws]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    after_ws = _cost(url, "team-ws", key)
    assert after_ws > before
    unauthorised = httpx.post(f"{url}/generate_batch", json={"requests": [{"prompt": PROMPT}]}, timeout=30)
    assert unauthorised.status_code == 401 and unauthorised.json()["field"] == "authorization"
    resp = httpx.post(
        f"{url}/generate_batch",
        json={"requests": [{"prompt": PROMPT, "max_new_tokens": 2}, {"prompt": PROMPT, "max_new_tokens": 3}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert [r["status_code"] for r in resp.json()["results"]] == [200, 200], resp.text
    tokens = sum(r["prompt_tokens"] + 2 * r["output_tokens"] for r in resp.json()["results"])
    # each item priced for its key
    assert _cost(url, "team-ws", key) == pytest.approx(after_ws + tokens / 1000)
