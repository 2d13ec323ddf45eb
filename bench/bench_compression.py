"""FP32 vs INT8 (dynamic, weight-only) vs INT4 on CPU, side by side in one run.

Two models: (a) the demo model lockgate trains itself (``tasks.demo_model``); (b) a randomly
initialised model with Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
tied embeddings; speed does not depend on the weight values). Each variant is produced by the real
``quantize`` step (default mixed-precision ignore list: lm_head, embeddings, first and last blocks)
and loaded through ``bentos.runtime.load_model``, i.e. exactly what evaluation and serving run.

Measured per variant: prefill time of a ``--prompt-tokens`` prompt (one forward, logits of the last
position only, as ``generate`` does), greedy decode tokens/s at batch 1 over ``--decode-tokens``
steps with the KV cache, weights size ratio, and on the demo model the perplexity of its eval set.
Variants are measured in interleaved rounds (``--rounds``, ``--qwen-rounds``) so load changes on the shared
machine hit every variant alike. Writes ``reports/bench/compression-cpu.md`` unless ``--quick``.

    .venv/bin/python bench/bench_compression.py              # ~5-10 min on 2 busy cores
    .venv/bin/python bench/bench_compression.py --quick      # tiny shapes, prints only
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Before torch starts its OpenMP pool: threads waiting at a barrier sleep instead of spinning, so
# CPU time counts work, not waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(REPO))
logging.getLogger("torchao").setLevel(logging.ERROR)

import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402
from model_shapes import qwen2_05b_config  # noqa: E402

from lockgate.bentos.runtime import LoadedModel, load_model, weights_size_bytes  # noqa: E402
from lockgate.flows.spec import QuantizeStep  # noqa: E402
from lockgate.tasks.compression import quantize  # noqa: E402
from lockgate.tasks.compression.base import StepContext  # noqa: E402
from lockgate.tasks.compression.sensitivity import perplexity  # noqa: E402

VARIANTS: dict[str, QuantizeStep | None] = {
    "fp32": None,
    "int8-dynamic": QuantizeStep(bits=8, mode="dynamic"),
    # Every Linear in INT8, lm_head included (only the embedding table stays FP32): at batch 1
    # lm_head is the largest single matmul (151936 x 896 for Qwen2-0.5B), so the default rule caps
    # decode speed-up at FP32 bytes / INT8-variant bytes ~ 2x on the Qwen shape.
    "int8-dynamic-all-linears": QuantizeStep(bits=8, mode="dynamic", ignore=("*embed*",)),
    "int8-weight-only": QuantizeStep(bits=8, mode="weight_only"),
    "int4-g32-weight-only": QuantizeStep(bits=4, granularity="group", group_size=32),
    # Every block quantized (only lm_head and embeddings in FP32): how far size can go. Size and
    # perplexity only; its speed is that of the row above.
    "int4-g32-all-blocks": QuantizeStep(
        bits=4, granularity="group", group_size=32, ignore=("lm_head", "*embed*")
    ),
}
UNTIMED = ("int4-g32-all-blocks",)


@dataclass
class Timing:
    prefill_s: list[float]
    decode_tok_s: list[float]
    #: The same runs in CPU seconds of this process (both threads): unlike wall time, barely
    #: affected by how much of the shared cores other agents' processes take at that moment.
    prefill_cpu_s: list[float]
    decode_tok_per_cpu_s: list[float]


def build_qwen_shape(folder: Path, vocab: int, tokenizer_from: Path, layers: int) -> Path:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    config = qwen2_05b_config(vocab, num_hidden_layers=layers)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    # The quantize step saves a tokenizer next to the weights; the timings use random token ids.
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def make_variants(parent: Path, root: Path, prompts: tuple[str, ...]) -> dict[str, Path]:
    folders = {"fp32": parent}
    context = StepContext(parent=parent, calibration_prompts=prompts, train_pairs=())
    for name, step in VARIANTS.items():
        if step is not None:
            started = time.perf_counter()
            folders[name] = quantize.apply(parent, root / name, step, context).folder
            print(f"  quantized {name} in {time.perf_counter() - started:.1f}s", flush=True)
    return folders


def time_once(lm: LoadedModel, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, float, float]:
    """(prefill s, decode tokens/s, prefill CPU s, decode tokens per CPU s) of one greedy run."""
    model = lm.model
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill, prefill_cpu = time.perf_counter() - wall, time.process_time() - cpu
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = decode_tokens / (time.perf_counter() - wall)
        decode_cpu = decode_tokens / (time.process_time() - cpu)
    return prefill, decode, prefill_cpu, decode_cpu


def measure(
    models: dict[str, LoadedModel], ids: torch.Tensor, decode_tokens: int, rounds: int
) -> dict[str, Timing]:
    timings = {name: Timing([], [], [], []) for name in models}
    for lm in models.values():
        # Warm-up at full size: fbgemm's first calls at a new shape were measured 2-5x slower.
        time_once(lm, ids, decode_tokens)
    for _ in range(rounds):
        for name, lm in models.items():
            prefill, decode, prefill_cpu, decode_cpu = time_once(lm, ids, decode_tokens)
            timings[name].prefill_s.append(prefill)
            timings[name].decode_tok_s.append(decode)
            timings[name].prefill_cpu_s.append(prefill_cpu)
            timings[name].decode_tok_per_cpu_s.append(decode_cpu)
    return timings


def bench_model(
    title: str,
    parent: Path,
    root: Path,
    ids: torch.Tensor,
    decode_tokens: int,
    rounds: int,
    prompts: tuple[str, ...],
    eval_texts: tuple[str, ...] | None,
) -> list[dict]:
    print(f"{title}: quantizing", flush=True)
    folders = make_variants(parent, root, prompts)
    models = {name: load_model(folder, device="cpu") for name, folder in folders.items()}
    timed = {name: lm for name, lm in models.items() if name not in UNTIMED}
    print(f"{title}: timing {len(timed)} variants x {rounds} rounds", flush=True)
    timings = measure(timed, ids, decode_tokens, rounds)
    base_size = weights_size_bytes(parent)
    rows = []
    for name, lm in models.items():
        nan = [float("nan")]
        t = timings.get(name, Timing(nan, nan, nan, nan))
        row = {
            "variant": name,
            # Primary: median CPU time. Wall time: best of the rounds (load only ever slows a round).
            "prefill_cpu_ms": 1e3 * statistics.median(t.prefill_cpu_s),
            "decode_tok_per_cpu_s": statistics.median(t.decode_tok_per_cpu_s),
            "prefill_ms": 1e3 * min(t.prefill_s),
            "decode_tok_s": max(t.decode_tok_s),
            "size_mb": weights_size_bytes(folders[name]) / 1e6,
            "size_ratio": weights_size_bytes(folders[name]) / base_size,
        }
        if eval_texts is not None:
            row["perplexity"] = perplexity(lm.model, lm.tokenizer, eval_texts)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_cpu_ms"] / row["prefill_cpu_ms"]
        row["decode_speedup"] = row["decode_tok_per_cpu_s"] / base["decode_tok_per_cpu_s"]
        row["wall_prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["wall_decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        if "perplexity" in row:
            row["ppl_increase_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
    for row in rows:
        print(f"  {row}", flush=True)
    del models
    return rows


def table(rows: list[dict]) -> str:
    ppl = "perplexity" in rows[0]
    head = (
        "| variant | prefill CPU ms | prefill × | decode tok per CPU s | decode × | wall: prefill ms "
        "(×) | wall: decode tok/s (×) | size MB | size ratio |"
    )
    head += " perplexity | Δ ppl % |" if ppl else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if math.isnan(r["prefill_ms"]):
            timing = "| not timed (as the row above) | | | | | "
        else:
            timing = (
                f"| {r['prefill_cpu_ms']:.1f} | {r['prefill_speedup']:.2f} "
                f"| {r['decode_tok_per_cpu_s']:.2f} | {r['decode_speedup']:.2f} "
                f"| {r['prefill_ms']:.1f} ({r['wall_prefill_speedup']:.2f}) "
                f"| {r['decode_tok_s']:.2f} ({r['wall_decode_speedup']:.2f}) "
            )
        line = f"| {r['variant']} {timing}| {r['size_mb']:.2f} | {r['size_ratio']:.3f} |"
        if ppl:
            line += f" {r['perplexity']:.4f} | {r['ppl_increase_pct']:+.2f} |"
        lines.append(line)
    return "\n".join(lines)


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"quantized engine {torch.backends.quantized.engine}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round, print only")
    parser.add_argument("--rounds", type=int, default=3, help="demo model")
    parser.add_argument("--qwen-rounds", type=int, default=2, help="Qwen-shape model")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16, help="demo model")
    parser.add_argument("--qwen-decode-tokens", type=int, default=8, help="Qwen-shape model")
    parser.add_argument("--qwen-vocab", type=int, default=151936, help="Qwen2-0.5B's real vocabulary")
    parser.add_argument("--qwen-layers", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "compression-cpu.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompt_tokens, args.qwen_vocab, args.qwen_layers = 1, 32, 4096, 4
        args.qwen_rounds = 1
        args.decode_tokens = args.qwen_decode_tokens = 4
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()
    started = time.perf_counter()

    from lockgate.tasks.demo.corpus import demo_dataset
    from lockgate.tasks.demo.model import ensure_demo_model

    demo = ensure_demo_model(Path(os.environ.get("LOCKGATE_DEMO_CACHE", REPO / ".lockgate" / "demo-cache")))
    calibration = tuple(demo_dataset("calibration")["prompt"])
    frame = demo_dataset("eval")
    eval_texts = tuple(f"{p} {a}" for p, a in zip(frame["prompt"], frame["answer"], strict=True))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-compress-") as tmp:
        root = Path(tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(demo)
        # A long prompt of real text for the demo model (its positions stop at 256).
        text = " ".join(calibration)
        demo_ids = tok(text, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
        results["demo"] = bench_model(
            "demo model",
            demo,
            root / "demo",
            demo_ids,
            args.decode_tokens,
            args.rounds,
            calibration[:16],
            eval_texts,
        )
        qwen = build_qwen_shape(root / "qwen-fp32", args.qwen_vocab, demo, args.qwen_layers)
        torch.manual_seed(1)
        qwen_ids = torch.randint(0, args.qwen_vocab, (1, args.prompt_tokens))
        results["qwen"] = bench_model(
            "qwen2-0.5b shape",
            qwen,
            root / "qwen",
            qwen_ids,
            args.qwen_decode_tokens,
            args.qwen_rounds,
            calibration[:4],
            None,
        )
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started
    report = render(results, args, load_before, load_after, elapsed)
    print(report)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")


def _loads(values: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def render(
    results: dict[str, list[dict]],
    args: argparse.Namespace,
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    elapsed: float,
) -> str:
    return "\n".join(
        [
            "# Compression on CPU: FP32 vs INT8 vs INT4 (`bench/bench_compression.py`)",
            "",
            f"- Machine: {machine()}",
            f"- Load average (1/5/15 min) at start: {_loads(load_before)}; at end: {_loads(load_after)} "
            "(the machine is shared; the variants are interleaved per round so load hits all alike)",
            f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s; "
            f"{args.rounds} (demo) / {args.qwen_rounds} (Qwen shape) interleaved rounds; "
            f"prompt {args.prompt_tokens} tokens; "
            f"decode {args.decode_tokens} (demo) / {args.qwen_decode_tokens} (Qwen shape) tokens at "
            "batch 1, greedy, KV cache",
            "- Speed: median CPU seconds of the process (`time.process_time`, both threads, "
            "`OMP_WAIT_POLICY=PASSIVE` so idle threads do not spin) — on a machine shared with other "
            "agents, wall time measures the scheduler more than the kernels; wall time is given as the "
            "best round beside it. Ratios (×) are FP32 / variant, > 1 is faster.",
            "- Variants come from the `quantize` step with its default ignore list (lm_head, embeddings, "
            "first and last blocks stay FP32) and load through `bentos.runtime.load_model`.",
            "",
            "## (a) Demo model (1.03 M parameters, 4 blocks of width 128)",
            "",
            table(results["demo"]),
            "",
            f"## (b) Random model with Qwen2-0.5B's shape (vocab {args.qwen_vocab}, "
            f"{args.qwen_layers} layers)",
            "",
            table(results["qwen"]),
            "",
            "## Goals of issue 3",
            "",
            "| model | goal | measured | verdict |",
            "|---|---|---|---|",
            *goal_rows(results),
            "",
        ]
    )


def goal_rows(results: dict[str, list[dict]]) -> list[str]:
    """One line per goal and model: INT8 (dynamic) speed and perplexity, INT4 size."""
    lines = []
    for model, rows in results.items():
        by_name = {r["variant"]: r for r in rows}
        checks = []
        for name in ("int8-dynamic", "int8-dynamic-all-linears"):
            int8 = by_name[name]
            checks += [
                (
                    f"INT8 decode ≥ 1.8× FP32 ({name})",
                    int8["decode_speedup"],
                    int8["decode_speedup"] >= 1.8,
                    "×",
                ),
                (
                    f"INT8 prefill ≥ 1.5× FP32 ({name})",
                    int8["prefill_speedup"],
                    int8["prefill_speedup"] >= 1.5,
                    "×",
                ),
            ]
            if "ppl_increase_pct" in int8:
                increase = int8["ppl_increase_pct"]
                checks.append((f"INT8 perplexity ≤ +1 % ({name})", increase, increase <= 1, " %"))
        for name in ("int4-g32-weight-only", "int4-g32-all-blocks"):
            ratio = by_name[name]["size_ratio"]
            checks.append((f"INT4 size ≤ 0.3× FP32 ({name})", ratio, ratio <= 0.3, "×"))
        lines += [
            f"| {model} | {goal} | {value:.2f}{unit} | {'met' if ok else 'MISSED'} |"
            for goal, value, ok, unit in checks
        ]
    return lines


if __name__ == "__main__":
    main()
