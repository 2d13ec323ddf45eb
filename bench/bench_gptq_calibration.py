"""INT4 group-32 GPTQ vs round-to-nearest on SmolLM2-135M-Instruct: how much calibration GPTQ needs.

Perplexity on data/smollm2/texts.jsonl (quality only: load changes the wall times, not the numbers) of
every Linear but lm_head quantized (a) by round-to-nearest, (b) by GPTQ with the smollm2 pipeline's
16 calibration prompts, (c) the same with 10 % damping, (d) GPTQ with every row of the three
data/smollm2 tasks rendered as a chat turn with its answer (112 rows). The functions are the quantize
step's (``quantize_linears``, ``gptq_in_place``).

    .venv/bin/python bench/bench_gptq_calibration.py /path/to/smollm2-folder    # ~8 min on 2 busy cores
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lockgate.bentos.quantized import QuantScheme, quantize_linears
from lockgate.tasks.compression import gptq
from lockgate.tasks.compression.quantize import gptq_in_place, linear_names, split_layers
from lockgate.tasks.compression.sensitivity import perplexity

DATA = Path(__file__).resolve().parent.parent / "data" / "smollm2"
INT4_G32 = QuantScheme(bits=4, granularity="group", group_size=32)


def main(folder: Path) -> None:
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parent = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    texts = tuple(json.loads(line)["text"] for line in (DATA / "texts.jsonl").open())
    pipeline_rows = tuple(pd.read_json(DATA / "capitals.jsonl", lines=True)["prompt"].astype(str)[:16])
    task_rows: list[str] = []
    for task in ("capitals", "arithmetic", "facts_mc"):
        frame = pd.read_json(DATA / f"{task}.jsonl", lines=True)
        task_rows += [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": str(a)}], tokenize=False
            )
            for p, a in zip(frame["prompt"], frame["answer"], strict=True)
        ]
    for label, rows in (("pipeline calibration", pipeline_rows), ("task rows", task_rows)):
        print(f"{label}: {len(rows)} rows, {sum(len(tokenizer(r)['input_ids']) for r in rows)} tokens")
    names = split_layers(linear_names(parent), ("lm_head",))[0]
    base = perplexity(parent, tokenizer, texts)
    print(f"parent: {base:.3f}", flush=True)

    def run(label: str, quantize: Callable[[torch.nn.Module], object]) -> None:
        model = copy.deepcopy(parent)
        started = time.perf_counter()
        quantize(model)
        elapsed = time.perf_counter() - started
        ppl = perplexity(model, tokenizer, texts)
        print(f"{label}: {ppl:.3f} {100 * (ppl / base - 1):+.2f} % ({elapsed:.0f} s)", flush=True)

    run("rtn", lambda m: quantize_linears(m, names, INT4_G32))
    run("gptq, pipeline calibration", lambda m: gptq_in_place(m, tokenizer, names, INT4_G32, pipeline_rows))
    default_damping, gptq.DAMPING = gptq.DAMPING, 0.1
    try:
        run(
            "gptq, pipeline calibration, damping 0.1",
            lambda m: gptq_in_place(m, tokenizer, names, INT4_G32, pipeline_rows),
        )
    finally:
        gptq.DAMPING = default_damping
    run("gptq, task rows", lambda m: gptq_in_place(m, tokenizer, names, INT4_G32, tuple(task_rows)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
