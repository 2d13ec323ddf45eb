"""What the OpenAI layer (/v1) adds to latency over /generate for the same request (issue 16: <= 5 % p50).

One real service (``bentoml serve``, the tiny random Llama of tests/conftest.py, greedy requests of 8
new tokens on the continuous engine), closed-loop clients at 1 and 16 concurrency. Pairs of the same
request: ``/v1/completions`` vs ``/generate`` with ``prompt``; ``/v1/chat/completions`` vs ``/generate``
with ``messages``. Every prompt is distinct (no response-cache hits). Interleaved request by request:
every client alternates the two sides, so both see the same load; windows are repeated, and the report
gives the median over rounds of the per-round p50 ratio and its spread (min-max), since the 2-core
machine is shared and noisy.

    python bench/bench_openai_overhead.py --rounds 3 --window-s 3 --out reports/bench/openai-overhead-cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

LEVELS = (1, 16)
MAX_NEW = 8
_counter = itertools.count()


def _bodies(side: str, model: str) -> tuple[str, dict]:
    """(path, body) of one fresh request of ``side``."""
    i = next(_counter)
    prompt = f"Q: what is {i % 30} plus {i % 7}? ({i})\nA:"
    messages = [{"role": "user", "content": prompt}]
    common = {"temperature": 0}
    if side == "generate-prompt":
        return "/generate", {"prompt": prompt, "max_new_tokens": MAX_NEW, **common}
    if side == "v1-completions":
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, **common}
    if side == "generate-messages":
        return "/generate", {"messages": messages, "max_new_tokens": MAX_NEW, **common}
    return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": MAX_NEW, **common}


async def window(url: str, model: str, sides: tuple[str, str], clients: int, window_s: float) -> dict:
    """Latencies (s) per side of the requests completed in ``window_s`` by ``clients`` closed-loop
    clients, each alternating the two sides request by request (client i starts with side i % 2): both
    sides see the same load on the shared machine, which a window per side cannot promise."""
    import httpx

    latencies: dict[str, list[float]] = {side: [] for side in sides}
    end = time.perf_counter() + window_s
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one_client(index: int) -> None:
            turn = index
            while time.perf_counter() < end:
                side = sides[turn % 2]
                turn += 1
                path, body = _bodies(side, model)
                started = time.perf_counter()
                response = await client.post(path, json=body)
                response.raise_for_status()
                latencies[side].append(time.perf_counter() - started)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies


PAIRS = (("generate-prompt", "v1-completions"), ("generate-messages", "v1-chat"))


async def measure(url: str, model: str, rounds: int, window_s: float) -> dict:
    results: dict = {}
    for clients in LEVELS:
        for base, v1 in PAIRS:
            await window(url, model, (base, v1), clients, 1.0)  # warm this shape up
            ratios, p50s = [], {base: [], v1: []}
            for r in range(rounds):
                order = (base, v1) if r % 2 == 0 else (v1, base)
                latencies = await window(url, model, order, clients, window_s)
                p50 = {side: statistics.median(values) for side, values in latencies.items()}
                for side in (base, v1):
                    p50s[side].append(p50[side])
                ratios.append(p50[v1] / p50[base])
            results[f"{v1} vs {base} @ {clients}"] = {
                "clients": clients, "base": base, "v1": v1, "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "base_p50_ms": 1000 * statistics.median(p50s[base]),
                "v1_p50_ms": 1000 * statistics.median(p50s[v1]),
            }  # fmt: skip
            print(json.dumps(results[f"{v1} vs {base} @ {clients}"]), flush=True)
    return results


def write_report(results: dict, info: dict, rounds: int, window_s: float, out: Path) -> None:
    lines = [
        "# /v1 (OpenAI API) overhead over /generate, CPU",
        "",
        f"Machine: {info['device']}; torch {info['torch']}, transformers {info['transformers']}. Shared with "
        "other developers while it ran (noisy).",
        "",
        f"`python bench/bench_openai_overhead.py --rounds {rounds} --window-s {window_s}`: tiny random Llama "
        f"(tests/conftest.py), greedy, {MAX_NEW} new tokens, distinct prompts, closed-loop clients, "
        "each alternating /generate and /v1 request by request; ratio = p50(/v1) / p50(/generate) per round "
        "(window); load average while it ran: " + info.get("load", "?") + ".",
        "",
        "| pair | clients | /generate p50 ms | /v1 p50 ms | ratio median | ratio min-max | overhead p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['v1']} vs {r['base']} | {r['clients']} | {r['base_p50_ms']:.1f} | {r['v1_p50_ms']:.1f} | "
            f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | "
            f"{100 * (r['ratio_median'] - 1):+.1f} % |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    from bench_serving import machine, serve

    from conftest import build_tiny_model
    from lockgate.bentos.config import ServiceConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/openai-overhead-cpu.md")
    args = parser.parse_args()
    config = ServiceConfig.model_validate(
        {"limits": {"max_new_tokens": 64, "max_prompt_chars": 2000, "concurrency": 64}, "warmup_requests": 2}
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny")
        with serve(folder, config, Path(tmp)) as url:
            import httpx

            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            results = asyncio.run(measure(url, model, args.rounds, args.window_s))
    load = "{:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    write_report(results, {**machine(), "load": load}, args.rounds, args.window_s, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
