"""The Prefect task runner of the release flow, chosen by settings (``LOCKGATE_TASK_RUNNER``).

* ``threads`` (default): Prefect's ``ThreadPoolTaskRunner`` with **one** worker thread — candidates
  compress one after another in the flow's own process. Not more: transformers' ``from_pretrained``
  patches module construction process-wide (meta-device initialisation), so two candidates loading
  models in two threads at once crashed here ("Tensor on device cpu is not on the expected device
  meta"); and torch already uses every core inside one candidate's kernels.
* ``dask``: ``prefect_dask.DaskTaskRunner`` — each submitted task runs on a Dask worker process,
  so candidates compress in parallel safely. With
  ``LOCKGATE_DASK_ADDRESS`` it joins a running cluster (workers on other machines need the same
  LOCKGATE_/MLFLOW_ environment and a shared file system for the lockgate home: candidate folders are
  passed between tasks by path); without it, each flow run starts a local cluster of
  ``LOCKGATE_DASK_WORKERS`` processes with one thread each. Worker processes (Dask's nanny sets
  OMP_NUM_THREADS=1) keep torch to one thread each, so two workers do not oversubscribe two cores.

The runner is built when ``flows/release.py`` is imported: a deployment run imports it in a fresh
process whose environment the worker set, so the choice follows the machine that runs the flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.tasks.platform.settings import Settings, get_settings

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner


def release_task_runner(settings: Settings | None = None) -> TaskRunner:
    """The task runner the settings ask for (a fresh, unstarted instance)."""
    s = settings or get_settings()
    if s.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)  # see the module docstring: loading is not thread-safe
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ImportError(
            "LOCKGATE_TASK_RUNNER=dask needs prefect-dask: pip install -c constraints.txt 'lockgate[dask]'"
        ) from exc
    if s.dask_address:
        return DaskTaskRunner(address=s.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": s.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            # The scheduler serves HTTP (dashboard, /health) even without a dashboard: an ephemeral
            # loopback port, so two flow runs' clusters on one host never collide on 8787.
            "dashboard_address": f"{s.host}:0",
            "host": s.host,
        }
    )
