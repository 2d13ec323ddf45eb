"""One exception tree for lockgate; the CLI maps it to exit codes (2 spec, 1 stage)."""

from __future__ import annotations


class LockgateError(Exception):
    """Base of every error lockgate raises on purpose."""

    exit_code = 1


class SpecError(LockgateError):
    """The spec file is invalid. ``problems`` holds every ``FILE:LINE:COL: path: message``."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ModelSourceError(LockgateError):
    """``model.source`` or ``model.adapter`` cannot be resolved or loaded."""


class DataValidationError(LockgateError):
    """A dataset failed its expectations; ``failures`` names each failing expectation."""

    def __init__(self, dataset: str, failures: list[str]) -> None:
        self.dataset = dataset
        self.failures = failures
        super().__init__(f"dataset {dataset!r} failed validation: " + "; ".join(failures))


class StageFailed(LockgateError):
    """A stage could not complete (I/O, a crashed server, a broken model)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage {stage}: {message}")


class RegistryError(LockgateError):
    """A registry transition was refused or would leave the registry inconsistent."""
