"""Team setup vs embedded, and Dask vs threads for candidate compression (issue 7's performance part).

1. **Pipeline overhead**: the default pipeline (pipelines.yaml ``demo``, its own registered model) run
   embedded (`lockgate run`: SQLite MLflow, Prefect's temporary API) and as a deployment run on the
   local team stack (`lockgate up`: MLflow server on PostgreSQL, Prefect server, a process worker).
   Wall time from the request to the final state; the stack's start-up is reported apart.
2. **Compression runners**: 4 quantize candidates compressed by one flow with the thread runner and
   with a local Dask cluster of 2 worker processes (one thread each), against the stack's servers.

    .venv/bin/python bench/bench_team_stack.py [--out reports/bench/team-stack-cpu.md] [--skip-pipeline]

Each measurement runs in a fresh subprocess (settings and Prefect read the environment at import).
Other jobs may share the machine: the report records `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Lockgate's own int kernels (backend torch) and quanto. With the thread runner, candidates load models
# concurrently in one process, and transformers 5 patches torch process-wide while it builds a model
# (transformers/initialization.py, e.g. torch.linspace): concurrent loads failed here ("Cannot copy out
# of meta tensor", torchao "automatic conversion" errors). Dask's worker processes do not share that
# state, so the bench also times threads with one worker (sequential) as the working thread baseline.
CANDIDATES = [
    {"name": "int8-torch", "steps": [{"quantize": {"bits": 8, "backend": "torch", "ignore": ["lm_head"]}}]},
    {
        "name": "int8-torch-asym",
        "steps": [{"quantize": {"bits": 8, "scheme": "asymmetric", "backend": "torch"}}],
    },
    {
        "name": "int4-torch-g32",
        "steps": [{"quantize": {"bits": 4, "granularity": "group", "backend": "torch"}}],
    },
    {"name": "int8-quanto", "steps": [{"quantize": {"bits": 8, "backend": "quanto", "ignore": ["lm_head"]}}]},
]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _spec(folder: Path, name: str) -> Path:
    text = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    text["pipelines"]["demo"]["tracking"] = {"experiment": name, "registered_model": name}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def _cli(env: dict[str, str], *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "lockgate.flows.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode not in (0, 3):  # 3: rejected / rolled back — still a complete run
        raise SystemExit(f"lockgate {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "LOCKGATE_"))}
    env["LOCKGATE_DEMO_CACHE"] = os.environ.get("LOCKGATE_DEMO_CACHE", str(REPO / ".lockgate" / "demo-cache"))
    env["LOCKGATE_HOME"] = str(home / "home")
    env["LOCKGATE_REPORTS_DIR"] = str(home / "reports")
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The embedded run starts Prefect's temporary server; its 20 s default is short on a shared machine.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


def embedded_run(root: Path) -> dict:
    home = root / "embedded"
    env = _base_env(home)
    spec = _spec(root, "bench-embedded")
    started = time.perf_counter()
    done = _cli(env, "run", "demo", "-f", str(spec), "--json")
    wall = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "flow_s": result["elapsed_s"], "outcome": result["outcome"]}


def stack_up(root: Path) -> tuple[dict[str, str], float]:
    env = _base_env(root / "team")
    started = time.perf_counter()
    exports = _cli(env, "up", "--workers", "1", "--print-env", timeout=600).stdout
    up_s = time.perf_counter() - started
    for line in exports.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env, up_s


def team_run(root: Path, env: dict[str, str]) -> dict:
    spec = _spec(root, "bench-team")
    started = time.perf_counter()
    _cli(env, "deploy", "demo", "-f", str(spec), "--pool", env["LOCKGATE_WORK_POOL"])
    deployed = time.perf_counter()
    code = (
        "import asyncio, json, time\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        d = await c.read_deployment_by_name('release/demo-release')\n"
        "        r = await c.create_flow_run_from_deployment(d.id)\n"
        "        while True:\n"
        "            r = await c.read_flow_run(r.id)\n"
        "            if r.state and r.state.is_final(): break\n"
        "            await asyncio.sleep(1)\n"
        "        run_s = r.total_run_time.total_seconds()\n"
        "        print(json.dumps({'state': r.state.type.value, 'run_s': run_s}))\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    wall = time.perf_counter() - deployed
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "deploy_s": deployed - started,
        "wall_s": wall,
        "flow_s": result["run_s"],
        "state": result["state"],
    }


def compress_child(runner: str) -> None:
    """In a fresh process: one flow compresses the 4 candidates with the chosen runner; prints JSON."""
    os.environ["LOCKGATE_TASK_RUNNER"] = "threads" if runner.startswith("threads") else runner
    from prefect import flow

    from lockgate.flows.spec import CandidateSpec, ModelSpec
    from lockgate.tasks.compress import compress_task
    from lockgate.tasks.compression.base import StepContext
    from lockgate.tasks.model_source import resolve_parent
    from lockgate.tasks.platform.settings import export_environment, get_settings
    from lockgate.tasks.platform.task_runners import release_task_runner
    from lockgate.tasks.platform.tracking import configure_tracking

    settings = get_settings()
    export_environment(settings)
    configure_tracking("bench-compress", settings)
    parent = resolve_parent(ModelSpec(source="demo"), settings.cache_dir, settings.demo_train_steps).folder
    candidates = [CandidateSpec.model_validate(c) for c in CANDIDATES]
    context = StepContext(parent=parent, calibration_prompts=("Q: what is 1 plus 2?\nA:",), train_pairs=())
    out = settings.home / "bench-compress" / runner

    from prefect.task_runners import ThreadPoolTaskRunner

    task_runner = (
        ThreadPoolTaskRunner(max_workers=1) if runner == "threads-1" else release_task_runner(settings)
    )

    @flow(name="bench-compress", task_runner=task_runner)
    def compress_all() -> list[float]:
        futures = [compress_task.submit(parent, c, out, context, None) for c in candidates]
        return [f.result().size_ratio for f in futures]

    started = time.perf_counter()
    ratios = compress_all()
    wall = time.perf_counter() - started
    print(json.dumps({"runner": runner, "wall_s": wall, "ratios": ratios}))


def compress_compare(env: dict[str, str], repeats: int) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for runner in ("threads", "threads-1", "dask"):
            child_env = {**env, "LOCKGATE_DASK_WORKERS": "2"}
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--compress-child", runner], cwd=REPO, env=child_env,
                capture_output=True, text=True, timeout=1800, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "Error:" in line]
                row = {"runner": runner, "wall_s": None, "error": (errors or ["?"])[-1][:200]}
                rows.append(row)
                print(row, file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - started
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "team-stack-cpu.md")
    parser.add_argument("--skip-pipeline", action="store_true", help="Only the compression comparison.")
    parser.add_argument("--repeats", type=int, default=2, help="Repeats of the compression comparison.")
    parser.add_argument("--compress-child", choices=["threads", "threads-1", "dask"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compress_child:
        compress_child(args.compress_child)
        return
    root = Path(tempfile.mkdtemp(prefix="lockgate-bench-stack-"))
    root.chmod(0o755)  # the postgres user must reach the cluster folder
    load_before = _uptime()
    env, up_s = stack_up(root)
    try:
        compress = compress_compare(env, args.repeats)  # first: the shorter part
        team = None if args.skip_pipeline else team_run(root, env)
    finally:
        _cli(env, "down")
    print({"team": team, "up_s": up_s}, file=sys.stderr)
    embedded = None if args.skip_pipeline else embedded_run(root)
    load_after = _uptime()
    shutil.rmtree(root, ignore_errors=True)  # stopped cluster, artifacts, logs
    report = render(embedded, team, up_s, compress, load_before, load_after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def render(
    embedded: dict | None, team: dict | None, up_s: float, compress: list[dict], before: str, after: str
) -> str:
    lines = [
        "# Team stack vs embedded (CPU)",
        "",
        f"`bench/bench_team_stack.py` on {os.cpu_count()} cores. Load before: `{before}`; after: `{after}`.",
        "",
        f"Stack start-up (`lockgate up`: initdb on first use, PostgreSQL, MLflow server, Prefect server, "
        f"pool, 1 worker): **{up_s:.1f} s** (once per team, not per release).",
        "",
    ]
    if embedded and team:
        lines += [
            "## Default pipeline (pipelines.yaml `demo`, first release of a fresh registered model)",
            "",
            "| setup | wall s (request → final state) | flow run s | outcome |",
            "|---|---|---|---|",
            f"| embedded (`lockgate run`) | {embedded['wall_s']:.1f} | {embedded['flow_s']:.1f} | "
            f"{embedded['outcome']} |",
            f"| team (deployment run on a process worker) | {team['wall_s']:.1f} | {team['flow_s']:.1f} | "
            f"{team['state']} |",
            "",
            f"Ratio team / embedded (wall): **{team['wall_s'] / embedded['wall_s']:.2f}**; "
            f"`lockgate deploy --pool` took {team['deploy_s']:.1f} s more (once per spec change).",
            "",
        ]
    by_runner: dict[str, list[float]] = {}
    failures: dict[str, list[str]] = {}
    for row in compress:
        if row["wall_s"] is None:
            failures.setdefault(row["runner"], []).append(row["error"])
        else:
            by_runner.setdefault(row["runner"], []).append(row["wall_s"])
    lines += [
        "## Candidate compression, 4 quantize candidates (" + ", ".join(c["name"] for c in CANDIDATES) + ")",
        "",
        "| runner | flow wall s (each repeat) | best | failed runs |",
        "|---|---|---|---|",
    ]
    for runner in dict.fromkeys(row["runner"] for row in compress):
        walls = by_runner.get(runner, [])
        best = f"{min(walls):.1f}" if walls else "-"
        errors = "; ".join(f"`{e}`" for e in failures.get(runner, [])) or "0"
        lines.append(f"| {runner} | {', '.join(f'{w:.1f}' for w in walls) or '-'} | {best} | {errors} |")
    for baseline in ("threads", "threads-1"):
        if by_runner.get(baseline) and by_runner.get("dask"):
            speedup = min(by_runner[baseline]) / min(by_runner["dask"])
            lines += ["", f"Dask (2 workers) vs {baseline} (best of each): **x{speedup:.2f}**."]
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
