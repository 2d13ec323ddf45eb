"""The LLM service over real HTTP (``bentoml serve`` subprocess, tiny random Llama), and the runtime's
loaders for torchao and optimum-quanto folders. No mocks."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lockgate.bentos.config import ModelUri, ServiceConfig, ServiceEnv
from lockgate.bentos.processes import stop_service
from lockgate.bentos.request_log import RequestLog
from lockgate.bentos.runtime import load_model, weights_size_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 32
MAX_PROMPT_CHARS = 200
READY_TIMEOUT_S = 60.0
PROMPT = "Q: what is 3 plus 4?\nA:"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    request_log: Path
    stdout: Path
    stderr: Path
    ready_s: float
    readyz_codes: list[int]

    def logs(self) -> str:
        return f"--- stdout ---\n{_tail(self.stdout)}\n--- stderr ---\n{_tail(self.stderr)}"


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    model_dir: Path, workdir: Path, config: ServiceConfig, ready_timeout_s: float = READY_TIMEOUT_S
) -> Iterator[Server]:
    """``bentoml serve bentos.llm_service:LLMService`` on a free port; waits for /readyz; stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    service = ServiceEnv(
        model_uri=ModelUri.folder(model_dir),
        model_name="tiny-llm",
        model_version="7",
        role="canary",
        request_log=workdir / "requests.db",
        config=config,
    )
    env = service.process_env(os.environ)
    env.update(BENTOML_HOME=str(workdir / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    stdout, stderr = workdir / "serve.out", workdir / "serve.err"
    command = [sys.executable, "-m", "bentoml", "serve", "lockgate.bentos.llm_service:LLMService"]
    started = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # own process group: SIGTERM reaches BentoML's worker too
        )
    server = Server(f"http://127.0.0.1:{port}", process, workdir / "requests.db", stdout, stderr, 0.0, [])
    try:
        _wait_ready(server, started, ready_timeout_s)
        yield server
    finally:
        stop_service(process)


def _wait_ready(server: Server, started: float, timeout_s: float) -> None:
    while time.monotonic() - started < timeout_s:
        if server.process.poll() is not None:
            pytest.fail(f"bentoml serve exited with {server.process.returncode}\n{server.logs()}")
        try:
            code = httpx.get(f"{server.url}/readyz", timeout=2).status_code
        except httpx.TransportError:
            code = 0  # not listening yet
        server.readyz_codes.append(code)
        if code == 200:
            server.ready_s = time.monotonic() - started
            return
        time.sleep(0.2)
    pytest.fail(f"/readyz not 200 after {timeout_s:.0f}s\n{server.logs()}")


@pytest.fixture(scope="module")
def server(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServiceConfig.model_validate(
        {
            "limits": {
                "max_new_tokens": MAX_NEW_TOKENS,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "concurrency": 64,
            },
            "batching": {"max_batch_size": 8, "max_latency_ms": 25},
            "warmup_requests": 2,
        }
    )
    with serve(tiny_llm_dir, tmp_path_factory.mktemp("llm-service"), config) as running:
        yield running


def _generate(server: Server, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=60)


def _post_raw(server: Server, endpoint: str, raw: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/{endpoint}", content=raw, headers={"content-type": "application/json"}, timeout=30
    )


def _metric_samples(server: Server, name: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(name)
    ]


# -- readiness -----------------------------------------------------------------------------------


def test_readyz_only_after_load_and_warmup(server: Server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
    # The model loads in the background (torch import + load + 2 warm-up runs take seconds), and
    # /readyz answered 503 meanwhile: the server was up but not yet ready.
    assert 503 in server.readyz_codes, server.readyz_codes
    assert "2 warm-up runs" in server.stdout.read_text(), server.logs()


def test_openapi_page_describes_the_service_and_its_version(server: Server) -> None:
    from importlib.metadata import version

    info = httpx.get(f"{server.url}/docs.json", timeout=10).json()["info"]
    assert info["version"] == version("lockgate")  # BentoML's own: "None" when served from source
    assert info["title"] == "lockgate LLM service (LLMService)"
    description = info["description"]
    assert "**tiny-llm** version **7**" in description and "role `canary`" in description
    for endpoint in ("POST /generate`", "POST /generate_batch`", "POST /v1/chat/completions`", "/readyz"):
        assert endpoint in description, endpoint


# -- happy paths ---------------------------------------------------------------------------------


def test_generate_returns_continuation_and_counts(server: Server) -> None:
    resp = _generate(server, prompt=PROMPT, max_new_tokens=8)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["text"], str) and body["text"]
    assert body["prompt_tokens"] > 0
    assert 1 <= body["output_tokens"] <= 8
    assert body["latency_ms"] > 0
    assert body["model_version"] == "7"
    assert body["request_id"] == resp.headers["x-request-id"]


def _batch_sizes(server: Server) -> tuple[float, float]:
    """(observations of llm_batch_size, observations of size 1)."""
    samples = {(n, labels.get("le")): value for n, labels, value in _metric_samples(server, "llm_batch_size")}
    return samples[("llm_batch_size_count", None)], samples[("llm_batch_size_bucket", "1.0")]


def _concurrently(server: Server, n: int, **body: object) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        return _generate(server, prompt=f"Q: what is {i} plus 2?\nA:", max_new_tokens=4 + i % 5, **body)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    failed = [r.text for r in responses if r.status_code != 200]
    assert not failed, failed
    # Each request is cut to its own budget even when batched with longer ones.
    assert all(r.json()["output_tokens"] <= 4 + i % 5 for i, r in enumerate(responses))
    return responses


@pytest.mark.parametrize(
    ("body", "engine"),
    [({"temperature": 0.0}, "continuous engine"), ({"temperature": 0.8}, "micro-batcher (sampling)")],
)
def test_concurrent_requests_are_batched(server: Server, body: dict[str, float], engine: str) -> None:
    """Greedy requests join the continuous-batching engine; sampling ones are micro-batched. Either
    way llm_batch_size records more than one request decoded together."""
    assert httpx.get(f"{server.url}/capacity", timeout=5).json()["engine"] == "continuous"
    count_before, single_before = _batch_sizes(server)
    _concurrently(server, 20, **body)
    count, single = _batch_sizes(server)
    together = (count - count_before) - (single - single_before)
    assert together >= 1, f"{engine}: no request decoded together with another"


def test_stream_yields_chunks_equal_to_unary_text(server: Server) -> None:
    with httpx.stream(
        "POST", f"{server.url}/generate_stream", json={"prompt": PROMPT, "max_new_tokens": 12}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        chunks = [c for c in resp.iter_text() if c]
    assert len(chunks) >= 2, chunks
    # Greedy decoding: the streamed text is the same continuation /generate returns.
    assert "".join(chunks) == _generate(server, prompt=PROMPT, max_new_tokens=12).json()["text"]


# -- refusals ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (endpoint, raw body, expected status, field named in the body)
    ("generate", b'{"prompt": "unterminated', 400, "body"),
    ("generate", b'{"max_new_tokens": 4}', 400, "prompt"),
    ("generate", b'{"prompt": 12}', 400, "prompt"),
    ("generate", b'{"prompt": "hi", "max_new_tokens": "many"}', 400, "max_new_tokens"),
    ("generate", b'{"prompt": "' + b"x" * (MAX_PROMPT_CHARS + 1) + b'"}', 422, "prompt"),
    ("generate", b'{"prompt": "hi", "max_new_tokens": %d}' % (MAX_NEW_TOKENS + 1), 422, "max_new_tokens"),
    ("generate", b'{"prompt": "hi", "max_new_tokens": 0}', 422, "max_new_tokens"),
    ("generate", b'{"prompt": "hi", "top_p": 0}', 422, "top_p"),
    (
        "generate_stream",
        b'{"prompt": "hi", "max_new_tokens": %d}' % (MAX_NEW_TOKENS + 1),
        422,
        "max_new_tokens",
    ),
    ("generate_stream", b'{"prompt": ["a"]}', 400, "prompt"),
]


@pytest.mark.parametrize(("endpoint", "raw", "status", "field"), BAD_REQUESTS)
def test_bad_request_is_refused_naming_the_field(
    server: Server, endpoint: str, raw: bytes, status: int, field: str
) -> None:
    resp = _post_raw(server, endpoint, raw)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["field"] == field
    assert body["error"].startswith(f"{field}:")
    assert body["request_id"] == resp.headers["x-request-id"]


def test_service_keeps_serving_after_bad_requests(server: Server) -> None:
    for _, raw, _, _ in BAD_REQUESTS:
        _post_raw(server, "generate", raw)
    resp = _generate(server, prompt=PROMPT, max_new_tokens=4)
    assert resp.status_code == 200 and resp.json()["output_tokens"] >= 1


# -- observability -------------------------------------------------------------------------------


def test_metrics_count_requests_by_status(server: Server) -> None:
    assert _generate(server, prompt=PROMPT, max_new_tokens=2).status_code == 200
    assert _generate(server, prompt="").status_code == 422
    counts = {
        labels["status"]: value
        for name, labels, value in _metric_samples(server, "llm_requests_total")
        if name == "llm_requests_total"
    }
    assert counts.get("ok", 0) >= 1 and counts.get("rejected", 0) >= 1, counts
    names = {name for name, _, _ in _metric_samples(server, "llm_")}
    assert {"llm_request_duration_seconds_bucket", "llm_tokens_total"} <= names, names


def test_request_log_has_one_row_per_request_without_raw_text(server: Server) -> None:
    ok = _generate(server, prompt=PROMPT, max_new_tokens=3, user_id="alice")
    too_long = _generate(server, prompt="y" * (MAX_PROMPT_CHARS + 1))
    malformed = _post_raw(server, "generate", b"{")
    with httpx.stream(
        "POST", f"{server.url}/generate_stream", json={"prompt": PROMPT}, timeout=60
    ) as streamed:
        streamed.read()
    frame = RequestLog(server.request_log).read_frame().set_index("request_id")
    expected = {
        ok.headers["x-request-id"]: ("ok", "generate"),
        too_long.headers["x-request-id"]: ("rejected", "generate"),
        malformed.headers["x-request-id"]: ("rejected", "generate"),
        streamed.headers["x-request-id"]: ("ok", "generate_stream"),
    }
    for request_id, (status, endpoint) in expected.items():
        assert frame.loc[request_id, "status"] == status
        assert frame.loc[request_id, "endpoint"] == endpoint
    row = frame.loc[ok.headers["x-request-id"]]
    assert row["user_hash"] == hashlib.sha256(b"alice").hexdigest()[:16]
    assert (row["prompt_chars"], row["prompt_tokens"]) == (len(PROMPT), ok.json()["prompt_tokens"])
    assert row["output_tokens"] == ok.json()["output_tokens"]
    assert row["service_role"] == "canary" and row["model_version"] == "7"
    assert frame.loc[too_long.headers["x-request-id"], "error"].startswith("prompt:")
    # Raw text is only stored with LOCKGATE_LOG_TEXT=1.
    assert frame["prompt"].isna().all() and frame["output"].isna().all()
    assert set(frame["status"]) <= {"ok", "error", "rejected"}


# -- failures inside generation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatched_model_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer (300 ids) with a model of only 100 embeddings: prompts holding an id >= 100
    make the embedding lookup raise inside generate — a real failure, not a mock."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("mismatched")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llm_dir / name, folder / name)
    return folder


def test_generation_error_is_a_json_500_and_service_recovers(
    mismatched_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tokenizer_ids = load_model(mismatched_model_dir).tokenizer
    bad, good = PROMPT, "ab"
    assert max(tokenizer_ids(bad)["input_ids"]) >= 100 and max(tokenizer_ids(good)["input_ids"]) < 100
    # the warm-up prompt would fail too
    config = ServiceConfig.model_validate({"warmup_requests": 0, "limits": {"max_new_tokens": 8}})
    with serve(mismatched_model_dir, tmp_path_factory.mktemp("failing-service"), config) as srv:
        for endpoint in ("generate", "generate_stream"):
            resp = httpx.post(f"{srv.url}/{endpoint}", json={"prompt": bad, "max_new_tokens": 4}, timeout=30)
            assert resp.status_code == 500, resp.text
            assert resp.headers["content-type"] == "application/json"
            error = resp.json()["error"]  # the embedding lookup's IndexError, named by either engine
            assert error.startswith("generation failed:") and "index out of range" in error, error
        assert _generate(srv, prompt=good, max_new_tokens=4).status_code == 200
        statuses = RequestLog(srv.request_log).read_frame()["status"].tolist()
    assert statuses == ["error", "error", "ok"]


# -- runtime loaders -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_dirs(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from optimum.quanto import QuantizedModelForCausalLM, qint8
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    root = tmp_path_factory.mktemp("quantized")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    torchao_model = AutoModelForCausalLM.from_pretrained(
        tiny_llm_dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
    )
    torchao_model.save_pretrained(root / "torchao")
    quanto_model = QuantizedModelForCausalLM.quantize(
        AutoModelForCausalLM.from_pretrained(tiny_llm_dir), weights=qint8, exclude="lm_head"
    )
    quanto_model.save_pretrained(root / "quanto")
    for name in ("torchao", "quanto"):
        tokenizer.save_pretrained(root / name)
    return {"torchao": root / "torchao", "quanto": root / "quanto"}


@pytest.mark.parametrize("method", ["torchao", "quanto"])
def test_load_quantized_folder_generates_and_is_smaller(
    method: str, quantized_dirs: dict[str, Path], tiny_llm_dir: Path
) -> None:
    folder = quantized_dirs[method]
    lm = load_model(folder)
    assert lm.quantization == method and lm.device == "cpu"
    assert hasattr(lm.model, "generate") and not lm.model.training
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    gens = lm.generate([PROMPT, "hi"], max_new_tokens=[6, 3])
    assert [g.output_tokens for g in gens] == [6, 3]
    assert all(g.text and g.prompt_tokens > 0 for g in gens)
    assert weights_size_bytes(folder) < 0.7 * weights_size_bytes(tiny_llm_dir)


def test_runtime_batching_streaming_and_stop_agree(tiny_llm_dir: Path) -> None:
    lm = load_model(tiny_llm_dir)
    assert lm.quantization == "none"
    alone = lm.generate([PROMPT], max_new_tokens=10)[0]
    batched = lm.generate(["a much longer prompt that forces left padding", PROMPT], max_new_tokens=10)[1]
    assert batched.text == alone.text  # left padding is masked: a neighbour changes nothing
    stream = lm.stream(PROMPT, max_new_tokens=10)
    assert "".join(stream) == alone.text and stream.generation is not None
    assert stream.generation.output_tokens == alone.output_tokens
    assert len(alone.text) >= 4, alone
    stop = alone.text[2:4]
    cut = lm.generate([PROMPT], max_new_tokens=10, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and alone.text.startswith(cut.text)
    assert "".join(lm.stream(PROMPT, max_new_tokens=10, stop=[stop])) == cut.text


# -- configuration and accounting, in process ----------------------------------------------------


def test_settings_from_env_parse_and_reject_unknown_keys() -> None:
    folder = ServiceEnv(
        model_uri=ModelUri.folder("/models/qa-int8"),
        config=ServiceConfig.model_validate({"resources": {"gpu": 1}, "batching": {"max_batch_size": 4}}),
        log_text=True,
    )
    settings = ServiceEnv.from_env(folder.to_env())
    assert (settings.label_name, settings.label_version, settings.role) == ("qa-int8", "unknown", "stable")
    assert settings.config.resources.gpu == 1 and settings.config.batching.max_batch_size == 4
    assert settings.log_text and settings.request_log is None
    bad_key = {**ServiceEnv().to_env()}
    bad_key[next(k for k in bad_key if k.endswith("_CONFIG"))] = '{"batching": {"max_batch": 4}}'
    with pytest.raises(ValueError, match=r"(?s)SERVICE_CONFIG.*max_batch"):
        ServiceEnv.from_env(bad_key)
    flag = next(k for k in folder.to_env() if k.endswith("_LOG_TEXT"))
    with pytest.raises(ValueError, match=flag):
        ServiceEnv.from_env({flag: "maybe"})


def test_log_text_stores_prompt_and_output(tmp_path: Path) -> None:
    from lockgate.bentos.accounting import Accounting, RequestRecord
    from lockgate.bentos.protocol import GenerateRequest
    from lockgate.bentos.runtime import Generation

    settings = ServiceEnv(request_log=tmp_path / "r.db", log_text=True)
    accounting = Accounting(settings)
    record = RequestRecord("abc", "generate", time.perf_counter())
    record.describe(GenerateRequest("hello", 4, 0.0, 1.0, None, (), "u1"), settings.log_text)
    record.succeed(Generation(" world", 1, 2, 0.01, 0.005, "length"), settings.log_text)
    accounting.finish(record)
    accounting.finish(record)  # idempotent: still one row
    frame = RequestLog(tmp_path / "r.db").read_frame()
    assert frame[["request_id", "status", "prompt", "output"]].values.tolist() == [
        ["abc", "ok", "hello", " world"]
    ]
