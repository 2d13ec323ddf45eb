"""Perplexity of INT8 variants of SmolLM2-135M-Instruct on data/smollm2/texts.jsonl (quality only).

Usage: ``.venv/bin/python bench/bench_int8_variants.py 'run("label", DYN, ignore=(...), alpha=0.5)' ...``
Each argument is one variant: a QuantScheme (WO, DYN, DYN_TENSOR), an ignore list (OUTLIERS are
SmolLM2's three outlier down_proj layers) and an optional SmoothQuant alpha / ``only`` set.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lockgate.bentos.quantized import QuantScheme, quantize_linears
from lockgate.tasks.compression.quantize import linear_names, split_layers
from lockgate.tasks.compression.sensitivity import perplexity
from lockgate.tasks.compression.smoothing import smooth_llama
from lockgate.tasks.model_source import resolve_source

DATA = Path(__file__).resolve().parent.parent / "data" / "smollm2"
OUTLIERS = tuple(f"model.layers.{i}.mlp.down_proj" for i in (11, 28, 29))
WO = QuantScheme(bits=8, mode="weight_only")
DYN = QuantScheme(bits=8, mode="dynamic", activations="per_token")
DYN_TENSOR = QuantScheme(bits=8, mode="dynamic", activations="per_tensor")


def main(variants: list[str]) -> None:
    torch.set_num_threads(2)
    source = resolve_source("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(source)
    parent = AutoModelForCausalLM.from_pretrained(source, dtype="float32").eval()
    texts = tuple(json.loads(line)["text"] for line in (DATA / "texts.jsonl").open())
    calibration = tuple(json.loads(line)["prompt"] for line in (DATA / "capitals.jsonl").open())[:16]
    names = linear_names(parent)
    start = time.time()
    base = perplexity(parent, tokenizer, texts)
    print(f"parent: {base:.4f} ({time.time() - start:.0f} s wall)", flush=True)

    def run(label: str, scheme: QuantScheme, ignore: tuple[str, ...] = ("lm_head",), alpha=None, only=None):
        model = copy.deepcopy(parent)
        if alpha is not None:
            smooth_llama(model, tokenizer, calibration, alpha, only)
        quantize_linears(model, split_layers(names, ignore)[0], scheme)
        ppl = perplexity(model, tokenizer, texts)
        print(f"{label}: {ppl:.4f} {100 * (ppl / base - 1):+.2f} %", flush=True)

    for variant in variants:
        eval(variant, {"run": run, "WO": WO, "DYN": DYN, "DYN_TENSOR": DYN_TENSOR, "OUTLIERS": OUTLIERS})


if __name__ == "__main__":
    main(sys.argv[1:])
