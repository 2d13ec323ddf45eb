"""INT8 / INT4 weight-only vs bf16 on a CUDA GPU: decode tokens/s at batch 1 and 32, perplexity,
and the CUDA kernels that ran.

Speed is measured on a randomly initialised model with the shape of Qwen2-0.5B (speed does not
depend on weight values); perplexity on lockgate's trained demo model (a random model has no
meaningful perplexity). The quantized variants are what lockgate's ``quantize`` step produces on
CUDA: torchao configs applied through transformers' ``TorchAoConfig``.

    python bench/bench_gpu_quant.py --demo-model PATH --out reports/bench/compression-gpu.md

Needs a CUDA device, torch, transformers and torchao (see bench/README.md for the device run).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from model_shapes import qwen2_05b_config
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

PROMPT_TOKENS = 32
NEW_TOKENS = 128


def variants() -> dict[str, Callable[[], TorchAoConfig | None]]:
    """Name -> quantization config factory (None: plain bf16)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    return {
        "bf16": lambda: None,
        "int8-weight-only": lambda: TorchAoConfig(Int8WeightOnlyConfig()),
        # tinygemm's tile-packed INT4 layout: a kernel that ships inside PyTorch's CUDA build.
        "int4-weight-only-g128": lambda: TorchAoConfig(
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        ),
    }


def load(folder: Path, config: TorchAoConfig | None) -> torch.nn.Module:
    kwargs = {"quantization_config": config} if config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", **kwargs)
    return model.eval()


def weights_bytes(model: torch.nn.Module) -> int:
    # Quantized tensor subclasses report their packed storage through the state dict tensors.
    total = 0
    for tensor in model.state_dict().values():
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def decode_tokens_per_s(
    model: torch.nn.Module, batch: int, vocab: int, static: bool = False
) -> dict[str, float]:
    """Decode speed of ``generate``; ``static``: static KV cache, which transformers compiles
    (torch.compile, CUDA graphs) on CUDA. Best of two timed runs after a full-length warm-up."""
    ids = torch.randint(0, vocab, (batch, PROMPT_TOKENS), device="cuda")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    started = time.perf_counter()
    model.generate(ids, **kwargs)  # warm-up (and compilation when static)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    elapsed = math.inf
    for _ in range(2):
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        elapsed = min(elapsed, time.perf_counter() - started)
    # Prefill separately so decode speed is not diluted by it.
    started = time.perf_counter()
    model(ids)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - started
    decode = max(elapsed - prefill, 1e-9)
    return {
        "tokens_per_s": batch * NEW_TOKENS / decode,
        "ms_per_step": decode / NEW_TOKENS * 1000,
        "prefill_ms": prefill * 1000,
        "warmup_s": warmup_s,
    }


@torch.inference_mode()
def top_kernels(model: torch.nn.Module, vocab: int, n: int = 4) -> list[str]:
    """Names of the CUDA kernels that took the most time in one batch-1 forward pass."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (1, 1), device="cuda")
    model(ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True)
    return [e.key[:90] for e in events if getattr(e, "device_time_total", 0) > 0][:n]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, tokenizer: AutoTokenizer, texts: list[str]) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to("cuda")
        out = model(ids, labels=ids)
        nll += float(out.loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def read_texts(path: Path) -> list[str]:
    """Eval rows (prompt + answer) as the demo model sees them: one JSON object per line."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["prompt"] + " " + str(row["answer"]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-model", type=Path, required=True)
    parser.add_argument("--texts", type=Path, required=True, help="JSON lines with prompt, answer.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2-0.5b-shape"
        config = qwen2_05b_config()
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(args.demo_model)
        texts = read_texts(args.texts)
        for name, factory in variants().items():
            row: dict = {}
            try:
                model = load(folder, factory())
                row["weights_MB"] = weights_bytes(model) / 1e6
                for batch in (1, 32):
                    row[f"batch{batch}"] = decode_tokens_per_s(model, batch, config.vocab_size)
                row["kernels"] = top_kernels(model, config.vocab_size)
                try:
                    row["batch1_static"] = decode_tokens_per_s(model, 1, config.vocab_size, static=True)
                except Exception as exc:  # compile failures are reported per variant
                    row["batch1_static_error"] = f"{type(exc).__name__}: {exc}"[:300]
                del model
                torch.cuda.empty_cache()
                demo = load(args.demo_model, factory())
                row["demo_perplexity"] = perplexity(demo, tokenizer, texts)
                del demo
            except Exception as exc:  # a variant that cannot run here is reported, not hidden
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            results[name] = row
            print(name, json.dumps(row, indent=1), flush=True)
    write_report(results, args.out)


def write_report(results: dict[str, dict], out: Path) -> None:
    gpu = torch.cuda.get_device_name(0)
    bf16 = results.get("bf16", {})
    bw_bytes = bf16.get("weights_MB", 0) * 1e6
    lines = [
        f"# Weight-only quantization on {gpu}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {platform.platform()}; model: random "
        f"Qwen2-0.5B shape (bf16 weights {bw_bytes / 1e9:.2f} GB), prompt {PROMPT_TOKENS} tokens, "
        f"{NEW_TOKENS} new tokens, HF `generate` (eager, dynamic KV cache), greedy.",
        "",
        "| variant | weights MB | b1 tok/s | b1 ms/step | b32 tok/s | b1 prefill ms | demo ppl | b1 vs bf16 |"
        " b32 vs bf16 | b1 static+compiled tok/s | its ms/step | its share of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base1 = bf16.get("batch1", {}).get("tokens_per_s")
    base32 = bf16.get("batch32", {}).get("tokens_per_s")
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | – | – | – | – | – | – | failed: {row['error']} | |")
            continue
        b1, b32 = row["batch1"], row["batch32"]
        static = row.get("batch1_static")
        if static:
            bound = row["weights_MB"] * 1e6 / (static["ms_per_step"] / 1000) / 3.35e12
            compiled = f"{static['tokens_per_s']:.1f} | {static['ms_per_step']:.2f} | {bound:.1%}"
        else:
            compiled = f"failed: {row.get('batch1_static_error', '?')} | | "
        lines.append(
            f"| {name} | {row['weights_MB']:.0f} | {b1['tokens_per_s']:.1f} | {b1['ms_per_step']:.2f} | "
            f"{b32['tokens_per_s']:.0f} | {b1['prefill_ms']:.1f} | {row['demo_perplexity']:.4f} | "
            f"{b1['tokens_per_s'] / base1:.2f}x | {b32['tokens_per_s'] / base32:.2f}x | {compiled} |"
        )
    lines += ["", "Kernels with the most GPU time in one batch-1 decode step:", ""]
    for name, row in results.items():
        if "kernels" in row:
            lines.append(f"- **{name}**: " + "; ".join(f"`{k}`" for k in row["kernels"]))
    if base1:
        step_s = results["bf16"]["batch1"]["ms_per_step"] / 1000
        fraction = bw_bytes / step_s / 3.35e12
        lines += [
            "",
            f"bf16 batch-1 eager decode moves ~{bw_bytes / 1e9:.2f} GB of weights per step: "
            f"{step_s * 1000:.2f} ms per step is {fraction:.1%} of the H100's 3.35 TB/s memory-bandwidth "
            "bound (weights only; the KV cache of a 160-token context is <1 % of that). Eager decode is "
            "bound by Python and kernel-launch overhead, not by memory, which is why weight-only "
            "quantization changes it little; the static-cache compiled column removes most of that.",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
