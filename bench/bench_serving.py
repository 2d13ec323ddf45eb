"""Issue 4's serving benchmark through the real service (``bentoml serve bentos.llm_service:LLMService``)
over HTTP, at 1, 8 and 64 concurrent clients (closed loop: each client sends its next request when the
last one is answered):

* continuous: the service as shipped (greedy requests on the continuous-batching engine);
* naive: the same service with ``engine: static`` and ``max_batch_size: 1`` (one ``generate`` per request);
* static-64: ``engine: static``, ``max_batch_size: 64`` (whole-request batching, like BentoML's adaptive
  batching for generation);
* direct: the continuous engine called in-process with the same workload, no HTTP and no BentoML: the
  service's overhead is 1 - continuous / direct.

Streaming runs of the continuous service at 1 and 64 clients give the client-side TTFT and
inter-token latency (time between streamed chunks). Workload (fixed seed): prompt lengths uniform in
[128, 512] tokens, output lengths exponential with mean 128, capped at 512, greedy. The model has the
shape of Qwen2-0.5B with random weights (bf16 on CUDA, fp32 on CPU) and a word-level tokenizer with one
word per token id, so prompt lengths are exact; a random model rarely emits its EOS id.

    python bench/bench_serving.py --only continuous,direct --json-out a.json   # one device call
    python bench/bench_serving.py --only naive,static64 --json-out b.json      # another one
    python bench/bench_serving.py --report a.json b.json --out reports/bench/serving-service-gpu.md

On the 2-core CPU use ``--layers 2 --window-s 20`` (the demo-size run; see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lockgate.bentos.config import ModelUri, ServiceConfig, ServiceEnv  # noqa: E402

CLIENT_LEVELS = (1, 8, 64)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QWEN_SHAPE = "random Qwen2-0.5B shape"
MAX_NEW = 512
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet


@dataclass
class Workload:
    """The same request sequence for every configuration (seeded)."""

    prompt_range: tuple[int, int] = (128, 512)
    mean_new: int = 128
    max_new: int = MAX_NEW
    seed: int = 7

    def requests(self, client: int) -> Iterator[tuple[str, int]]:
        """Client ``client``'s endless request sequence (the same for every configuration)."""
        rng = random.Random(self.seed * 1000 + client)
        while True:
            n_prompt = rng.randint(*self.prompt_range)
            words = "".join(rng.choice(LETTERS) for _ in range(n_prompt))  # one token per letter
            n_new = min(self.max_new, max(1, math.ceil(rng.expovariate(1 / self.mean_new))))
            yield words, n_new


@dataclass
class LevelResult:
    clients: int
    window_s: float
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)  # per request: output / (latency - ttft)
    context_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        s: dict[str, float] = {
            "clients": self.clients,
            "tokens_per_s": self.tokens / self.window_s,
            "requests": self.requests,
            "errors": self.errors,
        }
        if self.ttft_s:
            s["ttft_ms_p50"] = 1000 * statistics.median(self.ttft_s)
        if self.itl_s:
            gaps = sorted(self.itl_s)
            s["itl_ms_p50"] = 1000 * gaps[len(gaps) // 2]
            s["itl_ms_p99"] = 1000 * gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
        if self.decode_tok_s:
            s["decode_tok_s_p50"] = statistics.median(self.decode_tok_s)
            s["context_tokens_mean"] = statistics.mean(self.context_tokens)
        return s


# -- the model ----------------------------------------------------------------------------------------


def build_model(folder: Path, layers: int | None) -> None:
    """Random Qwen2-0.5B-shape model + a byte-level BPE tokenizer without merges (one token per byte, so
    prompt lengths are exact; transformers loads it as Qwen2Tokenizer)."""
    import torch
    from model_shapes import qwen2_05b_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    overrides = {"num_hidden_layers": layers} if layers else {}
    config = qwen2_05b_config(**overrides)
    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"w{i}": i for i in range(len(vocab), config.vocab_size)})
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 2, 1, None
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 1
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _layers(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# -- the service ---------------------------------------------------------------------------------------


def service_config(engine: str, max_batch_size: int, max_new: int, step_tokens: int) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "batching": {
                "engine": engine,
                "max_batch_size": max_batch_size,
                "max_step_tokens": step_tokens,
                "max_latency_ms": 10,
            },
            "limits": {
                "max_new_tokens": max_new,
                "max_prompt_chars": 8192,
                "timeout_s": 900,
                "concurrency": 512,
            },
            "capacity": {"max_queue": 1024},
            "warmup_requests": 2,
        }
    )


def configs(max_new: int, step_tokens: int) -> dict[str, ServiceConfig]:
    return {
        "continuous": service_config("continuous", 64, max_new, step_tokens),
        "naive": service_config("static", 1, max_new, step_tokens),
        "static64": service_config("static", 64, max_new, step_tokens),
    }


@contextlib.contextmanager
def serve(folder: Path, config: ServiceConfig, workdir: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = ServiceEnv(model_uri=ModelUri.folder(folder), model_name="bench", config=config)
    env = service.process_env(os.environ)
    env.update(
        BENTOML_HOME=str(workdir / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    log = (workdir / f"serve-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "lockgate.bentos.llm_service:LLMService",
         "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"service exited {process.returncode}: see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("service not ready in 600 s")
        yield url
    finally:
        from lockgate.bentos.processes import stop_service

        stop_service(process, timeout_s=30)


async def run_level_http(
    url: str, workload: Workload, clients: int, window_s: float, stream: bool
) -> LevelResult:
    import httpx

    result = LevelResult(clients, window_s)
    end = time.perf_counter() + window_s
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:

        async def one_client(index: int) -> None:
            for prompt, n_new in workload.requests(index):
                if time.perf_counter() >= end:
                    return
                body = {"prompt": prompt, "max_new_tokens": n_new}
                started = time.perf_counter()
                if stream:
                    await _stream_one(client, url, body, started, end, result)
                    continue
                resp = await client.post(f"{url}/generate", json=body)
                if resp.status_code != 200:
                    result.errors += 1
                    continue
                data = resp.json()
                if time.perf_counter() <= end:
                    _count(result, data, started, len(prompt))

        tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
        await asyncio.sleep(window_s)
        for task in tasks:
            task.cancel()  # requests still running are not counted (their tokens came after the window)
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def _count(result: LevelResult, data: dict, started: float, n_prompt: int) -> None:
    result.requests += 1
    result.tokens += data["output_tokens"]
    latency = time.perf_counter() - started
    ttft = (data.get("time_to_first_token_ms") or 0) / 1000
    if data["output_tokens"] > 1 and latency > ttft:
        result.decode_tok_s.append((data["output_tokens"] - 1) / max(1e-9, data["timings"]["decode"] / 1000))
        result.context_tokens.append(n_prompt + data["output_tokens"] // 2)


async def _stream_one(client, url: str, body: dict, started: float, end: float, result: LevelResult) -> None:
    """TTFT and the gaps between streamed chunks; the tokens of a stream that ended inside the window are
    its budget (a random model's EOS is one id in 151,936)."""
    last = None
    async with client.stream("POST", f"{url}/generate_stream", json=body) as resp:
        if resp.status_code != 200:
            result.errors += 1
            return
        async for chunk in resp.aiter_text():
            now = time.perf_counter()
            if not chunk:
                continue
            if last is None:
                result.ttft_s.append(now - started)
            else:
                result.itl_s.append(now - last)
            last = now
    if last is not None and last <= end:
        result.requests += 1
        result.tokens += body["max_new_tokens"]


async def drain(url: str, timeout_s: float = 120) -> None:
    """Wait until the service runs nothing (requests cut at the end of a window still finish there)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            cap = (await client.get(f"{url}/capacity")).json()
            if cap.get("running", 0) == 0 and cap.get("waiting", 0) == 0:
                return
            await asyncio.sleep(0.5)


# -- direct engine ------------------------------------------------------------------------------------


async def run_level_direct(engine, workload: Workload, clients: int, window_s: float) -> LevelResult:
    result = LevelResult(clients, window_s)
    end = time.perf_counter() + window_s

    async def one_client(index: int) -> None:
        for prompt, n_new in workload.requests(index):
            if time.perf_counter() >= end:
                return
            gen = await engine.generate(prompt, n_new, ())
            if time.perf_counter() <= end:
                result.requests += 1
                result.tokens += gen.output_tokens
                if gen.output_tokens > 1 and gen.first_token_s:
                    result.decode_tok_s.append((gen.output_tokens - 1) / (gen.latency_s - gen.first_token_s))
                    result.context_tokens.append(len(prompt) + gen.output_tokens // 2)

    tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
    await asyncio.sleep(window_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    while engine.in_flight:
        await asyncio.sleep(0.1)
    return result


async def direct(folder: Path, workload: Workload, window_s: float, cfg: ServiceConfig) -> dict[str, dict]:
    from lockgate.bentos.continuous import ContinuousEngine, engine_shape
    from lockgate.bentos.kv_budget import free_memory_bytes, model_kv_shape, plan_budget
    from lockgate.bentos.runtime import load_model

    model = load_model(folder)
    budget = plan_budget(
        model_kv_shape(model.model), None, free_memory_bytes(model.device),
        cfg.limits.max_prompt_chars + cfg.limits.max_new_tokens,  # capped at the model positions
    )  # fmt: skip
    shape = engine_shape(64, budget.capacity_tokens, budget.max_context_tokens, cfg.batching.max_step_tokens)
    engine = ContinuousEngine(model, shape)
    await asyncio.to_thread(engine.start)
    await run_level_direct(engine, workload, 64, min(8.0, window_s))  # warm-up (graphs for many shapes)
    rows = {}
    for clients in CLIENT_LEVELS:
        rows[f"direct, {clients} clients"] = (
            await run_level_direct(engine, workload, clients, window_s)
        ).summary()
        print(rows[f"direct, {clients} clients"], flush=True)
    await asyncio.to_thread(engine.stop)
    return rows


async def through_service(
    name: str,
    folder: Path,
    workload: Workload,
    window_s: float,
    workdir: Path,
    levels: tuple[int, ...],
    config: ServiceConfig,
) -> dict:
    rows: dict[str, dict] = {}
    with serve(folder, config, workdir) as url:
        started = time.perf_counter()
        if name == "continuous":
            await run_level_http(url, workload, 64, min(8.0, window_s), stream=False)  # warm-up: graphs
            await drain(url)
        for clients in levels:
            rows[f"{name}, {clients} clients"] = (
                await run_level_http(url, workload, clients, window_s, stream=False)
            ).summary()
            print(name, rows[f"{name}, {clients} clients"], flush=True)
            if name == "continuous" or clients != levels[-1]:
                await drain(url)  # the last level of the others may leave a long queue: not waited for
        if name == "continuous":
            for clients in (1, 64):
                key = f"{name} streamed, {clients} clients"
                rows[key] = (await run_level_http(url, workload, clients, window_s, stream=True)).summary()
                print(key, rows[key], flush=True)
                await drain(url)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def machine() -> dict[str, str]:
    import torch
    import transformers
    from machine_info import cpu_model

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({cpu_model()}, {os.cpu_count()} cores)"
    )
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="continuous,direct,naive,static64")
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (CPU runs)")
    parser.add_argument("--levels", default="1,8,64", help="client counts of the service runs")
    parser.add_argument("--step-tokens", type=int, default=2048, help="continuous engine: tokens per step")
    parser.add_argument("--model-dir", type=Path, help="serve this model folder instead of the Qwen shape")
    parser.add_argument("--prompt-range", default="128,512", help="prompt tokens, uniform in [lo, hi]")
    parser.add_argument("--mean-new", type=int, default=128)
    parser.add_argument("--max-new", type=int, default=MAX_NEW)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lockgate-bench-serving"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--report", type=Path, nargs="*", help="merge these JSON results into --out")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.report:
        write_report([json.loads(p.read_text()) for p in args.report], args.out)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = args.model_dir or args.workdir / "model"
    if args.model_dir is None:
        build_model(folder, args.layers)
    lo, hi = (int(n) for n in args.prompt_range.split(","))
    workload = Workload((lo, hi), args.mean_new, args.max_new)
    configurations = configs(args.max_new, args.step_tokens)
    results = {"machine": machine(), "window_s": args.window_s, "layers": _layers(folder),
               "weight_bytes": weight_bytes(folder), "model": str(args.model_dir or QWEN_SHAPE),
               "workload": {"prompt_tokens": [lo, hi], "mean_new": args.mean_new, "max_new": args.max_new},
               "step_tokens": args.step_tokens, "rows": {}}  # fmt: skip
    for name in args.only.split(","):
        started = time.perf_counter()
        try:
            if name == "direct":
                rows = asyncio.run(direct(folder, workload, args.window_s, configurations["continuous"]))
            else:
                levels = tuple(int(n) for n in args.levels.split(","))
                rows = asyncio.run(
                    through_service(
                        name, folder, workload, args.window_s, args.workdir, levels, configurations[name]
                    )
                )
        except Exception as exc:  # reported, not hidden: the other configurations still run
            rows = {name: {"error": f"{type(exc).__name__}: {exc}"[:400]}}
            print(name, "failed:", exc, flush=True)
        results["rows"].update(rows)
        print(f"{name} done in {time.perf_counter() - started:.0f} s", flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1))


def write_report(parts: list[dict], out: Path) -> None:
    rows: dict[str, dict] = {}
    for part in parts:  # each part is one invocation (one window length)
        rows.update({key: {**row, "window_s": part["window_s"]} for key, row in part["rows"].items()})
    first = parts[0]
    layers, wbytes = first["layers"], first["weight_bytes"]
    work = first.get("workload", {"prompt_tokens": [128, 512], "mean_new": 128, "max_new": MAX_NEW})
    lo, hi = work["prompt_tokens"]
    kv_per_token = layers * 2 * 64 * 2 * (2 if "CPU" not in first["machine"]["device"] else 4)

    def tps(key: str) -> float | None:
        return rows.get(key, {}).get("tokens_per_s")

    lines = [
        f"# Serving through the service on {first['machine']['device']}",
        "",
        f"torch {first['machine']['torch']}, transformers {first['machine']['transformers']}; "
        f"{first.get('model', QWEN_SHAPE)} ({layers} layers), {wbytes / 1e9:.3f} GB of weights; prompts "
        f"U[{lo}, {hi}] tokens, outputs Exp(mean {work['mean_new']}) capped at {work['max_new']}, greedy; "
        f"continuous engine {first.get('step_tokens', 2048)} tokens per step; closed-loop clients; tokens of "
        "requests finished inside the measuring window. "
        "`bench/bench_serving.py`.",
        "",
        "| configuration | clients | window s | requests | tokens/s | × naive (same clients) | "
        "× static-64 (same clients) | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"| {key} | – | – | – | – | – | – | – | – | – | {r['error']} |")
            continue
        c = int(r["clients"])
        naive = tps(f"naive, {c} clients")
        static = tps(f"static64, {c} clients")
        cells = [
            key, str(c), f"{r['window_s']:.0f}", str(int(r["requests"])), f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / naive:.1f}" if naive else "–",
            f"{r['tokens_per_s'] / static:.2f}" if static else "–",
            f"{r['ttft_ms_p50']:.0f}" if "ttft_ms_p50" in r else "–",
            f"{r['itl_ms_p50']:.1f}" if "itl_ms_p50" in r else "–",
            f"{r['itl_ms_p99']:.1f}" if "itl_ms_p99" in r else "–",
            str(int(r["errors"])),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Goals", ""]
    c64 = tps("continuous, 64 clients")
    naive_top = tps("naive, 64 clients")
    s64 = tps("static64, 64 clients")
    if c64 and naive_top:
        lines.append(f"- continuous / naive at 64 clients: {c64 / naive_top:.1f}× (goal ≥ 10×)")
    if c64 and s64:
        lines.append(f"- continuous / static-64 at 64 clients: {c64 / s64:.2f}× (goal ≥ 1.5×)")
    for clients in CLIENT_LEVELS:
        c, d = tps(f"continuous, {clients} clients"), tps(f"direct, {clients} clients")
        if c and d:
            overhead = 100 * (1 - c / d)
            lines.append(
                f"- service overhead at {clients} clients: {overhead:+.1f} % of the engine's tokens/s "
                "(goal ≤ 10 %)"
            )
    s1, s64r = rows.get("continuous streamed, 1 clients", {}), rows.get("continuous streamed, 64 clients", {})
    if "ttft_ms_p50" in s1 and "ttft_ms_p50" in s64r:
        lines.append(
            f"- streamed TTFT p50 at 64 / 1 clients: {s64r['ttft_ms_p50'] / s1['ttft_ms_p50']:.1f}× "
            "(goal ≤ 5×)"
        )
    if "itl_ms_p99" in s1 and "itl_ms_p99" in s64r:
        lines.append(
            f"- streamed ITL p99 at 64 / 1 clients: {s64r['itl_ms_p99'] / s1['itl_ms_p99']:.1f}× (goal ≤ 3×)"
        )
    on_gpu = not first["machine"]["device"].startswith("CPU")
    for key in ("continuous, 1 clients", "direct, 1 clients") if on_gpu else ():  # 3.35 TB/s is the H100's
        r = rows.get(key, {})
        if "decode_tok_s_p50" in r:
            per_step = wbytes + kv_per_token * r["context_tokens_mean"]
            frac = r["decode_tok_s_p50"] * per_step / HBM_BYTES_PER_S
            rate = r["decode_tok_s_p50"]
            lines.append(
                f"- batch-1 decode ({key}): {rate:.0f} tok/s × {per_step / 1e9:.3f} GB/step "
                f"= {100 * frac:.1f} % of 3.35 TB/s (goal ≥ 20 %)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(parts, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
