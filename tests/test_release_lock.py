"""The release lock against its real SQLite table: owner in the error, takeover of dead or expired
holders, lost leases, release on failure, and one winner among racing processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO_ROOT
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.lock import ReleaseLocked, ReleaseLockLost


@pytest.fixture
def model(lockgate_home: object) -> str:
    return f"lock-{uuid.uuid4().hex[:8]}"


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_release_fails_fast_naming_the_owner(model: str) -> None:
    ref, replaced = release_lock.acquire(model, "alice@host:1 (prefect-flow-run:abc)")
    assert replaced is None
    release_lock.renew(ref, phase="canary step 2/5 at 10%")
    started = time.monotonic()
    with pytest.raises(
        ReleaseLocked, match=r"already running, owned by alice@host:1 \(prefect-flow-run:abc\)"
    ) as info:
        release_lock.acquire(model, "bob")
    assert time.monotonic() - started < 2
    assert "phase canary step 2/5 at 10%" in str(info.value)
    assert info.value.holder.owner.startswith("alice")
    assert release_lock.release(ref)
    again, _ = release_lock.acquire(model, "bob")
    assert release_lock.current(model).owner == "bob"  # type: ignore[union-attr]
    release_lock.release(again)
    assert release_lock.current(model) is None


def test_hold_releases_on_failure(model: str) -> None:
    with pytest.raises(RuntimeError, match="stage exploded"), release_lock.hold(model, "carol"):
        assert release_lock.current(model) is not None
        raise RuntimeError("stage exploded")
    assert release_lock.current(model) is None


def test_lock_of_a_killed_process_is_taken_over_with_its_phase(model: str) -> None:
    child = _child(
        "from lockgate.tasks.release import lock as release_lock; import time; "
        f"ref, _ = release_lock.acquire({model!r}, 'doomed'); "
        "release_lock.renew(ref, phase='canary step 3/5 at 25%', services=[424242]); "
        "print('held', flush=True); time.sleep(120)"
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held", child.stderr
        with pytest.raises(ReleaseLocked, match="owned by doomed"):
            release_lock.acquire(model, "successor")  # alive: refused
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    stale = release_lock.current(model)
    assert stale is not None and stale.state() == "dead"
    ref, replaced = release_lock.acquire(model, "successor")
    assert replaced is not None
    assert (replaced.owner, replaced.phase, replaced.services) == (
        "doomed",
        "canary step 3/5 at 25%",
        (424242,),
    )
    release_lock.release(ref)


def test_expired_lease_is_taken_over_and_the_old_holder_stops(model: str) -> None:
    old, _ = release_lock.acquire(model, "slow", ttl_s=0.2)
    time.sleep(0.3)
    assert release_lock.current(model).state() == "expired"  # type: ignore[union-attr]
    new, replaced = release_lock.acquire(model, "fast")
    assert replaced is not None and replaced.owner == "slow"
    with pytest.raises(ReleaseLockLost, match="lock was lost"):
        release_lock.renew(old)
    assert not release_lock.release(old)  # releasing a lost lock must not free the new holder's
    assert release_lock.current(model).owner == "fast"  # type: ignore[union-attr]
    release_lock.release(new)


def test_exactly_one_of_racing_processes_wins(model: str) -> None:
    start_at = time.time() + 3  # all children are importing by then; they race on the same instant
    code = (
        "import time, sys\n"
        "from lockgate.tasks.release import lock as release_lock\n"
        f"time.sleep(max(0, {start_at} - time.time()))\n"
        "try:\n"
        f"    release_lock.acquire({model!r}, 'racer-' + sys.argv[1])\n"
        "    print('won')\n"
        "except release_lock.ReleaseLocked:\n"
        "    print('locked')\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            cwd=REPO_ROOT,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    results = [c.communicate(timeout=60)[0].strip() for c in children]
    assert sorted(results) == ["locked"] * 5 + ["won"], results
