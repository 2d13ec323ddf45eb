"""Feature flags: named flags with a rollout percentage, evaluated by consistent hashing on the user id,
changed at run time by editing a JSON file (section 9.5.3 of the chapter, without Redis).

* **Consistent**: a user's bucket for a flag is ``sha256("<flag>:<user>")`` scaled to [0, 100), and the
  flag is on for them while ``bucket < rollout``. The same user always gets the same answer; raising
  the rollout from 10 to 20 % only adds users (nobody who had the feature loses it); the flag name in
  the hash makes flags independent (the chapter uses Python's ``hash``, which is salted per process,
  so two replicas — or one restart — would disagree).
* **No restart**: :class:`FeatureFlags` re-reads the file when its identity changes (inode, size or
  mtime: writers replace it atomically), checking at most every ``check_every_s``. A file that turns
  invalid while serving is reported (``error``) and the last valid flags stay in force, so a typo
  cannot switch every flag off in production; at start-up an invalid file raises.
* Requests without a user id get a flag only at 100 % (there is nothing to hash consistently).

What flags do in the LLM service (bentos/llm_service.py, :func:`apply_service_flags`): two kinds of
flag have a built-in behaviour, applied per request to the users the flag is on for, after the
request's own limits were checked (a flag only ever narrows a request), and named in the response's
``x-lockgate-flags`` header:

========================  ======  ==========================================================
flag                      kind    behaviour for the users it is on for
========================  ======  ==========================================================
``stop_at_newline``       switch  a newline joins the request's stop sequences: answers end at
                                  the first line break (one-line answers, e.g. for a UI that
                                  shows one line).
``max_new_tokens_cap``    value   the request's ``max_new_tokens`` is capped at the flag's
                                  ``value`` (a cost/latency policy rolled out to a user share).
========================  ======  ==========================================================

Other flag names are allowed (evaluated for applications through :class:`FeatureFlags`) and do
nothing in the service. A switch flag takes no ``value``; a value flag needs one.

File format (``LOCKGATE_FEATURE_FLAGS_FILE``)::

    {"version": 1, "flags": {"max_new_tokens_cap": {"enabled": true, "rollout": 25, "value": 32,
                                                     "description": "..."}}}

Self-contained: imports nothing from ``flows`` or ``tasks`` (it ships inside the bento).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lockgate.bentos.config import feature_flags_file

logger = logging.getLogger("lockgate.feature_flags")


class Flag(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Off switch: a disabled flag is off for everyone.")
    rollout: float = Field(0.0, ge=0, le=100, description="Percent of users (by id) who get the feature.")
    description: str = Field("", max_length=2000, description="What the flag switches.")
    value: int | None = Field(
        None, ge=1, le=1_000_000, description="The setting a value flag applies (e.g. a token cap)."
    )


#: Flags the service acts on, by kind (see the module docstring for what each does).
SWITCH_FLAGS = ("stop_at_newline",)
VALUE_FLAGS = ("max_new_tokens_cap",)


class FlagFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(1, description="File format version.")
    flags: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")], Flag] = Field(
        default_factory=dict, description="Flags by name (lower case, digits, '_', '.', '-')."
    )

    @model_validator(mode="after")
    def _values_match_kinds(self) -> FlagFile:
        for name, flag in self.flags.items():
            if name in VALUE_FLAGS and flag.value is None:
                raise ValueError(f"flags.{name}.value: required (a value flag: the setting it applies)")
            if name in SWITCH_FLAGS and flag.value is not None:
                raise ValueError(f"flags.{name}.value: a switch flag takes no value")
        return self


class FlagFileError(ValueError):
    """The flag file cannot be read or is invalid; names the file."""


def bucket(flag: str, user_id: str) -> float:
    """The user's stable position in [0, 100) for ``flag``."""
    digest = hashlib.sha256(f"{flag}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def evaluate(flag: Flag | None, name: str, user_id: str | None) -> bool:
    """Whether ``flag`` (None: unknown, so off) is on for ``user_id``."""
    if flag is None or not flag.enabled:
        return False
    if user_id is None:
        return flag.rollout >= 100
    return bucket(name, user_id) < flag.rollout


@dataclass(frozen=True)
class FlagPolicy:
    """What the flags make of one request's settings."""

    max_new_tokens: int
    stop: tuple[str, ...]
    applied: tuple[str, ...]  # names of the service flags that were on for this request


def apply_service_flags(
    flags: dict[str, Flag], user_id: str | None, max_new_tokens: int, stop: tuple[str, ...]
) -> FlagPolicy:
    """The service's flag behaviours for one request (one snapshot of ``flags``, so a reload between
    two flags cannot mix old and new); flags only narrow what the request asked for."""
    applied: list[str] = []
    cap = flags.get("max_new_tokens_cap")
    if evaluate(cap, "max_new_tokens_cap", user_id) and cap is not None and cap.value is not None:
        applied.append("max_new_tokens_cap")
        max_new_tokens = min(max_new_tokens, cap.value)
    if evaluate(flags.get("stop_at_newline"), "stop_at_newline", user_id):
        applied.append("stop_at_newline")
        stop = stop if "\n" in stop else (*stop, "\n")
    return FlagPolicy(max_new_tokens, stop, tuple(applied))


def read_flag_file(path: Path) -> FlagFile:
    try:
        return FlagFile.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return FlagFile()  # no file yet: no flags, every feature off
    except (OSError, ValidationError) as exc:
        raise FlagFileError(f"{path}: {exc}") from exc


class FeatureFlags:
    """Flags from a JSON file, re-read when it changes; thread-safe."""

    def __init__(self, path: Path, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self.error: str | None = None  # the last reload failure, while the previous flags stay in force
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._checked = time.monotonic()
        self._file = read_flag_file(path)  # invalid at start-up: raises

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FeatureFlags | None:
        """Flags from the file the service environment names (``ServiceEnv.feature_flags_file``); None
        when it names none."""
        path = feature_flags_file(env if env is not None else os.environ)
        return cls(path) if path else None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return
        try:
            fresh = read_flag_file(self.path)
        except FlagFileError as exc:
            if self.error != str(exc):
                logger.error("feature flags not reloaded, the previous ones stay in force: %s", exc)
            self.error = str(exc)
            return  # signature kept old: retried at the next check
        self._file, self._signature, self.error = fresh, signature, None
        logger.info("feature flags reloaded from %s: %s", self.path, sorted(fresh.flags))

    def flags(self) -> dict[str, Flag]:
        with self._lock:
            self._refresh()
            return dict(self._file.flags)

    def is_enabled(self, name: str, user_id: str | None = None) -> bool:
        with self._lock:
            self._refresh()
            flag = self._file.flags.get(name)
        return evaluate(flag, name, user_id)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the flag file between processes (a sidecar lock file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_flag_file(path: Path, content: FlagFile) -> None:
    """Replace the file atomically: readers see the old or the new flags, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(content.model_dump(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def set_flag(
    path: Path,
    name: str,
    rollout: float,
    enabled: bool = True,
    description: str | None = None,
    value: int | None = None,
) -> Flag:
    """Create or change one flag (other flags untouched); returns it. ``description`` and ``value``
    keep their old setting when None."""
    with _exclusive(path):
        current = read_flag_file(path)
        old = current.flags.get(name)
        flag = Flag(
            enabled=enabled,
            rollout=rollout,
            description=description if description is not None else (old.description if old else ""),
            value=value if value is not None else (old.value if old else None),
        )
        try:
            content = FlagFile(flags={**current.flags, name: flag})
        except ValidationError as exc:
            raise FlagFileError(f"{path}: {exc.errors()[0]['msg']}") from exc
        write_flag_file(path, content)
    return flag


def remove_flag(path: Path, name: str) -> bool:
    """Delete one flag; False when it did not exist."""
    with _exclusive(path):
        current = read_flag_file(path)
        if name not in current.flags:
            return False
        write_flag_file(path, FlagFile(flags={k: v for k, v in current.flags.items() if k != name}))
    return True
