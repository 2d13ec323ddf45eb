"""SmolLM2-135M-Instruct: the sensitivity step's cost, and what batching its perplexity saves (issue 14).

The sensitivity step scores the calibration prompts once per probed unit (30 blocks, or 210 Linears
with ``unit: layer``). ``perplexity`` used to run one forward per prompt; it now right-pads the prompts
into batches (``tasks.compression.sensitivity.perplexity``). Measured here:

1. one scoring of the calibration prompts, prompt by prompt (the former way, kept below as the
   reference) vs batched, alternated for ``--rounds`` rounds: median and min-max seconds, and both
   perplexities (they must agree);
2. the whole sensitivity step (``tasks.compression.sensitivity.apply``) on the smollm2 pipeline's
   calibration prompts, ``unit: block`` and ``unit: layer``, with the smollm2 pipeline's INT8 recipe
   as the probe: wall seconds and seconds per unit.

    .venv/bin/python bench/bench_sensitivity.py              # ~5 min on 2 cores
    .venv/bin/python bench/bench_sensitivity.py --skip-layer # blocks only (~1 min)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine_info import cpu_model, write_report  # noqa: E402

from lockgate.flows.spec import SensitivityStep  # noqa: E402
from lockgate.flows.spec_loader import load_spec  # noqa: E402
from lockgate.tasks.compression import sensitivity  # noqa: E402
from lockgate.tasks.compression.base import StepContext  # noqa: E402
from lockgate.tasks.model_source import resolve_source  # noqa: E402
from lockgate.tasks.platform.datasets import load_dataset  # noqa: E402


def perplexity_one_by_one(model: Any, tokenizer: Any, texts: tuple[str, ...]) -> float:
    """The former scoring: one forward per prompt (the reference the batched version replaced)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-layer", action="store_true", help="do not run the 210-Linear step")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "sensitivity-cpu.md")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = load_spec(REPO / "pipelines.yaml").pipelines["smollm2"]
    parent = resolve_source(spec.model.source)
    prompts = tuple(load_dataset("calibration", spec.data.calibration, REPO)["prompt"].astype(str))
    quantize_step = spec.compress.candidates[0].steps[0].quantize
    load_before, started = os.getloadavg(), time.time()
    model = AutoModelForCausalLM.from_pretrained(parent, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(parent)
    timings: dict[str, list[float]] = {"one by one": [], "batched": []}
    values: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, score in (("one by one", perplexity_one_by_one), ("batched", sensitivity.perplexity)):
            t0 = time.perf_counter()
            values[name] = score(model, tokenizer, prompts)
            timings[name].append(time.perf_counter() - t0)
    del model
    steps = {"block": SensitivityStep(unit="block", samples=len(prompts))}
    if not args.skip_layer:
        steps["layer"] = SensitivityStep(unit="layer", samples=len(prompts))
    step_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sensitivity-") as tmp:
        for unit, step in steps.items():
            context = StepContext(
                parent=parent, calibration_prompts=prompts, train_pairs=(), next_quantize=quantize_step
            )
            t0 = time.perf_counter()
            outcome = sensitivity.apply(parent, Path(tmp) / unit, step, context)
            wall = time.perf_counter() - t0
            probed = int(outcome.metrics["units_probed"])
            step_rows.append((unit, probed, wall, int(outcome.metrics["units_kept"])))
            print(f"unit {unit}: {probed} units in {wall:.0f} s", flush=True)

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    ratio = [a / b for a, b in zip(timings["one by one"], timings["batched"], strict=True)]
    tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    lines = [
        "# SmolLM2-135M-Instruct: the sensitivity step on CPU (`bench/bench_sensitivity.py`)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared with other jobs",
        f"- Load average at start: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s",
        f"- Calibration: the smollm2 pipeline's {len(prompts)} prompts ({tokens} tokens); probe: its "
        f"quantize recipe (bits {quantize_step.bits}, {quantize_step.granularity}, {quantize_step.mode})",
        "",
        "## One scoring of the calibration prompts (alternated, "
        f"{args.rounds} rounds; seconds, median (min-max))",
        "",
        "| scoring | seconds | perplexity |",
        "|---|---|---|",
        f"| one forward per prompt (before) | {spread(timings['one by one'])} | {values['one by one']:.6f} |",
        f"| right-padded batches (now) | {spread(timings['batched'])} | {values['batched']:.6f} |",
        f"| speed-up | {spread(ratio)}× | |",
        "",
        "## The whole step (now)",
        "",
        "| unit | units probed | wall s | s per unit | units kept in float |",
        "|---|---|---|---|---|",
        *(f"| {u} | {n} | {w:.0f} | {w / n:.2f} | {k} |" for u, n, w, k in step_rows),
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
