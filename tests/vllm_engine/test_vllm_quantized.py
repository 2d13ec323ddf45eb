"""vLLM serves a lockgate-quantized candidate: the service exports lockgate's INT4 folder as a
compressed-tensors checkpoint (bentos/compressed_export.py) and vLLM loads it with its own kernels
(CPU: CPUWNA16LinearKernel), instead of the candidate falling back to transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_service import Server, serve

from conftest import IN_SERVING_ENV, build_tiny_model, quantize_folder
from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.quantized import QuantScheme

pytestmark = [pytest.mark.vllm, pytest.mark.slow, IN_SERVING_ENV]

READY_TIMEOUT_S = 900.0


def _all_logs(server: Server) -> str:
    return server.stdout.read_text(errors="replace") + server.stderr.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    parent = build_tiny_model(tmp_path_factory.mktemp("tiny-parent"), heads=2, kv_heads=1)
    int4 = QuantScheme(bits=4, granularity="group", group_size=32)
    candidate = quantize_folder(parent, tmp_path_factory.mktemp("tiny-int4") / "int4", int4)
    config = ServiceConfig.model_validate(
        {
            "engine": "auto",  # auto must now choose vLLM for a lockgate-quantized folder
            "limits": {"max_new_tokens": 16, "max_prompt_chars": 200},
            "capacity": {"kv_cache_budget_mb": 16},
            "warmup_requests": 1,
        }
    )
    with serve(candidate, tmp_path_factory.mktemp("vllm-int4"), config, READY_TIMEOUT_S) as running:
        yield running


def test_a_lockgate_int4_candidate_is_served_by_vllm(server: Server) -> None:
    plan = httpx.get(f"{server.url}/capacity", timeout=10).json()
    assert plan["engine"] == "vllm", plan
    logs = _all_logs(server)
    assert "served by vLLM as compressed-tensors" in logs, server.logs()
    answers = [
        httpx.post(
            f"{server.url}/generate",
            json={"prompt": "Q: what is 2 plus 3?\nA:", "max_new_tokens": 8},
            timeout=60,
        )
        for _ in range(2)
    ]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    first, second = (a.json() for a in answers)
    assert first["output_tokens"] >= 1 and first["text"] == second["text"]  # greedy: the same answer


def test_the_export_is_cached_in_the_model_cache(server: Server) -> None:
    logs = _all_logs(server)
    line = next(ln for ln in logs.splitlines() if "served by vLLM as compressed-tensors" in ln)
    folder = Path(line.rsplit(": ", 1)[1].strip())
    assert (folder / "model.safetensors").is_file() and (folder / "lockgate_source.json").is_file()
