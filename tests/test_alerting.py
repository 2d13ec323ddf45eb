"""Alerting against real tools and a real HTTP receiver: promtool/amtool on the generated files, a
promtool rule unit test that HighLatency fires, throttling that survives a restart, webhook delivery
with retries, and a dead receiver whose alerts are spooled and delivered later."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lockgate.flows.spec import AlertingSpec, MonitorSpec, ThrottleSpec, WebhookSpec
from lockgate.tasks.monitoring.alerting import (
    Alert,
    AlertDeliveryError,
    Alerter,
    AlertThrottle,
    WebhookNotifier,
    write_alerting_files,
    write_gauges,
)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records JSON bodies; fails the first ``fail_first`` POSTs."""

    def __init__(self, port: int = 0, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.attempts = 0
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.attempts += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.attempts <= outer.fail_first:
                    self.send_response(503)
                else:
                    outer.bodies.append(body)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alert(name: str = "DataDrift", pipeline: str = "demo", detector: str = "data_drift") -> Alert:
    return Alert(name, "warning", pipeline, detector, "drift share 0.80", {"share": 0.8})


# ------------------------------------------------------------------------------------------ rules
def test_generated_rules_and_routes_pass_promtool_and_amtool(tmp_path: Path) -> None:
    files = write_alerting_files(tmp_path, "demo", "demo-llm", MonitorSpec())
    rules = yaml.safe_load(files.rules.read_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {"HighLatency", "HighErrorRate", "GpuMemoryGrowth", "DataDrift", "DetectorAlarm"}
    assert "llm_request_duration_seconds_bucket" in by_name["HighLatency"]["expr"]
    assert by_name["HighLatency"]["for"] == "5m" and by_name["HighLatency"]["expr"].endswith("> 5")
    assert 'status="error"' in by_name["HighErrorRate"]["expr"]
    assert "llm_memory_usage_bytes" in by_name["GpuMemoryGrowth"]["expr"]
    assert by_name["DataDrift"]["expr"] == 'lockgate_drift_share{pipeline="demo"} >= 0.5'
    routes = yaml.safe_load(files.alertmanager.read_text())
    assert {r["name"] for r in routes["receivers"]} == {"critical", "warning"}
    assert routes["route"]["routes"][0] == {
        "receiver": "critical",
        "matchers": ['severity="critical"'],
        "continue": False,
    }
    for tool in ("promtool", "amtool"):
        if shutil.which(tool) is None:
            assert any(tool in s for s in files.skipped)
        else:
            assert tool in files.checked_with


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_high_latency_rule_fires_after_five_minutes_of_slow_p99(tmp_path: Path) -> None:
    files = write_alerting_files(tmp_path, "demo", "demo-llm", MonitorSpec())
    sel = 'llm_request_duration_seconds_bucket{model="demo-llm",operation="generate"'
    # 10 requests/min, all slower than 5 s (le=5 never grows) vs all fast (everything under 0.1 s).
    series = [
        {"series": f'{sel},le="0.1"}}', "values": "0+0x20"},
        {"series": f'{sel},le="5.0"}}', "values": "0+0x20"},
        {"series": f'{sel},le="10.0"}}', "values": "0+10x20"},
        {"series": f'{sel},le="+Inf"}}', "values": "0+10x20"},
    ]
    test = {
        "rule_files": [files.rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "HighLatency", "exp_alerts": []},  # pending: `for: 5m`
                    {
                        "eval_time": "7m",
                        "alertname": "HighLatency",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "pipeline": "demo",
                                    "model": "demo-llm",
                                },
                                "exp_annotations": {
                                    "summary": "demo-llm: p99 latency above 5s",
                                    "description": "p99 latency over 5m: 9.95s.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    proc = subprocess.run(
        ["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gauges_are_prometheus_text(tmp_path: Path) -> None:
    path = write_gauges(tmp_path / "m.prom", "demo", 0.75, {"data_drift": True, "concept_drift": False})
    text = path.read_text()
    assert 'lockgate_drift_share{pipeline="demo"} 0.75' in text
    assert 'lockgate_detector_alarm{detector="data_drift",pipeline="demo"} 1.0' in text
    assert 'lockgate_detector_alarm{detector="concept_drift",pipeline="demo"} 0.0' in text


# ------------------------------------------------------------------------------------- throttling
def test_throttle_deduplicates_per_key_and_window_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    spec = ThrottleSpec(window_s=600, max_alerts=2, group_by=("alertname", "pipeline"))
    throttle = AlertThrottle(db, spec)
    t0 = 1_000_000.0
    assert throttle.admit(_alert(), t0) == (True, 0)
    assert throttle.admit(_alert(detector="other"), t0 + 1) == (True, 0)  # detector not in the key
    assert throttle.admit(_alert(), t0 + 2) == (False, 0)
    assert throttle.admit(_alert(pipeline="other"), t0 + 3) == (True, 0)  # another key
    restarted = AlertThrottle(db, spec)
    assert restarted.admit(_alert(), t0 + 4) == (False, 1)
    # After the window the key may alert again; it reports how many were held back meanwhile.
    assert restarted.admit(_alert(), t0 + 601) == (True, 2)
    assert restarted.admit(_alert(), t0 + 603) == (True, 0)  # 1 sent in (3, 603]: room for one more


# --------------------------------------------------------------------------------------- webhook
def test_webhook_delivers_json_and_retries_server_errors(tmp_path: Path) -> None:
    flaky = Receiver(fail_first=2)
    try:
        notifier = WebhookNotifier(
            WebhookSpec(url=flaky.url, retries=3, backoff_s=0.01), tmp_path / "spool.jsonl"
        )
        delivery = notifier.send(_alert())
    finally:
        flaky.close()
    assert delivery.delivered and delivery.attempts == 3 and delivery.status == 200
    (body,) = flaky.bodies
    assert body["alerts"][0]["labels"] == {
        "alertname": "DataDrift",
        "severity": "warning",
        "pipeline": "demo",
        "detector": "data_drift",
    }
    assert json.loads(body["alerts"][0]["annotations"]["details"]) == {"share": 0.8}
    assert not (tmp_path / "spool.jsonl").exists()


def test_dead_receiver_spools_alerts_and_next_send_delivers_them_in_order(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here: connection refused
    spool = tmp_path / "spool.jsonl"
    notifier = WebhookNotifier(
        WebhookSpec(url=f"http://127.0.0.1:{port}/hook", retries=1, backoff_s=0.01, timeout_s=1), spool
    )
    first = notifier.send(_alert("First"))
    assert not first.delivered and first.spooled and first.attempts == 2
    assert "127.0.0.1" in (first.error or "")
    with pytest.raises(AlertDeliveryError, match="Second not delivered"):
        notifier.send(_alert("Second"), strict=True)
    queued = [json.loads(line)["alerts"][0]["labels"]["alertname"] for line in spool.read_text().splitlines()]
    assert queued == ["First", "Second"]  # nothing lost

    alive = Receiver(port=port)
    try:
        third = notifier.send(_alert("Third"))
    finally:
        alive.close()
    assert third.delivered and third.flushed == 2
    assert [b["alerts"][0]["labels"]["alertname"] for b in alive.bodies] == ["First", "Second", "Third"]
    assert spool.read_text() == ""


def test_alerter_throttles_before_the_webhook(tmp_path: Path, receiver: Receiver) -> None:
    spec = AlertingSpec(
        webhook=WebhookSpec(url=receiver.url), throttle=ThrottleSpec(window_s=3600, max_alerts=1)
    )
    alerter = Alerter(spec, tmp_path / "state.sqlite", tmp_path / "spool.jsonl")
    outcomes = [alerter.fire(_alert(), now=1000.0 + i) for i in range(5)]
    assert [o.sent for o in outcomes] == [True, False, False, False, False]
    assert len(receiver.bodies) == 1
    later = alerter.fire(_alert(), now=1000.0 + 3601)
    assert later.sent and later.suppressed_before == 4
    assert (
        json.loads(receiver.bodies[-1]["alerts"][0]["annotations"]["details"])["suppressed_since_last"] == 4
    )
