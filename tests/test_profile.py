"""``lockgate profile`` against a real ``bentoml serve``: per-phase p50/p99 from the service's
Server-Timing header, network = client time - server time. No mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service import Server, serve

from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.profiling import PHASES, Profile, Sample, format_table, parse_server_timing, percentile

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServiceConfig.model_validate(
        {"limits": {"max_new_tokens": 32}, "warmup_requests": 1, "batching": {"max_latency_ms": 5}}
    )
    with serve(tiny_llm_dir, tmp_path_factory.mktemp("profile"), config) as running:
        yield running


def _profile(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from lockgate.flows.cli import app; app()", "profile", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_profile_prints_every_phase_at_p50_and_p99(server: Server, tmp_path: Path) -> None:
    # -f to a missing file: no pipeline to label, the URL alone says what is profiled.
    done = _profile(
        "--url", server.url, "-n", "12", "--concurrency", "2", "--json", "-f", str(tmp_path / "none")
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    phases = report["phases"]
    assert set(phases) == {*PHASES, "total", "client"}
    assert report["failures"] == [] and report["requests"] == 12
    for name, row in phases.items():
        assert 0 <= row["p50_ms"] <= row["p99_ms"], (name, row)
    assert phases["prefill"]["p50_ms"] > 0 and phases["decode"]["p50_ms"] > 0
    # The client waits at least as long as the server works on the request.
    assert phases["client"]["p50_ms"] >= phases["total"]["p50_ms"]
    table = _profile("--url", server.url, "-n", "4", "-f", str(tmp_path / "none"))
    assert table.returncode == 0, table.stderr
    for phase in PHASES:
        assert f"\n{phase} " in table.stdout, table.stdout
    assert "4 requests measured, 0 failed" in table.stdout


def test_profile_drives_the_openai_chat_endpoint(server: Server, tmp_path: Path) -> None:
    done = _profile(
        "--url", server.url, "-n", "6", "--endpoint", "chat", "--json", "-f", str(tmp_path / "none")
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["endpoint"] == "chat" and report["failures"] == []
    phases = report["phases"]
    assert phases["decode"]["p50_ms"] > 0 and phases["client"]["p50_ms"] >= phases["total"]["p50_ms"]


def test_profile_fails_with_the_refusal_when_requests_are_refused(server: Server, tmp_path: Path) -> None:
    done = _profile("--url", server.url, "-n", "2", "--max-new-tokens", "999", "-f", str(tmp_path / "none"))
    assert done.returncode == 1
    assert "HTTP 422" in done.stderr and "max_new_tokens" in done.stderr


def test_server_timing_parsing_and_percentiles() -> None:
    assert parse_server_timing('auth;dur=0.5, queue;desc="wait";dur=2, cache, total;dur=10.25') == {
        "auth": 0.5,
        "queue": 2.0,
        "total": 10.25,
    }
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([5.0, 1.0, 3.0], 99) == 5.0
    result = Profile(
        [Sample(12.0, {"total": 10.0, "decode": 6.0}), Sample(30.0, {"total": 20.0, "decode": 15.0})]
    )
    summary = result.summary()
    assert summary["network"]["p50_ms"] == 2.0 and summary["network"]["p99_ms"] == 10.0
    assert "decode" in format_table(result)
