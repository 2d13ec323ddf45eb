"""The terminal's heartbeat: the innermost open heartbeat of a thread speaks, and a canary step's says
how many requests each arm has had so far."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import pytest

from lockgate.flows.spec import CanarySpec
from lockgate.tasks.platform import progress
from lockgate.tasks.platform.progress import arm_requests, heartbeat
from lockgate.tasks.release.analysis import Outcome, Target
from lockgate.tasks.release.canary_strategy import run_steps


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The heartbeat lines, one beat every 20 ms."""
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.02)
    handler = _Lines()
    logger = logging.getLogger(progress.__name__)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_inner_heartbeat_speaks_for_the_outer_one_and_is_asked_at_each_beat(beats: list[str]) -> None:
    done = [0]
    with heartbeat("running canary"):
        time.sleep(0.1)
        outer_alone = len(beats)
        with heartbeat(lambda: f"step: {done[0]} done"):
            for _ in range(5):
                done[0] += 1
                time.sleep(0.03)
        inner = beats[outer_alone:]
        time.sleep(0.1)
    assert outer_alone >= 1
    assert all(line.startswith("… still running canary (") for line in beats[:outer_alone])
    assert inner and all(line.startswith("… still step: ") for line in inner), beats
    assert len({line.split(" (")[0] for line in inner}) > 1  # the count moved between beats
    assert beats[-1].startswith("… still running canary (")  # the outer one again once the inner ended


def test_heartbeats_of_other_threads_are_not_silenced(beats: list[str]) -> None:
    release = threading.Event()

    def other() -> None:
        with heartbeat("compressing in another thread"):
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    with heartbeat("evaluating"):
        time.sleep(0.15)
    release.set()
    thread.join()
    assert any("compressing in another thread" in line for line in beats)
    assert any("evaluating" in line for line in beats)


def test_canary_step_heartbeat_says_requests_per_arm(beats: list[str]) -> None:
    def slow_sender(target: Target, prompt: str, user_id: str) -> Outcome:
        time.sleep(0.004)  # a request's round trip
        return Outcome(target, True, 4.0, 200, output_tokens=4, ttft_ms=1.0)

    spec = CanarySpec(steps=(10, 100), min_canary_requests=20, users=50, max_new_tokens=4)
    result = run_steps(slow_sender, ["a", "bb"], spec, verbose=False)
    assert result.decision == "promote"
    pattern = re.compile(r"^… still canary step (\d)/2 at (\d+)%: canary (\d+) req / stable (\d+) req \(")
    steps = [m.groups() for m in map(pattern.match, beats) if m]
    assert {s[:2] for s in steps} >= {("1", "10"), ("2", "100")}, beats
    first = [(int(c), int(s)) for step, _, c, s in steps if step == "1"]
    # At 10 % most users stay on stable; both counts only grow during the step.
    assert first[-1][1] > first[-1][0] and first == sorted(first)
    assert arm_requests(3, 27) == "canary 3 req / stable 27 req"
