"""Alerting: Prometheus rules and Alertmanager routing generated from the spec, lockgate's own
throttled, de-duplicated webhook notifier, and the gauges the drift rules read.

* Rules use the service's metrics (bentos/llm_service.py): ``llm_request_duration_seconds`` (histogram,
  labels model/operation), ``llm_requests_total`` (model/version/status), ``llm_memory_usage_bytes``
  (type), plus lockgate's ``lockgate_drift_share`` / ``lockgate_detector_alarm`` gauges. The monitor
  flow runs as a batch job, not a scrape target, so it writes those gauges in the text exposition
  format to ``<home>/metrics/<pipeline>.prom`` for node_exporter's textfile collector.
* ``promtool check rules`` / ``amtool check-config`` validate the generated files where installed.
* The notifier sends at most ``throttle.max_alerts`` alerts per grouping key and window (state in
  SQLite, so a restarted monitor does not re-page), POSTs JSON with a timeout and retries, and spools
  what it could not deliver to a JSON-lines file that the next send flushes first: nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lockgate.tasks.platform.errors import LockgateError
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from lockgate.flows.spec import AlertingSpec, MonitorSpec, ThrottleSpec, WebhookSpec

log = get_logger(__name__)


class AlertConfigError(LockgateError):
    """A generated rule or routing file was refused by promtool/amtool."""


class AlertDeliveryError(LockgateError):
    """The webhook did not accept an alert after every retry (it was spooled, not lost)."""


# ----------------------------------------------------------------------------------------- state
@contextlib.contextmanager
def state_db(path: Path) -> Iterator[sqlite3.Connection]:
    """The monitor's SQLite state (throttling and response damping); one short transaction per use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            yield conn
    finally:
        conn.close()


# ------------------------------------------------------------------------------------- rules files
def prometheus_rules(pipeline: str, model: str, spec: MonitorSpec) -> dict[str, Any]:
    """The ``groups:`` document of Prometheus alert rules for one pipeline's service and monitor."""
    r = spec.alerting.rules
    sel = f'model="{model}"'
    labels = {"pipeline": pipeline, "model": model}
    rules = [
        {
            "alert": "HighLatency",
            "expr": "histogram_quantile(0.99, sum by (le) "
            f"(rate(llm_request_duration_seconds_bucket{{{sel}}}[5m]))) > {r.latency_p99_s:g}",
            "for": r.latency_for,
            "labels": {**labels, "severity": "critical"},
            "annotations": {
                "summary": f"{model}: p99 latency above {r.latency_p99_s:g}s",
                "description": "p99 latency over 5m: {{ $value | humanizeDuration }}.",
            },
        },
        {
            "alert": "HighErrorRate",
            "expr": f'sum(rate(llm_requests_total{{{sel},status="error"}}[5m])) '
            f"/ sum(rate(llm_requests_total{{{sel}}}[5m])) > {r.error_rate:g}",
            "for": r.error_rate_for,
            "labels": {**labels, "severity": "critical"},
            "annotations": {
                "summary": f"{model}: error rate above {r.error_rate:.1%}",
                "description": "Share of status=error requests over 5m is {{ $value | humanizePercentage }}.",
            },
        },
        {
            "alert": "GpuMemoryGrowth",
            # deriv over 1h is bytes/s; ×3600 → bytes/h. A steady climb is a leak, a step is a bigger batch.
            "expr": 'deriv(llm_memory_usage_bytes{type=~"gpu_.*"}[1h]) * 3600 '
            f"> {r.memory_growth_bytes_per_hour:g}",
            "for": r.memory_for,
            "labels": {**labels, "severity": "warning"},
            "annotations": {
                "summary": f"{model}: GPU memory growing",
                "description": "llm_memory_usage_bytes grows by {{ $value | humanize1024 }}B per hour.",
            },
        },
        {
            "alert": "DataDrift",
            "expr": f'lockgate_drift_share{{pipeline="{pipeline}"}} >= {spec.drift.max_drift_share:g}',
            "for": r.drift_for,
            "labels": {**labels, "severity": spec.responses.data_drift.severity},
            "annotations": {
                "summary": f"{pipeline}: served traffic drifted from its reference",
                "description": "Share of drifted columns is {{ $value | humanizePercentage }}.",
            },
        },
        {
            "alert": "DetectorAlarm",
            "expr": f'lockgate_detector_alarm{{pipeline="{pipeline}"}} == 1',
            "for": r.drift_for,
            "labels": {**labels, "severity": "warning"},
            "annotations": {
                "summary": f"{pipeline}: monitor detector {{{{ $labels.detector }}}} fired",
                "description": "See the latest monitor report of the pipeline.",
            },
        },
    ]
    return {"groups": [{"name": f"lockgate-{pipeline}", "rules": rules}]}


def alertmanager_config(pipeline: str, spec: AlertingSpec) -> dict[str, Any]:
    """Alertmanager routing: critical alerts to the ``critical`` receiver, the rest to ``warning``."""
    group_by = list(spec.throttle.group_by)
    return {
        "route": {
            "receiver": "warning",
            "group_by": group_by,
            "group_wait": spec.group_wait,
            "group_interval": spec.group_interval,
            "repeat_interval": spec.repeat_interval,
            "routes": [
                {"receiver": "critical", "matchers": ['severity="critical"'], "continue": False},
                {"receiver": "warning", "matchers": ['severity="warning"']},
            ],
        },
        # A critical alert silences the warning of the same name and pipeline (one page, not two).
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["alertname", "pipeline"],
            }
        ],
        "receivers": [
            {"name": "critical", "webhook_configs": [{"url": spec.critical_webhook, "send_resolved": True}]},
            {"name": "warning", "webhook_configs": [{"url": spec.warning_webhook, "send_resolved": True}]},
        ],
    }


@dataclass(frozen=True)
class AlertingFiles:
    rules: Path
    alertmanager: Path
    checked_with: tuple[str, ...]  # "promtool", "amtool": the validators that ran
    skipped: tuple[str, ...]  # why a validator did not run


def _check(tool: str, args: list[str], path: Path) -> None:
    proc = subprocess.run([tool, *args, str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AlertConfigError(f"{tool} {' '.join(args)} {path}: {(proc.stdout + proc.stderr).strip()}")


def write_alerting_files(out_dir: Path, pipeline: str, model: str, spec: MonitorSpec) -> AlertingFiles:
    """Write ``<pipeline>-rules.yml`` and ``<pipeline>-alertmanager.yml``; validate them when the
    Prometheus tools are installed (Debian: packages prometheus, prometheus-alertmanager)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rules_path = out_dir / f"{pipeline}-rules.yml"
    am_path = out_dir / f"{pipeline}-alertmanager.yml"
    rules_path.write_text(yaml.safe_dump(prometheus_rules(pipeline, model, spec), sort_keys=False, width=200))
    am_path.write_text(yaml.safe_dump(alertmanager_config(pipeline, spec.alerting), sort_keys=False))
    checked, skipped = [], []
    for tool, args, path in (
        ("promtool", ["check", "rules"], rules_path),
        ("amtool", ["check-config"], am_path),
    ):
        if shutil.which(tool) is None:
            skipped.append(f"{tool} not installed: {path.name} not validated")
            continue
        _check(tool, args, path)
        checked.append(tool)
    return AlertingFiles(rules_path, am_path, tuple(checked), tuple(skipped))


def write_gauges(path: Path, pipeline: str, drift_share: float | None, alarms: dict[str, bool]) -> Path:
    """The monitor's gauges in Prometheus text format (atomic write, for the textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    if drift_share is not None:
        share = Gauge(
            "lockgate_drift_share",
            "Share of drifted columns (most drifted group).",
            ["pipeline"],
            registry=registry,
        )
        share.labels(pipeline).set(drift_share)
    alarm = Gauge(
        "lockgate_detector_alarm",
        "1 while a monitor detector fires.",
        ["pipeline", "detector"],
        registry=registry,
    )
    for detector, fired in alarms.items():
        alarm.labels(pipeline, detector).set(1.0 if fired else 0.0)
    Gauge(
        "lockgate_monitor_last_run_timestamp_seconds", "Last monitor run.", ["pipeline"], registry=registry
    ).labels(pipeline).set(time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


# ------------------------------------------------------------------------------------------ alerts
@dataclass(frozen=True)
class Alert:
    name: str  # alertname
    severity: str  # "warning" | "critical"
    pipeline: str
    detector: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def labels(self) -> dict[str, str]:
        return {
            "alertname": self.name,
            "severity": self.severity,
            "pipeline": self.pipeline,
            "detector": self.detector,
        }

    def payload(self) -> dict[str, Any]:
        """Alertmanager-webhook-like body: receivers written for Alertmanager read it too."""
        return {
            "version": "4",
            "status": "firing",
            "receiver": "lockgate",
            "groupLabels": self.labels(),
            "commonLabels": self.labels(),
            "alerts": [
                {
                    "status": "firing",
                    "labels": self.labels(),
                    "annotations": {
                        "summary": self.summary,
                        "details": json.dumps(self.details, default=str),
                    },
                    "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ts)),
                }
            ],
        }


_THROTTLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_log (
    group_key TEXT NOT NULL, ts REAL NOT NULL, sent INTEGER NOT NULL, alertname TEXT, summary TEXT
);
CREATE INDEX IF NOT EXISTS alert_log_key ON alert_log (group_key, ts);
"""


class AlertThrottle:
    """At most ``max_alerts`` alerts per grouping key in any ``window_s``; the rest are suppressed
    (and counted, so the next alert that gets through can say how many were held back)."""

    def __init__(self, db: Path, spec: ThrottleSpec) -> None:
        self.db, self.spec = db, spec
        with state_db(db) as conn:
            conn.executescript(_THROTTLE_SCHEMA)

    def key(self, alert: Alert) -> str:
        labels = alert.labels()
        return "|".join(f"{k}={labels[k]}" for k in self.spec.group_by)

    def admit(self, alert: Alert, now: float | None = None) -> tuple[bool, int]:
        """(send it?, alerts of this key suppressed since its last sent one). Records the decision."""
        now = time.time() if now is None else now
        key = self.key(alert)
        with state_db(self.db) as conn:
            since = now - self.spec.window_s
            (sent,) = conn.execute(
                "SELECT COUNT(*) FROM alert_log WHERE group_key = ? AND ts > ? AND sent = 1", (key, since)
            ).fetchone()
            # Held back since the last alert of this key that went out (what that alert's reader missed).
            (suppressed,) = conn.execute(
                "SELECT COUNT(*) FROM alert_log WHERE group_key = ? AND sent = 0 AND ts > "
                "COALESCE((SELECT MAX(ts) FROM alert_log WHERE group_key = ? AND sent = 1), -1)",
                (key, key),
            ).fetchone()
            admit = sent < self.spec.max_alerts
            conn.execute(
                "INSERT INTO alert_log VALUES (?, ?, ?, ?, ?)",
                (key, now, int(admit), alert.name, alert.summary),
            )
        if not admit:
            log.info(
                "alert %s suppressed (%d sent for %s in the last %.0fs)",
                alert.name,
                sent,
                key,
                self.spec.window_s,
            )
        return admit, int(suppressed)


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None
    spooled: bool = False
    flushed: int = 0  # earlier spooled alerts delivered before this one


class WebhookNotifier:
    """JSON POST with timeout and retries; undeliverable alerts go to ``spool`` (JSON lines) and are
    re-sent, oldest first, before the next alert."""

    def __init__(self, spec: WebhookSpec, spool: Path) -> None:
        self.spec, self.spool = spec, spool

    def _post(self, body: dict[str, Any]) -> tuple[int | None, str | None, int]:
        data = json.dumps(body, default=str).encode()
        error: str | None = None
        for attempt in range(1, self.spec.retries + 2):
            if attempt > 1:
                time.sleep(self.spec.backoff_s * 2 ** (attempt - 2))
            request = urllib.request.Request(
                self.spec.url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
                    return response.status, None, attempt
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} from {self.spec.url}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    return exc.code, error, attempt  # the receiver refuses this body: retrying won't help
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                error = f"{self.spec.url}: {getattr(exc, 'reason', exc)}"
        return None, error, self.spec.retries + 1

    def _spooled(self) -> list[dict[str, Any]]:
        if not self.spool.is_file():
            return []
        return [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]

    def _write_spool(self, bodies: list[dict[str, Any]]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(b, default=str) + "\n" for b in bodies))
        tmp.replace(self.spool)

    def flush(self) -> int:
        """Re-send spooled alerts in order; stops at the first failure (order kept). Returns delivered."""
        pending = self._spooled()
        delivered = 0
        for body in pending:
            _, error, _ = self._post(body)
            if error is not None:
                break
            delivered += 1
        if delivered:
            self._write_spool(pending[delivered:])
        return delivered

    def send(self, alert: Alert, strict: bool = False) -> Delivery:
        """Deliver ``alert`` (after any spooled ones). On failure it is spooled and logged at ERROR;
        with ``strict`` an :class:`AlertDeliveryError` is raised as well."""
        flushed = self.flush()
        status, error, attempts = self._post(alert.payload())
        if error is None:
            return Delivery(True, attempts, status, flushed=flushed)
        self._write_spool([*self._spooled(), alert.payload()])
        log.error(
            "alert %s not delivered after %d attempts (%s); spooled to %s",
            alert.name,
            attempts,
            error,
            self.spool,
        )
        if strict:
            raise AlertDeliveryError(f"alert {alert.name} not delivered: {error}; spooled to {self.spool}")
        return Delivery(False, attempts, status, error, spooled=True, flushed=flushed)


@dataclass(frozen=True)
class AlertOutcome:
    alert: Alert
    sent: bool  # passed the throttle
    delivery: Delivery | None  # None: throttled, or no webhook configured (logged only)
    suppressed_before: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert": asdict(self.alert),
            "sent": self.sent,
            "delivery": asdict(self.delivery) if self.delivery else None,
        }


class Alerter:
    """Throttle, then notify (webhook when configured; the log line is always written)."""

    def __init__(self, spec: AlertingSpec, state: Path, spool: Path) -> None:
        self.throttle = AlertThrottle(state, spec.throttle)
        self.notifier = WebhookNotifier(spec.webhook, spool) if spec.webhook else None

    def fire(self, alert: Alert, now: float | None = None) -> AlertOutcome:
        admit, suppressed = self.throttle.admit(alert, now)
        if not admit:
            return AlertOutcome(alert, False, None, suppressed)
        if suppressed:
            alert = Alert(
                alert.name,
                alert.severity,
                alert.pipeline,
                alert.detector,
                alert.summary,
                {**alert.details, "suppressed_since_last": suppressed},
                alert.ts,
            )
        log.warning("ALERT %s [%s] %s: %s", alert.name, alert.severity, alert.pipeline, alert.summary)
        delivery = self.notifier.send(alert) if self.notifier else None
        return AlertOutcome(alert, True, delivery, suppressed)
