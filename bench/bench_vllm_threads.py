"""vLLM's CPU thread binding on a small host: `vllm serve` with VLLM_CPU_NUM_OF_RESERVED_CPU 0 vs 1.

vLLM's CPU build keeps one core out of the model's OpenMP threads for its API process and engine core;
on a 2-core host that is half the machine. lockgate's vLLM engine sets it to 0 on hosts of 2 cores or
fewer (bentos/vllm_engine.py ``cpu_thread_env``); this bench is the evidence for (or against) that default.
Both servers of a model run side by side; during each window the other one is SIGSTOPped; windows are
interleaved (alternating order) and repeated. Writes reports/bench/vllm-threads-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_engines import (
    REPO,
    Window,
    Workload,
    demo_model_dir,
    lockgate_vllm_skip_reason,
    machine,
    pause_others,
    resume_all,
    run_window,
    smollm2_dir,
    start_vllm_serve,
    stop,
    wait_ready,
)


def run_model(name: str, model_dir: Path, args: argparse.Namespace) -> list[tuple[int, Window]]:
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    levels = [int(x) for x in args.levels.split(",")]
    prompts = [list(Workload().requests(tokenizer, c)) for c in range(max(levels))]
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 2048)
    max_model_len = min(int(positions), 2112)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    servers = {r: start_vllm_serve(model_dir, args.kv_mb, max_model_len, args.workdir, r) for r in (0, 1)}
    windows: list[tuple[int, Window]] = []
    try:
        for server in servers.values():
            wait_ready(server, started)
        for clients in levels:
            for repeat in range(args.repeats):
                order = [0, 1] if repeat % 2 == 0 else [1, 0]
                for reserved in order:
                    server = servers[reserved]
                    pause_others(list(servers.values()), server)
                    try:
                        w = asyncio.run(run_window(server, name, prompts, clients, args.duration, False))
                    finally:
                        resume_all(list(servers.values()))
                    windows.append((reserved, w))
                    print(f"[{name}] reserved={reserved} c={clients:3d} rep={repeat} {w.tok_s:7.1f} tok/s "
                          f"req={w.requests} err={w.errors}", flush=True)  # fmt: skip
                    time.sleep(args.settle)
    finally:
        for server in servers.values():
            stop(server)
    return windows


def write_report(path: Path, results: dict[str, list[tuple[int, Window]]], args: argparse.Namespace) -> None:
    lines = [
        "# vLLM's CPU thread binding on a 2-core host: reserved cores 0 vs 1 (`vllm serve`)",
        "",
        f"Written by `bench/bench_vllm_threads.py` (`--levels {args.levels} --duration {args.duration} "
        f"--repeats {args.repeats}`), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Closed-loop clients, unary "
        "/v1/completions, the workload of bench_engines.py; both servers side by side, the other one "
        "SIGSTOPped during a window, interleaved. Median [min-max] over repeats.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine().items()],
        "",
        "## Results (tokens/s)",
        "",
        "| model | clients | reserved 0 | reserved 1 (vLLM's default) | 0 / 1 |",
        "|---|---|---|---|---|",
    ]
    for name, windows in results.items():
        for clients in sorted({w.clients for _, w in windows}):
            cell = {r: [w.tok_s for rr, w in windows if rr == r and w.clients == clients] for r in (0, 1)}
            med = {r: statistics.median(v) for r, v in cell.items()}
            lines.append(
                f"| {name} | {clients} | {med[0]:.1f} [{min(cell[0]):.1f}-{max(cell[0]):.1f}] | "
                f"{med[1]:.1f} [{min(cell[1]):.1f}-{max(cell[1]):.1f}] | {med[0] / med[1]:.2f}x |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--models", default="smollm2,demo")
    parser.add_argument("--kv-mb", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=REPO / ".lockgate" / "bench-vllm-threads")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "vllm-threads-cpu.md")
    args = parser.parse_args()
    reason = lockgate_vllm_skip_reason()
    if reason:
        raise SystemExit(reason)
    results: dict[str, list[tuple[int, Window]]] = {}
    for name in args.models.split(","):
        folder = smollm2_dir() if name == "smollm2" else demo_model_dir()
        if folder is None:
            raise SystemExit(f"{name}: no model folder (run the demo pipeline once)")
        results[name] = run_model(name, folder, args)
        write_report(args.out, results, args)


if __name__ == "__main__":
    main()
