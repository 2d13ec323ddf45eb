"""Team-setup settings without servers: the task runner choice, the stack's environment, and the error
that says how to install PostgreSQL. The servers themselves are exercised in test_team_stack.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgate.tasks.platform.settings import Settings


def test_threads_is_the_default_runner() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from lockgate.tasks.platform.task_runners import release_task_runner

    assert isinstance(release_task_runner(Settings()), ThreadPoolTaskRunner)


def test_dask_runner_uses_a_local_cluster_or_the_configured_scheduler() -> None:
    from prefect_dask import DaskTaskRunner

    from lockgate.tasks.platform.task_runners import release_task_runner

    local = release_task_runner(Settings(task_runner="dask", dask_workers=3))
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["threads_per_worker"] == 1
    remote = release_task_runner(Settings(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"


def test_missing_postgres_binaries_say_how_to_install_them(tmp_path: Path) -> None:
    from lockgate.tasks.platform.team_stack import StackError, postgres_bin_dir

    with pytest.raises(StackError, match=r"LOCKGATE_POSTGRES_BIN=.* holds no initdb.*make postgres"):
        postgres_bin_dir(Settings(postgres_bin=tmp_path))


def test_stack_environment_points_every_client_at_the_servers() -> None:
    from lockgate.tasks.platform.team_stack import StackState, export_lines, stack_environment

    state = StackState(
        home="/srv/lockgate",
        postgres_data="/srv/lockgate/team-stack/postgres/data",
        postgres_port=5999,
        db_password="pw",
        mlflow_url="http://127.0.0.1:5001",
        prefect_api_url="http://127.0.0.1:4201/api",
        artifacts_destination="/srv/artifacts",
        work_pool="lockgate",
    )
    env = stack_environment(state)
    assert env["LOCKGATE_MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5001"
    assert env["LOCKGATE_PREFECT_API_URL"] == env["PREFECT_API_URL"] == "http://127.0.0.1:4201/api"
    assert env["LOCKGATE_LOCK_URL"] == "postgresql+psycopg2://lockgate:pw@127.0.0.1:5999/lockgate"
    assert env["LOCKGATE_LIVE_LOG_URL"] == env["LOCKGATE_LOCK_URL"]  # routers' live rows: the team's database
    assert "export LOCKGATE_HOME='/srv/lockgate'\n" in export_lines(state)
    settings = Settings(
        mlflow_tracking_uri=env["LOCKGATE_MLFLOW_TRACKING_URI"],
        prefect_api_url=env["LOCKGATE_PREFECT_API_URL"],
    )
    assert settings.tracking_uri == "http://127.0.0.1:5001"
