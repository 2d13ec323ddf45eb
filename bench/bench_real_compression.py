"""SmolLM2-135M-Instruct on CPU: parent vs INT8 vs INT4 round-to-nearest vs INT4 GPTQ (issue 14).

Every candidate is made by the real ``quantize`` step (``tasks.compression.quantize.apply``) from the
calibration rows of the ``smollm2`` pipeline in pipelines.yaml, saved, and loaded back the way the
service loads a candidate folder (``bentos.runtime.load_model``). Variants:

- ``int8-pipeline``: the smollm2 pipeline's own INT8 recipe (read from pipelines.yaml);
- ``int8-dynamic``: the README's recommendation for SmolLM2 (per-token dynamic INT8, the three outlier
  down_proj layers in float);
- ``int4-rtn`` / ``int4-gptq``: INT4 weight-only, group 32, every Linear but lm_head;
- ``int4-rtn-asym`` / ``int4-float-zero``: the same with an asymmetric grid, its zero point an integer
  code or a float (``zero_point: float``, the grid of the Q4_1 GGUF file the parent was converted from).

Measured per candidate:

- decode tokens/s (batch 1, greedy, KV cache) and prefill tokens/s of one few-shot chat prompt of the
  pipeline's first task, as ratios to the parent measured in pairs (parent, candidate, parent,
  candidate ...) for ``--rounds`` rounds: the median ratio and its min-max spread over the rounds;
- weights size ratio (files on disk);
- perplexity of data/smollm2/texts.jsonl (every token; ``tasks.compression.sensitivity.perplexity``);
- the pipeline's own evaluation (``tasks.evaluate.evaluate_pair`` with the smollm2 pipeline's
  ``evaluate`` spec): answer perplexity and accuracy with bootstrap intervals, flips, KL, gates;
- the quantize step's wall time.

    .venv/bin/python bench/bench_real_compression.py                   # ~10 min on 2 busy cores
    .venv/bin/python bench/bench_real_compression.py --eval-rows 20    # fewer evaluation rows per task
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Before torch starts its OpenMP pool: threads waiting at a barrier sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402

from lockgate.bentos.runtime import LoadedModel, load_model, weights_size_bytes  # noqa: E402
from lockgate.flows.release import load_task_frames  # noqa: E402
from lockgate.flows.spec import QuantizeStep  # noqa: E402
from lockgate.flows.spec_loader import load_spec  # noqa: E402
from lockgate.tasks.compression import quantize  # noqa: E402
from lockgate.tasks.compression.base import StepContext  # noqa: E402
from lockgate.tasks.compression.sensitivity import perplexity  # noqa: E402
from lockgate.tasks.evaluate import Evaluation, evaluate_pair  # noqa: E402
from lockgate.tasks.platform.datasets import load_dataset  # noqa: E402

PIPELINE = "smollm2"
OUTLIERS = tuple(f"*.layers.{i}.mlp.down_proj" for i in (11, 28, 29))
INT4_G32 = {"bits": 4, "granularity": "group", "group_size": 32, "ignore": ("lm_head",)}


def variants(pipeline_int8: QuantizeStep) -> dict[str, QuantizeStep]:
    return {
        "int8-pipeline": pipeline_int8,
        "int8-dynamic": QuantizeStep(bits=8, mode="dynamic", ignore=("lm_head", *OUTLIERS)),
        "int4-rtn": QuantizeStep(**INT4_G32, method="rtn"),
        "int4-gptq": QuantizeStep(**INT4_G32, method="gptq"),
        "int4-rtn-asym": QuantizeStep(**INT4_G32, scheme="asymmetric"),
        # The Q4_1 grid of the GGUF file SmolLM2 comes from (group 32, float minimum per group).
        "int4-float-zero": QuantizeStep(**INT4_G32, scheme="asymmetric", zero_point="float"),
    }


@dataclass
class Pairs:
    """Per round: (parent, candidate) tokens/s measured back to back."""

    decode: list[tuple[float, float]] = field(default_factory=list)
    prefill: list[tuple[float, float]] = field(default_factory=list)

    @staticmethod
    def ratios(pairs: list[tuple[float, float]]) -> list[float]:
        return [cand / parent for parent, cand in pairs]


def time_once(lm: LoadedModel, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy run through the loaded model."""
    model = lm.model
    with torch.inference_mode():
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = ids.shape[1] / (time.perf_counter() - started)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        decode = decode_tokens / (time.perf_counter() - started)
    return prefill, decode


def measure_pairs(
    parent: LoadedModel,
    candidates: dict[str, LoadedModel],
    ids: torch.Tensor,
    decode_tokens: int,
    rounds: int,
) -> dict[str, Pairs]:
    for lm in (parent, *candidates.values()):
        time_once(lm, ids, decode_tokens)  # warm-up: first calls at a new shape are slower
    pairs = {name: Pairs() for name in candidates}
    for _ in range(rounds):
        for name, lm in candidates.items():
            p_prefill, p_decode = time_once(parent, ids, decode_tokens)
            c_prefill, c_decode = time_once(lm, ids, decode_tokens)
            pairs[name].decode.append((p_decode, c_decode))
            pairs[name].prefill.append((p_prefill, c_prefill))
    return pairs


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parent", type=Path, default=None, help="default: model.source of the pipeline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=None, help="rows per evaluation task (default all)")
    parser.add_argument(
        "--texts", type=int, default=None, help="first N paragraphs of texts.jsonl (default all)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "real-compression-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()
    started = time.perf_counter()

    _, spec = load_spec(REPO / "pipelines.yaml").pipeline(PIPELINE)
    if args.parent is None:
        from lockgate.tasks.model_source import resolve_source

        args.parent = resolve_source(spec.model.source)
    calibration = tuple(load_dataset("calibration", spec.data.calibration, REPO)["prompt"].astype(str))
    steps = variants(spec.compress.candidates[0].steps[0].quantize)
    if args.only:
        steps = {name: step for name, step in steps.items() if name in args.only}
    eval_spec = spec.evaluate
    if args.eval_rows is not None:
        eval_spec = eval_spec.model_copy(update={"max_samples": args.eval_rows})
    task_frames = load_task_frames(eval_spec, REPO)
    eval_frame = load_dataset("eval", spec.data.eval, REPO)
    texts = tuple(json.loads(line)["text"] for line in (REPO / "data" / "smollm2" / "texts.jsonl").open())
    texts = texts[: args.texts]

    parent = load_model(args.parent, device="cpu")
    # One few-shot chat prompt of the first task, rendered as evaluation and serving render it.
    from lockgate.tasks.evaluate import prepare_tasks

    prompt = prepare_tasks(parent.tokenizer, eval_frame, eval_spec, task_frames)[0].prompts[0]
    ids = parent.tokenizer(prompt, return_tensors="pt")["input_ids"]
    print(f"prompt: {ids.shape[1]} tokens; calibration: {len(calibration)} prompts", flush=True)

    rows: dict[str, dict] = {"parent": {"size": weights_size_bytes(args.parent)}}
    t0 = time.perf_counter()
    rows["parent"]["text_ppl"] = perplexity(parent.model, parent.tokenizer, texts)
    print(f"parent: texts perplexity {rows['parent']['text_ppl']:.4f} ({time.perf_counter() - t0:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-real-") as tmp:
        context = StepContext(parent=args.parent, calibration_prompts=calibration, train_pairs=())
        candidates: dict[str, LoadedModel] = {}
        folders: dict[str, Path] = {}
        for name, step in steps.items():
            t0 = time.perf_counter()
            folders[name] = quantize.apply(args.parent, Path(tmp) / name, step, context).folder
            row = rows[name] = {
                "compress_s": time.perf_counter() - t0,
                "size": weights_size_bytes(folders[name]),
            }
            candidates[name] = load_model(folders[name], device="cpu")
            row["text_ppl"] = perplexity(candidates[name].model, candidates[name].tokenizer, texts)
            print(
                f"{name}: quantize {row['compress_s']:.1f} s, texts perplexity {row['text_ppl']:.4f}",
                flush=True,
            )
        pairs = measure_pairs(parent, candidates, ids, args.decode_tokens, args.rounds)
        for name, p in pairs.items():
            rows[name]["pairs"] = p
            print(f"{name}: decode x {spread(p.ratios(p.decode))}, prefill x {spread(p.ratios(p.prefill))}")
        del candidates
        for name, folder in folders.items():
            t0 = time.perf_counter()
            rows[name]["eval"] = evaluate_pair(
                args.parent, folder, eval_frame, eval_spec, task_frames=task_frames, eval_format="chat"
            )
            rows[name]["eval_s"] = time.perf_counter() - t0
            print(f"{name}: evaluated in {rows[name]['eval_s']:.0f} s", flush=True)
    report = render(rows, args, ids.shape[1], len(calibration), load_before, time.perf_counter() - started)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")


def _loads(values: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def _ci(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:+.1f}, {interval[1]:+.1f}]"


def render(
    rows: dict[str, dict],
    args: argparse.Namespace,
    prompt_tokens: int,
    calibration: int,
    load_before: tuple[float, ...],
    elapsed: float,
) -> str:
    parent = rows["parent"]
    names = [n for n in rows if n != "parent"]
    speed = [
        "| candidate | decode × parent, median (min-max) | prefill × parent | parent decode tok/s | "
        "candidate decode tok/s | parent prefill tok/s | candidate prefill tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    quality = [
        "| variant | quantize wall s | size MB | size × | texts ppl | Δ texts ppl % "
        "| answer ppl Δ % [95 % CI] | accuracy | Δ accuracy % [95 % CI] "
        "| flips % | top-1 agree | KL | gates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| parent | — | {parent['size'] / 1e6:.1f} | 1.000 | {parent['text_ppl']:.3f} | — | — | "
        + (f"{_first_eval(rows).baseline.accuracy:.3f}" if names else "—")
        + " | — | — | — | — | — |",
    ]
    for name in names:
        row = rows[name]
        p: Pairs = row["pairs"]
        med = statistics.median
        speed.append(
            f"| {name} | {spread(p.ratios(p.decode))} | {spread(p.ratios(p.prefill))} "
            f"| {med(x for x, _ in p.decode):.1f} | {med(y for _, y in p.decode):.1f} "
            f"| {med(x for x, _ in p.prefill):.0f} | {med(y for _, y in p.prefill):.0f} |"
        )
        ev: Evaluation = row["eval"]
        ppl, acc = ev.intervals["perplexity"], ev.intervals["accuracy"]
        failed = [g.metric for g in ev.gates if not g.passed]
        quality.append(
            f"| {name} | {row['compress_s']:.1f} | {row['size'] / 1e6:.1f} "
            f"| {row['size'] / parent['size']:.3f} "
            f"| {row['text_ppl']:.3f} | {100 * (row['text_ppl'] / parent['text_ppl'] - 1):+.2f} "
            f"| {100 * (ppl.candidate / ppl.baseline - 1):+.1f} {_ci(ppl.change_pct_ci)} "
            f"| {acc.candidate:.3f} | {100 * (acc.candidate / acc.baseline - 1):+.1f} "
            f"{_ci(acc.change_pct_ci)} "
            f"| {ev.distance.flip_pct:.1f} | {ev.distance.top1_agreement:.3f} | {ev.distance.kl_mean:.4f} "
            f"| {'pass' if not failed else 'FAIL: ' + ', '.join(failed)} |"
        )
    paragraphs = f"the first {args.texts}" if args.texts else "all"
    rows_per_task = ", ".join(f"{t.name} {t.rows}" for t in _first_eval(rows).tasks.values()) if names else ""
    return "\n".join(
        [
            "# SmolLM2-135M-Instruct on CPU: parent vs INT8 vs INT4 RTN vs INT4 GPTQ "
            "(`bench/bench_real_compression.py`)",
            "",
            f"- Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}; shared with other "
            "developers' jobs",
            f"- Load average (1/5/15 min) at start: {_loads(load_before)}; at end: {_loads(os.getloadavg())}",
            f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s; parent "
            f"`{args.parent}`; calibration: the smollm2 pipeline's {calibration} rows",
            f"- Speed: one few-shot chat prompt of {prompt_tokens} tokens (prefill, logits of the last "
            f"position only) then {args.decode_tokens} greedy tokens at batch 1 with the KV cache, through "
            "the model `bentos.runtime.load_model` returns for the saved folder. Each round times the "
            f"parent then the candidate back to back; {args.rounds} rounds; × = candidate tokens/s / parent "
            "tokens/s of the same round, median and (min-max) over the rounds.",
            f"- Quality: texts ppl = every token of {paragraphs} paragraphs of "
            "data/smollm2/texts.jsonl (24 in all); answer ppl, "
            "accuracy, flips, top-1 agreement and KL = the smollm2 pipeline's `evaluate` "
            f"(`tasks.evaluate.evaluate_pair`; rows scored: {rows_per_task}), 95 % bootstrap intervals of "
            "the change, gates as the pipeline sets them (noise-tolerant rule).",
            "",
            "## Speed (ratios vs the parent, interleaved)",
            "",
            *speed,
            "",
            "## Size, quality, compression time",
            "",
            *quality,
            "",
            "## Goals of issue 14",
            "",
            "| goal | candidate | measured | verdict |",
            "|---|---|---|---|",
            *goal_rows(rows),
            "",
        ]
    )


def _first_eval(rows: dict[str, dict]) -> Evaluation:
    return next(row["eval"] for name, row in rows.items() if name != "parent")


def goal_rows(rows: dict[str, dict]) -> list[str]:
    parent = rows["parent"]
    lines = []
    for name, row in rows.items():
        if name == "parent":
            continue
        p: Pairs = row["pairs"]
        decode = statistics.median(p.ratios(p.decode))
        ppl = 100 * (row["text_ppl"] / parent["text_ppl"] - 1)
        size = row["size"] / parent["size"]
        if name.startswith("int8"):
            checks = [
                ("decode ≥ 1.5× parent", f"{decode:.2f}×", decode >= 1.5),
                ("perplexity ≤ +2 %", f"{ppl:+.2f} %", ppl <= 2),
            ]
        else:
            checks = [
                ("size ≤ 0.35× parent", f"{size:.3f}×", size <= 0.35),
                ("perplexity ≤ +5 %", f"{ppl:+.2f} %", ppl <= 5),
                ("not slower than the parent (decode)", f"{decode:.2f}×", decode >= 1.0),
            ]
        lines += [
            f"| {goal} | {name} | {value} | {'met' if ok else 'NOT met'} |" for goal, value, ok in checks
        ]
    return lines


if __name__ == "__main__":
    main()
