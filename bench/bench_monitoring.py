"""Benchmark of the monitor's two costs: the Evidently drift report and the per-request request-log write.

Prints, and writes as markdown to reports/bench/monitoring-cpu.md (with the machine and its load):
  1. the drift report of tasks/monitor.py (``evidently_drift``: Report.run with one ValueDrift per
     column + DriftedColumnsCount, HTML and JSON saved, snapshot parsed into typed results) over
     --rows reference + --rows current rows x 20 columns (18 numeric, 2 categorical; 7 shifted), best
     of --repeats; goal (issue 6) <= 15 s on 2 cores. Also the offline text descriptors of --rows
     prompts (tasks/request_window.text_descriptors), which the monitor computes before the report;
  2. the per-request monitoring overhead in the service: ``RequestLog.append`` (one committed SQLite
     WAL row) and the whole ``Accounting.finish`` of bentos/accounting.py (row + Prometheus metrics +
     JSON log line), against the latency of a real ``LoadedModel.generate`` (bentos/runtime.py) of a
     small random Llama on CPU — a deliberately fast model, so the ratio is a worst case; goal < 1 %.

Run: .venv/bin/python bench/bench_monitoring.py   (about 1-2 min on 2 cores; --quick for a smoke run)
Timings are wall-clock on a shared machine: the load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from machine_info import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUT = REPO_ROOT / "reports" / "bench" / "monitoring-cpu.md"


def machine_description() -> list[str]:
    cpu = cpu_model()
    packages = ", ".join(
        f"{p} {metadata.version(p)}"
        for p in ("evidently", "pandas", "numpy", "scipy", "torch", "transformers")
    )
    return [
        f"- nproc: {os.cpu_count()} (sched_getaffinity {len(os.sched_getaffinity(0))})",
        f"- CPU: {cpu}",
        f"- Python: {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}",
        f"- packages: {packages}",
    ]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------ drift report
def drift_frames(rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """20 columns like the monitor's: lengths/counts (lognormal), shares (beta), 2 categorical (script,
    endpoint). The current frame shifts 7 of them (3 counts, 3 shares, the script mix): real drift to find."""
    rng = np.random.default_rng(seed)

    def frame(shift: float, cyrillic: float) -> pd.DataFrame:
        data: dict[str, np.ndarray] = {}
        for i in range(9):
            moved = shift if i < 3 else 0.0
            data[f"count_{i}"] = np.round(rng.lognormal(3.0 + moved, 0.6, rows))
        for i in range(9):
            moved = shift if i < 3 else 0.0
            data[f"share_{i}"] = rng.beta(2.0 + 4 * moved, 8.0, rows)
        data["script"] = rng.choice(
            ["latin", "cyrillic", "cjk"], rows, p=[0.9 - cyrillic, 0.05 + cyrillic, 0.05]
        )
        data["endpoint"] = rng.choice(["generate", "generate_stream"], rows, p=[0.7, 0.3])
        return pd.DataFrame(data)

    return frame(0.0, 0.0), frame(0.3, 0.2)


@dataclass(frozen=True)
class DriftTiming:
    rows: int
    columns: int
    best_s: float
    all_s: tuple[float, ...]
    drifted: int
    share: float
    html_mb: float
    json_kb: float
    import_s: float
    descriptors_s: float


def bench_drift(rows: int, repeats: int) -> DriftTiming:
    started = time.perf_counter()
    import evidently  # noqa: F401  (import timed on its own: a scheduled monitor pays it once per run)

    import_s = time.perf_counter() - started
    from lockgate.flows.spec import DriftSpec
    from lockgate.tasks.monitor import evidently_drift
    from lockgate.tasks.monitoring.window import text_descriptors

    reference, current = drift_frames(rows)
    spec = DriftSpec()
    timings: list[float] = []
    result = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / str(i)
            t0 = time.perf_counter()
            result = evidently_drift(current, reference, spec, out, "bench")
            timings.append(time.perf_counter() - t0)
        assert result is not None
        dataset, _, html, js, _ = result
        html_mb, json_kb = html.stat().st_size / 1e6, js.stat().st_size / 1e3
    words = ["what", "is", "the", "sum", "of", "plus", "answer", "число", "ответ", "42"]
    rng = np.random.default_rng(1)
    prompts = pd.Series([" ".join(rng.choice(words, size=rng.integers(4, 20))) for _ in range(rows)])
    t0 = time.perf_counter()
    text_descriptors(prompts, "prompt")
    descriptors_s = time.perf_counter() - t0
    return DriftTiming(
        rows,
        reference.shape[1],
        min(timings),
        tuple(timings),
        dataset.count,
        dataset.share,
        html_mb,
        json_kb,
        import_s,
        descriptors_s,
    )


# ------------------------------------------------------------------------------------------ overhead
def tiny_model(folder: Path) -> Path:
    """A random Llama (hidden 64, 2 blocks), real BPE tokenizer: fast, so overhead ratios are a worst case."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [f"Q: what is {a} plus {b}?\nA: {a + b}" for a in range(30) for b in range(10)]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


@dataclass(frozen=True)
class Overhead:
    requests: int
    append_median_ms: float
    append_mean_ms: float
    append_p99_ms: float
    append_text_median_ms: float
    finish_median_ms: float
    finish_mean_ms: float
    finish_p99_ms: float
    generate_median_ms: float
    generate_mean_ms: float
    generate_p99_ms: float
    new_tokens: int


def bench_overhead(requests: int, generations: int, new_tokens: int) -> Overhead:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "")  # single-process prometheus_client
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        from lockgate.bentos.request_log import RequestLog, RequestRow

        log = RequestLog(Path(tmp) / "requests.sqlite")

        def row(with_text: bool) -> RequestRow:
            return RequestRow(
                ts=time.time(),
                request_id=uuid.uuid4().hex,
                service_role="stable",
                model_name="bench",
                model_version="1",
                endpoint="generate",
                user_hash="0123456789abcdef",
                prompt_chars=42,
                prompt_tokens=12,
                output_tokens=16,
                latency_ms=35.0,
                status="ok",
                prompt="Q: what is 12 plus 7? please answer quickly" if with_text else None,
                output="A: 19 and that is the answer to the question" if with_text else None,
            )

        def timed_appends(with_text: bool) -> list[float]:
            out = []
            for _ in range(requests):
                r = row(with_text)
                t0 = time.perf_counter()
                log.append(r)
                out.append((time.perf_counter() - t0) * 1000)
            return out

        plain = timed_appends(False)
        text = timed_appends(True)
        log.close()

        # The whole per-request accounting of the service (row + metrics + JSON line), as it runs there.
        from lockgate.bentos.accounting import Accounting, RequestRecord
        from lockgate.bentos.config import ServiceEnv

        logging.getLogger("lockgate.requests").handlers = [logging.NullHandler()]
        logging.getLogger("lockgate.requests").propagate = False
        accounting = Accounting(ServiceEnv(request_log=Path(tmp) / "service.sqlite"))
        finish: list[float] = []
        for _ in range(requests):
            record = RequestRecord(uuid.uuid4().hex, "generate", time.perf_counter())
            record.claimed, record.status = True, "ok"
            record.prompt_chars, record.prompt_tokens, record.output_tokens = 42, 12, 16
            t0 = time.perf_counter()
            accounting.finish(record)
            finish.append((time.perf_counter() - t0) * 1000)
        accounting.request_log.close()

        from lockgate.bentos.runtime import load_model

        model = load_model(tiny_model(Path(tmp) / "model"), device="cpu")
        prompt = "Q: what is 12 plus 7?"
        for _ in range(3):  # warm-up: allocator, kernel selection
            model.generate([prompt], new_tokens)
        gen: list[float] = []
        for _ in range(generations):
            t0 = time.perf_counter()
            model.generate([prompt], new_tokens)
            gen.append((time.perf_counter() - t0) * 1000)
    return Overhead(
        requests,
        statistics.median(plain),
        statistics.fmean(plain),
        _percentile(plain, 99),
        statistics.median(text),
        statistics.median(finish),
        statistics.fmean(finish),
        _percentile(finish, 99),
        statistics.median(gen),
        statistics.fmean(gen),
        _percentile(gen, 99),
        new_tokens,
    )


# ------------------------------------------------------------------------------------------ report
def render(drift: DriftTiming, over: Overhead, command: str, load_start: str, load_end: str) -> str:
    ratio_append = over.append_median_ms / over.generate_median_ms * 100
    ratio_finish = over.finish_median_ms / over.generate_median_ms * 100
    ratio_finish_mean = over.finish_mean_ms / over.generate_mean_ms * 100
    ratio_text = over.append_text_median_ms / over.generate_median_ms * 100
    lines = [
        "# Monitoring — CPU benchmark",
        "",
        "## Machine",
        "",
        *machine_description(),
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_end} "
        "(other agents share the cores)",
        "",
        f"Command: `{command}`",
        "",
        f"## Evidently drift report: {drift.rows:,} reference + {drift.rows:,} current rows × "
        f"{drift.columns} columns",
        "",
        "`tasks.monitor.evidently_drift` as the monitor runs it: one `ValueDrift` per column (methods "
        "resolved by the spec's auto rule: wasserstein for numeric, jensenshannon for categorical above "
        "1000 reference rows) + `DriftedColumnsCount`, HTML and JSON written, snapshot parsed into typed "
        "results.",
        "",
        "| | value |",
        "|---|---:|",
        f"| best of {len(drift.all_s)} (goal ≤ 15 s) | **{drift.best_s:.1f} s** |",
        f"| all runs | {', '.join(f'{t:.1f} s' for t in drift.all_s)} |",
        f"| drifted columns found (7 shifted) | {drift.drifted} (share {drift.share:.2f}) |",
        f"| HTML / JSON size | {drift.html_mb:.1f} MB / {drift.json_kb:.0f} kB |",
        f"| `import evidently` (once per monitor process) | {drift.import_s:.1f} s |",
        f"| offline text descriptors of {drift.rows:,} prompts (before the report) | "
        f"{drift.descriptors_s:.1f} s |",
        "",
        "## Per-request monitoring overhead vs request latency",
        "",
        f"{over.requests:,} requests each; generation: `LoadedModel.generate`, one prompt, "
        f"{over.new_tokens} new tokens, greedy, a random 2-block hidden-64 Llama on CPU (fast on purpose: "
        "a real model only lowers the ratio).",
        "",
        "| | median | mean | p99 | median / generate median | mean / generate mean |",
        "|---|---:|---:|---:|---:|---:|",
        f"| `RequestLog.append` (features only, default) | {over.append_median_ms:.3f} ms | "
        f"{over.append_mean_ms:.3f} ms | {over.append_p99_ms:.3f} ms | **{ratio_append:.2f} %** | "
        f"{over.append_mean_ms / over.generate_mean_ms * 100:.2f} % |",
        f"| `RequestLog.append` with prompt/output text (`LOCKGATE_LOG_TEXT=1`) | "
        f"{over.append_text_median_ms:.3f} ms | | | {ratio_text:.2f} % | |",
        f"| `Accounting.finish` (row + Prometheus metrics + JSON log line) | {over.finish_median_ms:.3f} ms"
        " | "
        f"{over.finish_mean_ms:.3f} ms | {over.finish_p99_ms:.3f} ms | **{ratio_finish:.2f} %** | "
        f"{ratio_finish_mean:.2f} % |",
        f"| `LoadedModel.generate` ({over.new_tokens} tokens) | {over.generate_median_ms:.1f} ms | "
        f"{over.generate_mean_ms:.1f} ms | {over.generate_p99_ms:.1f} ms | | |",
        "",
        f"Goal (issue 6): monitoring adds < 1 % to request latency — "
        f"{'met' if max(ratio_finish, ratio_finish_mean) < 1 else 'NOT met'} for the whole accounting "
        f"({ratio_finish:.2f} % of the median, {ratio_finish_mean:.2f} % of the mean latency).",
        "",
        "Notes: the request-log write is one SQLite WAL commit with synchronous=NORMAL (no fsync per row). "
        "Its tail (a mean above the median, even above p99) is the WAL checkpoint every ~1000 pages, a few "
        "ms paid by well under 1 % of requests, plus a contended core. The p99 of the whole accounting is "
        f"{over.finish_p99_ms / over.generate_median_ms * 100:.1f} % of the median generation. "
        "On a loaded machine both sides slow down; the generation here is a 2-block toy, so a real model's "
        "latency (tens of ms per token) makes the share smaller still. The drift report's cost grows with "
        "rows x columns; `import evidently` is paid once per monitor process, not per report.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="reference rows = current rows")
    parser.add_argument("--repeats", type=int, default=2, help="drift report runs (best is reported)")
    parser.add_argument("--requests", type=int, default=3000, help="timed request-log writes")
    parser.add_argument("--generations", type=int, default=30, help="timed generate calls")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats, args.requests, args.generations = 5000, 1, 300, 5
    load_start = load()
    drift = bench_drift(args.rows, args.repeats)
    over = bench_overhead(args.requests, args.generations, args.new_tokens)
    command = "python bench/bench_monitoring.py" + (" --quick" if args.quick else "")
    text = render(drift, over, command, load_start, load())
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
