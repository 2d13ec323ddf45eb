"""SmolLM2-135M-Instruct served by vLLM: the float parent vs lockgate's INT8 and INT4 candidates exported as
compressed-tensors (``bentos/compressed_export.py``), decode speed at batch 1 and at 8 concurrent requests.

Runs in the serving environment (vLLM). The candidates are made here with lockgate's own quantizer
(``bentos.quantized``: round-to-nearest, the same codes the compress stage writes), exported, and each
variant is measured in its own process (vLLM's CPU engine core busy-polls a core: two engines at once
would measure each other). Passes alternate the variants (A B C D, A B C D, ...) so that the machine's
drift hits every variant alike; the table gives the median and the min-max over the passes.

    .venv-serve/bin/python bench/bench_vllm_quantized.py                 # ~6 min on 2 cores
    .venv-serve/bin/python bench/bench_vllm_quantized.py --passes 2 --tokens 64

Each variant's perplexity of data/smollm2/texts.jsonl is scored by vLLM itself (``prompt_logprobs``):
the quality of what vLLM serves, its own kernels and activation rounding included.

Variants: ``parent-fp32`` (the checkpoint's dtype, what lockgate's service asks vLLM for),
``parent-bf16``, ``int8-w8a8`` (lockgate ``mode: dynamic`` per-token; the three outlier down_proj layers
of SmolLM2 and lm_head in float: the README's recipe) and ``int4-w4a16`` (group 32, every Linear but
lm_head; exported in bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
TEXTS = REPO / "data" / "smollm2" / "texts.jsonl"
OUTLIERS = tuple(f"model.layers.{i}.mlp.down_proj" for i in (11, 28, 29))


def _parent() -> Path:
    """The SmolLM2 safetensors folder converted from the GGUF source (`make run PIPELINE=smollm2`)."""
    cache = REPO / ".lockgate" / "cache" / "gguf"
    folders = sorted(p for p in cache.glob("*") if (p / "config.json").is_file()) if cache.is_dir() else []
    if not folders:
        raise SystemExit(f"no converted SmolLM2 under {cache}: run `make run PIPELINE=smollm2` once")
    return folders[0]


def prepare(workdir: Path) -> dict[str, tuple[Path, str | None]]:
    """(folder, dtype for vLLM) of every variant; the candidates quantized and exported once."""
    from conftest import quantize_folder
    from lockgate.bentos.compressed_export import export
    from lockgate.bentos.quantized import QuantScheme

    parent = _parent()
    int8 = quantize_folder(parent, workdir / "int8", QuantScheme(mode="dynamic"), ("lm_head", *OUTLIERS))
    int4 = quantize_folder(parent, workdir / "int4", QuantScheme(bits=4, granularity="group", group_size=32))
    return {
        "parent-fp32": (parent, "float32"),
        "parent-bf16": (parent, "bfloat16"),
        "int8-w8a8": (export(int8, workdir / "int8-ct"), None),
        "int4-w4a16": (export(int4, workdir / "int4-ct"), None),
    }


def measure(folder: str, dtype: str | None, tokens: int) -> dict[str, float]:
    """One variant in this process: batch-1 decode tokens/s and 8-concurrent output tokens/s."""
    from vllm import LLM, SamplingParams

    kwargs = {"dtype": dtype} if dtype else {}
    # An explicit KV size: vLLM CPU otherwise reserves 92 % of the machine's memory and refuses to start when
    # less is free (a shared machine).
    llm = LLM(
        model=folder,
        max_model_len=1024,
        enforce_eager=True,
        max_num_seqs=8,
        kv_cache_memory_bytes=1 << 29,
        **kwargs,
    )
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))  # warm-up
        started = time.perf_counter()
        out = llm.generate([PROMPT], params)
        single = len(out[0].outputs[0].token_ids) / (time.perf_counter() - started)
        started = time.perf_counter()
        outs = llm.generate([PROMPT] * 8, params)
        batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started)
        return {"decode_tok_s": single, "batch8_tok_s": batch, "texts_ppl": texts_perplexity(llm)}
    finally:
        # Stop the engine-core process: left running, it keeps this child's output pipes open.
        llm.llm_engine.engine_core.shutdown()


def texts_perplexity(llm) -> float:  # vllm.LLM: vLLM is imported in the child process only
    """exp(mean next-token NLL) of every token of data/smollm2/texts.jsonl as vLLM computes it
    (``prompt_logprobs``), token ids from the same tokenizer call as lockgate's
    ``tasks.compression.sensitivity.perplexity``, so the two numbers score the same tokens."""
    import math

    from vllm import SamplingParams, TokensPrompt

    tokenizer = llm.get_tokenizer()
    texts = [json.loads(line)["text"] for line in TEXTS.open()]
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(text)["input_ids"]) for text in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    nll, count = 0.0, 0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = prompt["prompt_token_ids"]
        for position in range(1, len(ids)):
            nll -= out.prompt_logprobs[position][ids[position]].logprob
            count += 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "vllm-quantized-cpu.md")
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # child process: one variant
        folder, dtype, tokens = args.measure
        print(
            "RESULT " + json.dumps(measure(folder, None if dtype == "-" else dtype, int(tokens))), flush=True
        )
        # Skip the interpreter's teardown: vLLM's leftover threads abort it ("terminate called without
        # an active exception", exit -6) after the result is out and the engine core has stopped.
        os._exit(0)
    from machine_info import cpu_model, write_report

    load_before = os.getloadavg()
    started = time.time()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-q-") as tmp:
        variants = prepare(Path(tmp))
        for n in range(args.passes):
            for name, (folder, dtype) in variants.items():
                command = [sys.executable, __file__, "--measure", str(folder), dtype or "-", str(args.tokens)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
                results.setdefault(name, []).append(json.loads(lines[-1].removeprefix("RESULT ")))
                print(f"pass {n + 1} {name}: {results[name][-1]}", flush=True)
        sizes = {
            name: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
            for name, (folder, _) in variants.items()
        }
    base = results["parent-fp32"]

    def cell(name: str, key: str) -> str:
        values = [r[key] for r in results[name]]
        ratios = [r[key] / b[key] for r, b in zip(results[name], base, strict=True)]
        return (
            f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) "
            f"| {statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f})"
        )

    lines = [
        "# SmolLM2-135M-Instruct on vLLM (CPU): float parent vs lockgate INT8 / INT4 as compressed-tensors",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores; vLLM CPU build (.venv-serve); shared machine",
        f"- Load average at start: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s; "
        f"{args.passes} passes alternating the variants, each variant in its own process",
        f"- Decode: one chat prompt, {args.tokens} greedy tokens (ignore_eos) at batch 1; batch 8: the same "
        "prompt 8 times at once, output tokens/s. × = ratio to parent-fp32 of the same pass.",
        "",
        "- Texts perplexity: every token of data/smollm2/texts.jsonl scored by vLLM (`prompt_logprobs`) "
        "in the same process; Δ vs parent-fp32 scored by vLLM the same way (deterministic: pass 1's value).",
        "",
        "| variant | weights MB | decode tok/s, median (min-max) | decode × parent-fp32 "
        "| batch-8 tok/s | batch-8 × | texts ppl (vLLM) | Δ ppl % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_ppl = base[0]["texts_ppl"]
    for name in results:
        decode, batch = cell(name, "decode_tok_s"), cell(name, "batch8_tok_s")
        ppl = results[name][0]["texts_ppl"]
        lines.append(
            f"| {name} | {sizes[name] / 1e6:.0f} | {decode} | {batch} | {ppl:.3f} "
            f"| {100 * (ppl / base_ppl - 1):+.2f} |"
        )
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
