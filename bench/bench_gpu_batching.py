"""Generation engines on a CUDA GPU at 1, 8 and 64 concurrent requests: which one the service
should batch with (issue 4's serving benchmark, engine level — no HTTP, no BentoML).

* naive: one ``generate`` call per request, one request at a time (what a per-request service does);
* static: ``generate`` on a padded batch of 64 (whole-request batching, like BentoML's adaptive
  batching for generation): everyone waits for the slowest;
* continuous: transformers' continuous batching (``generate_batch`` with at most C requests in the
  batch: a closed loop of C clients, a finished request's slot is refilled between decode steps).

Model: random weights with the shape of Qwen2-0.5B in bf16 (speed does not depend on weight values);
prompt 128 tokens, 128 new tokens, no EOS (every request generates all its tokens).

    python bench/bench_gpu_batching.py --out reports/bench/serving-gpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from model_shapes import qwen2_05b_config
from transformers import AutoModelForCausalLM, GenerationConfig

PROMPT = 128
NEW = 128


def build_model() -> torch.nn.Module:
    config = qwen2_05b_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.to("cuda").eval()


def prompts(n: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(10, vocab, (n, PROMPT), generator=generator).tolist()


def generation_config() -> GenerationConfig:
    # eos None: random weights would stop at random places; every request makes NEW tokens.
    return GenerationConfig(
        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )


@torch.inference_mode()
def naive(model: torch.nn.Module, requests: list[list[int]]) -> dict[str, float]:
    cfg = generation_config()
    latencies = []
    started = time.perf_counter()
    for ids in requests:
        t = time.perf_counter()
        model.generate(torch.tensor([ids], device="cuda"), generation_config=cfg)
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {"tokens_per_s": len(requests) * NEW / wall, "request_s_p50": statistics.median(latencies)}


@torch.inference_mode()
def static(model: torch.nn.Module, requests: list[list[int]]) -> dict[str, float]:
    cfg = generation_config()
    ids = torch.tensor(requests, device="cuda")
    model.generate(
        ids[:, :8],
        generation_config=GenerationConfig(**{**cfg.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4}),
    )
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(ids, generation_config=cfg)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return {"tokens_per_s": len(requests) * NEW / wall, "request_s_p50": wall}


def continuous(model: torch.nn.Module, requests: list[list[int]], clients: int) -> dict[str, float]:
    from transformers.generation import ContinuousBatchingConfig

    # Not under inference_mode: the manager updates its own static tensors in place (refused there).
    torch.cuda.empty_cache()
    cb = ContinuousBatchingConfig(max_requests_per_batch=clients, use_cuda_graph=True, max_memory_percent=0.5)
    cfg = generation_config()
    model.generate_batch(
        inputs=requests[:clients], generation_config=cfg, continuous_batching_config=cb, progress_bar=False
    )  # warm-up: graphs captured
    started = time.perf_counter()
    outputs = model.generate_batch(
        inputs=requests,
        generation_config=cfg,
        continuous_batching_config=cb,
        record_timestamps=True,
        progress_bar=False,
    )
    wall = time.perf_counter() - started
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    gaps, firsts = [], []
    for out in outputs.values():
        stamps = list(getattr(out, "timestamps", None) or [])
        if len(stamps) > 1:
            gaps += [b - a for a, b in itertools.pairwise(stamps)]
        created = getattr(out, "created_time", None)
        if stamps and created is not None:
            firsts.append(stamps[0] - created)
    if tokens < len(requests) * NEW:
        raise RuntimeError(f"continuous batching produced {tokens} of {len(requests) * NEW} tokens")
    result = {"tokens_per_s": tokens / wall, "tokens": float(tokens)}
    if gaps:
        gaps.sort()
        result["itl_ms_p50"] = 1000 * gaps[len(gaps) // 2]
        result["itl_ms_p99"] = 1000 * gaps[int(len(gaps) * 0.99)]
    if firsts:
        result["ttft_s_p50_from_submit"] = statistics.median(firsts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = build_model()
    vocab = model.config.vocab_size
    rows: dict[str, dict] = {}

    def run(name: str, fn, *fn_args) -> None:
        try:
            rows[name] = fn(*fn_args)
        except Exception as exc:  # an engine that cannot run here is reported, not hidden
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, json.dumps(rows[name]), flush=True)

    run("naive (1 request at a time)", naive, model, prompts(4, vocab))
    run("static batch 64", static, model, prompts(64, vocab))
    for clients in (1, 8, 64):
        run(f"continuous, {clients} clients", continuous, model, prompts(max(2 * clients, 8), vocab), clients)
    write(rows, args.out)


def write(rows: dict[str, dict], out: Path) -> None:
    naive_tps = rows.get("naive (1 request at a time)", {}).get("tokens_per_s")
    static_tps = rows.get("static batch 64", {}).get("tokens_per_s")
    lines = [
        f"# Generation engines on {torch.cuda.get_device_name(0)} (engine level, no HTTP)",
        "",
        f"torch {torch.__version__}; random Qwen2-0.5B shape, bf16, sdpa; prompt {PROMPT}, {NEW} new "
        "tokens, greedy, no EOS. `bench/bench_gpu_batching.py`.",
        "",
        "| engine | tokens/s | × naive | × static-64 | ITL p50 ms | ITL p99 ms | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | – | – | – | – | – | failed: {r['error']} |")
            continue
        tps = r["tokens_per_s"]
        x_naive = f"{tps / naive_tps:.1f}" if naive_tps else "–"
        x_static = f"{tps / static_tps:.2f}" if static_tps else "–"
        itl50 = f"{r['itl_ms_p50']:.1f}" if "itl_ms_p50" in r else "–"
        itl99 = f"{r['itl_ms_p99']:.1f}" if "itl_ms_p99" in r else "–"
        note = f"request {r['request_s_p50']:.2f} s" if "request_s_p50" in r else ""
        lines.append(f"| {name} | {tps:.0f} | {x_naive} | {x_static} | {itl50} | {itl99} | {note} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
