"""Distillation training speed on SmolLM2-135M-Instruct (CPU): what length-grouped batches and the teacher
logit cache save per step (issue 14: "distillation fast enough for real models").

Runs the real ``distill`` step (``tasks.compression.distill.apply``: half-depth student from the teacher's
blocks, T 4, α 0.5, β 0.5) three ways, on the same rows, seed and step count (two epochs):

- ``random-no-cache``: batches cut from the shuffled order as they come (``LENGTH_GROUP_BATCHES = 1``)
  and the teacher run at every step (``TEACHER_CACHE_BYTES = 0``): the step before this change;
- ``grouped``: length-grouped batches, teacher every step;
- ``grouped-cached``: length-grouped batches and the float16 teacher cache (the default now).

Rows: the capitals and arithmetic tasks of data/smollm2 as (prompt, answer) pairs and the paragraphs of
data/smollm2/texts.jsonl as unlabelled text (short questions next to 60-100-token paragraphs: the
length spread of real data). ``--rounds`` repeats the three in alternating order.

    .venv/bin/python bench/bench_distill_training.py              # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine_info import cpu_model, write_report  # noqa: E402

from lockgate.flows.spec import DistillStep  # noqa: E402
from lockgate.tasks.compression import distill, training  # noqa: E402
from lockgate.tasks.compression.base import StepContext  # noqa: E402

DATA = REPO / "data" / "smollm2"
#: name -> (LENGTH_GROUP_BATCHES, TEACHER_CACHE_BYTES)
VARIANTS = {
    "random-no-cache": (1, 0),
    "grouped": (training.LENGTH_GROUP_BATCHES, 0),
    "grouped-cached": (training.LENGTH_GROUP_BATCHES, distill.TEACHER_CACHE_BYTES),
}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).open()]


def run(parent: Path, context: StepContext, step: DistillStep, variant: str, workdir: Path) -> dict:
    training.LENGTH_GROUP_BATCHES, distill.TEACHER_CACHE_BYTES = VARIANTS[variant]
    started = time.perf_counter()
    outcome = distill.apply(parent, workdir / variant, step, context)
    return {
        "wall_s": time.perf_counter() - started,
        "s_per_step": outcome.report["seconds_per_step"],
        "padding_share": outcome.report["padding_share"],
        "cache": outcome.report["teacher_cache"],
        "loss_before": outcome.metrics["loss_before"],
        "loss_after": outcome.metrics["loss_after"],
        "kl_after": outcome.metrics["kl_after"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "distill-training-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from lockgate.tasks.model_source import resolve_source

    parent = resolve_source("smollm2-135m-instruct")
    pairs = tuple(
        (r["prompt"], str(r["answer"]))
        for name in ("capitals.jsonl", "arithmetic.jsonl")
        for r in _rows(name)
    )
    texts = tuple(r["text"] for r in _rows("texts.jsonl"))
    context = StepContext(parent=parent, calibration_prompts=texts, train_pairs=pairs)
    rows = len(pairs) + len(texts)
    steps = -(-rows * args.epochs // args.batch_size)
    step = DistillStep(
        layers_ratio=0.5,
        temperature=4.0,
        alpha=0.5,
        beta=0.5,
        steps=steps,
        batch_size=args.batch_size,
        lr=1e-4,
    )
    load_before, began = os.getloadavg(), time.time()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for n in range(args.rounds):
            order = list(VARIANTS) if n % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                results[variant].append(run(parent, context, step, variant, Path(tmp)))
                print(f"round {n + 1} {variant}: {results[variant][-1]}", flush=True)
    base = results["random-no-cache"]
    lines = [
        "# Distillation training speed on SmolLM2-135M-Instruct (CPU): length-grouped batches, teacher cache",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared machine",
        f"- Load average at start: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - began:.0f} s; "
        f"`bench/bench_distill_training.py --rounds {args.rounds}`",
        f"- Step: `distill` half depth (30 → 15 blocks from the teacher's), T 4, α 0.5, β 0.5, lr 1e-4, "
        f"batch {args.batch_size}, {steps} steps = {args.epochs} epochs of {rows} rows ({len(pairs)} "
        f"(prompt, answer) pairs from capitals + arithmetic, {len(texts)} paragraphs as unlabelled text)",
        "- s/step: training loop only (teacher + student forward, backward, optimizer), median over rounds "
        "(min-max); × = random-no-cache's s/step over the variant's, per round.",
        "",
        "| variant | s/step | speed-up × | padding share | teacher rows from cache | step wall s "
        "| loss before → after | KL after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        per_step = [r["s_per_step"] for r in runs]
        speedups = [b["s_per_step"] / r["s_per_step"] for r, b in zip(runs, base, strict=True)]
        cache = runs[0]["cache"]
        served = cache["row_hits"] / max(1, cache["row_hits"] + cache["row_misses"])
        lines.append(
            f"| {name} | {statistics.median(per_step):.2f} ({min(per_step):.2f}-{max(per_step):.2f}) "
            f"| {statistics.median(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f}) "
            f"| {runs[0]['padding_share']:.0%} | {served:.0%} "
            f"| {statistics.median(r['wall_s'] for r in runs):.0f} "
            f"| {runs[0]['loss_before']:.3f} → {runs[0]['loss_after']:.3f} | {runs[0]['kl_after']:.4f} |"
        )
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
