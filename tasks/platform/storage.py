"""What ``LOCKGATE_HOME`` holds per release, and ``lockgate gc``: keep what is still needed, free the rest.

Each release leaves derived, re-creatable files in the home: its work folder (``runs/<run id>``: the
Bento build context and service logs), its compressed candidates (``cache/candidates/<name>-<key>``),
its Bento (BentoML store) and local copies of registry versions the services served
(``cache/registry/<model>-v<version>``). Three releases of a 135M model came to 5.9 GB.

The collector keeps:

* every release run the registry still references: a model version that is in Production or Staging,
  or carries an alias, was registered by that run (its own id or a nested stage run's);
* the newest ``keep_runs`` release runs;
* for each kept run: its work folder, the candidates its compress stages used (named by the content
  key each logged in ``lockgate_compress.json``) and its Bento (the package stage's ``bento_tag``);
* registry copies of versions the registry still references;
* anything changed in the last ``min_age_s`` seconds (a release running right now writes there).

It never touches MLflow's store (runs, artifacts, registered models: MLflow's own ``mlflow gc`` is
for that), the request logs the monitor reads, the parent model caches, or the Prefect home.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = get_logger(__name__)

#: Stages whose versions the registry still serves or may promote.
LIVE_STAGES = ("Production", "Staging")
RELEASE_RUN_PREFIX = "release-"


@dataclass(frozen=True)
class Reclaimable:
    """One thing ``gc`` frees: a folder in the home, or a Bento (``bento`` set, deleted through BentoML)."""

    path: Path
    size_bytes: int
    reason: str
    bento: str | None = None


@dataclass(frozen=True)
class GcPlan:
    home: Path
    home_bytes: int
    kept_runs: tuple[str, ...]
    items: tuple[Reclaimable, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(item.size_bytes for item in self.items)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed; files vanishing meanwhile count 0)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:  # removed while walking (a release writing next to us)
            continue
    return total


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime]
    times += [p.stat().st_mtime for p in path.rglob("*") if p.exists() and not p.is_symlink()]
    return max(times)


# ------------------------------------------------------------------------------ what is referenced
def release_runs(client: MlflowClient) -> list[Run]:
    """Every release flow's parent run in the store, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        filter_string=f"attributes.run_name LIKE '{RELEASE_RUN_PREFIX}%'",
        order_by=["attributes.start_time DESC"],
        max_results=50_000,
    )
    return [r for r in runs if "lockgate.pipeline" in r.data.tags and "mlflow.parentRunId" not in r.data.tags]


def _children(client: MlflowClient, run: Run) -> list[Run]:
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        max_results=10_000,
    )


def live_versions(client: MlflowClient) -> list[tuple[str, str, str | None]]:
    """(model, version, run id) of every version the registry still references."""
    live = []
    for version in client.search_model_versions(max_results=100_000):
        if version.current_stage in LIVE_STAGES or version.aliases:
            live.append((version.name, str(version.version), version.run_id))
    return live


def _release_of(client: MlflowClient, run_id: str | None) -> str | None:
    """The release run a run belongs to (itself, or the parent of a nested stage run)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # a version logged outside lockgate may name a deleted run
        log.info("gc: run %s of a registry version is not in the store (%s)", run_id, exc)
        return None
    return run.data.tags.get("mlflow.parentRunId", run_id)


def _kept_files(client: MlflowClient, run: Run) -> tuple[set[str], set[str]]:
    """Candidate folder names and Bento tags of one release run, from its stage runs."""
    candidates: set[str] = set()
    bentos: set[str] = set()
    for child in _children(client, run):
        name = child.data.tags.get("lockgate.candidate")
        if child.info.run_name.startswith("compress-") and name:
            try:
                report = _load_dict(client, child.info.run_id, "lockgate_compress.json")
            except Exception as exc:  # a compress stage that failed before logging its report
                log.info("gc: %s has no compress report (%s)", child.info.run_name, exc)
                continue
            if report.get("key"):
                candidates.add(f"{name}-{str(report['key'])[:16]}")
        tag = child.data.params.get("bento_tag")
        if tag:
            bentos.add(tag)
    return candidates, bentos


def _load_dict(client: MlflowClient, run_id: str, path: str) -> dict:
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lockgate-gc-") as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())


# ------------------------------------------------------------------------------------- the plan
def plan_gc(
    home: Path,
    client: MlflowClient,
    keep_runs: int = 3,
    min_age_s: float = 3600,
    bentos: list[str] | None = None,
    bento_path: dict[str, Path] | None = None,
    now: float | None = None,
) -> GcPlan:
    """What ``gc`` would free in ``home``. ``bentos`` lists the BentoML store's tags (with their folders
    in ``bento_path``); None leaves Bentos out of the plan."""
    now = time.time() if now is None else now
    runs = release_runs(client)
    live = live_versions(client)
    referenced = {r for r in (_release_of(client, run_id) for *_, run_id in live) if r}
    kept = [r for i, r in enumerate(runs) if i < keep_runs or r.info.run_id in referenced]
    kept_ids = {r.info.run_id for r in kept}
    kept_candidates: set[str] = set()
    kept_bentos: set[str] = set()
    for run in kept:
        candidates, tags = _kept_files(client, run)
        kept_candidates |= candidates
        kept_bentos |= tags
    live_copies = {f"{name}-v{version}" for name, version, _ in live}

    def fresh(path: Path) -> bool:
        return now - _newest_mtime(path) < min_age_s

    items: list[Reclaimable] = []

    def consider(folder: Path, keep: set[str], reason: str) -> None:
        if not folder.is_dir():
            return
        for entry in sorted(folder.iterdir()):
            if entry.name in keep or not entry.is_dir() or fresh(entry):
                continue
            items.append(Reclaimable(entry, tree_bytes(entry), reason))

    consider(home / "runs", kept_ids, "work folder of a release run that is neither recent nor referenced")
    consider(home / "cache" / "candidates", kept_candidates, "candidate no kept release run used")
    consider(home / "cache" / "registry", live_copies, "copy of a registry version no longer referenced")
    for tag in bentos or []:
        folder = (bento_path or {}).get(tag)
        if tag in kept_bentos or folder is None or fresh(folder):
            continue
        items.append(Reclaimable(folder, tree_bytes(folder), "Bento of no kept release run", bento=tag))
    return GcPlan(home, tree_bytes(home) if home.exists() else 0, tuple(sorted(kept_ids)), tuple(items))


def apply_gc(plan: GcPlan) -> int:
    """Delete what ``plan`` lists (Bentos through BentoML, so its store stays consistent); bytes freed."""
    freed = 0
    for item in plan.items:
        if item.bento is not None:
            import bentoml

            bentoml.bentos.delete(item.bento)
        else:
            shutil.rmtree(item.path)
        freed += item.size_bytes
        log.info("gc: freed %s (%s)", item.path, human_bytes(item.size_bytes))
    return freed


def bento_store() -> tuple[list[str], dict[str, Path]]:
    """Tags of the Bentos in BentoML's store (BENTOML_HOME) and their folders."""
    import bentoml

    found = bentoml.bentos.list()
    return [str(b.tag) for b in found], {str(b.tag): Path(b.path) for b in found}


def collect(keep_runs: int, min_age_s: float, delete: bool) -> tuple[GcPlan, int]:
    """``lockgate gc``: the plan for the configured home, MLflow store and BentoML store; deleted only
    when ``delete`` (else a dry run). Returns the plan and the bytes freed (0 on a dry run)."""
    import mlflow

    from lockgate.tasks.platform.settings import export_environment, get_settings

    settings = get_settings()
    export_environment(settings)  # BENTOML_HOME before bentoml is imported
    mlflow.set_tracking_uri(settings.tracking_uri)
    tags, paths = bento_store()
    plan = plan_gc(settings.home, mlflow.MlflowClient(), keep_runs, min_age_s, tags, paths)
    return plan, apply_gc(plan) if delete else 0
