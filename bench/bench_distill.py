"""Benchmark of structural compression on CPU: a half-depth student and pruned models vs the parent.

For each model shape, every variant is timed side by side in one run, on the same prompt, with the
variants interleaved in each repeat (so load from other processes hits them alike):

* ``parent``: the model as given;
* ``student-half-depth``: ``tasks.compression.distill.derive_student`` with layers_ratio 0.5 (the
  speed of a student does not depend on whether it was trained yet);
* ``heads-50%``: ``prune_heads`` at sparsity 0.5 (whole KV groups, magnitude importance);
* ``neurons-50%``: ``prune_mlp_neurons`` at sparsity 0.5.

Shapes: the demo model (``tasks.demo_model``, 4 blocks x 128) and a randomly initialised model of
the shape of Qwen2-0.5B (hidden 896, 24 blocks, 14 heads / 2 KV heads, MLP 4864, tied embeddings),
once with its real 151,936-token vocabulary and once with the vocabulary shrunk to 32,000: the
output head is computed for every decoded token and does not shrink with depth, so it bounds the
student's speed-up. Speed does not depend on the weight values, so random weights are fine.

Measured per variant: prefill time of ``--prompt-tokens`` tokens and decode tokens/s over
``--decode-tokens`` greedy steps with the KV cache (batch 1, fp32, ``logits_to_keep=1`` at prefill
as ``generate`` does). Then, on the demo model, exact match and perplexity on the 300 held-out
questions of every variant, plus the half-depth student after a ``--distill-steps`` distillation.

Run: .venv/bin/python bench/bench_distill.py   (a few minutes on 2 cores; --quick for a smoke run)
Timings are wall clock on a shared machine: compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from model_shapes import qwen2_05b_config  # noqa: E402

from lockgate.tasks.compression import distill, prune, recover  # noqa: E402
from lockgate.tasks.compression.base import StepContext  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "reports" / "bench" / "distill-cpu.md"
DEMO_CACHE = REPO_ROOT / ".lockgate" / "demo-cache"
SPEEDUP_GOAL = 1.8
#: How to read the tables; static text written under the verdict.
READING = """## Reading the numbers

- **Depth alone cannot halve decode time when the output head is large.** Every decoded token runs
  the output head (vocab x hidden), which a half-depth student keeps whole. With Qwen2-0.5B's 151,936
  tokens the head is 136 M of the 494 M multiply-adds per token, so halving the 24 blocks can make
  decode at most ~1.57x faster if time follows compute (the "MAC bound" column); the >= 1.8x goal is
  out of reach for that shape by construction, and the measurement agrees. With the vocabulary shrunk
  to 32,000 the bound is 1.86x: the goal is reachable but leaves ~3 % for everything that does not
  shrink with depth (embedding lookup, final norm, the Python loop), so on a shared machine a run
  lands either side of 1.8x. Prefill with `logits_to_keep=1` (as `generate` does) runs the head for
  one position only, so there the bound is ~2x at any vocabulary.
- **The demo model is overhead-bound**: 1 M parameters, so a decoded token costs mostly Python and
  kernel-launch time per block, not arithmetic; half the blocks remove about half of that, which is
  why its decode speed-up sits near, not above, the 1.87x MAC bound.
- **Head pruning buys little here**: with grouped-query attention (14 query / 2 KV heads) the
  attention projections are ~12 % of a block's weights and the 64-token context makes the attention
  itself cheap, so removing half the heads (one whole KV group and its 7 query heads) changes decode
  by ~1.05x. MLP neurons are ~88 % of a block: halving them gives most of a half-depth student's
  gain while keeping every block.
- **Unstructured sparsity is not timed**: its tensors keep their shapes, dense matmuls multiply the
  zeros too, and it gains nothing on this hardware (the prune step says so in its report).
- **Perplexity vs exact match after `recover`**: the LoRA loss is on answer tokens only, so a
  recovered model can answer better (exact match up) while the perplexity of the whole
  `prompt answer` sequence, prompt tokens included, gets worse.
- Timings are wall clock on a machine shared with other jobs (see the load averages); the variants
  are interleaved in every repeat so they share the disturbance, and one torch thread avoids OpenMP
  barrier stalls when another process holds the second core. Compare ratios, not absolute numbers.
"""


@dataclass(frozen=True)
class Timing:
    variant: str
    params: int
    #: Multiply-adds of one decoded token in the Linear layers, output head included (embedding
    #: lookups and attention over the cache excluded): the compute bound of the decode speed-up.
    macs_per_token: int
    prefill_s: list[float]
    decode_tps: list[float]

    @property
    def prefill_best(self) -> float:
        return min(self.prefill_s)

    @property
    def decode_best(self) -> float:
        return max(self.decode_tps)

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_s)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tps)

    def prefill_speedup(self, parent: Timing) -> float:
        """Median over repeats of parent time / own time, paired within each repeat: a repeat
        disturbed by other load slows both sides of its ratio, unlike a ratio of medians."""
        return statistics.median([p / s for p, s in zip(parent.prefill_s, self.prefill_s, strict=True)])

    def decode_speedup(self, parent: Timing) -> float:
        return statistics.median([s / p for p, s in zip(parent.decode_tps, self.decode_tps, strict=True)])


# ---------------------------------------------------------------------------------------- models
def variants(parent: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The parent and its structurally smaller relatives (weights derived from the parent)."""
    magnitude = prune.make_scorer("magnitude", None)
    heads, neurons = copy.deepcopy(parent), copy.deepcopy(parent)
    with torch.no_grad():
        prune.prune_heads(heads, magnitude, 0.5)
        prune.prune_mlp_neurons(neurons, magnitude, 0.5)
    student = distill.derive_student(parent, 0.5, 1.0).model
    models = {"parent": parent, "student-half-depth": student, "heads-50%": heads, "neurons-50%": neurons}
    for model in models.values():
        model.eval()
    return models


def qwen2_shaped(vocab: int) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = qwen2_05b_config(vocab)
    return Qwen2ForCausalLM(config)


def describe(model: torch.nn.Module) -> str:
    c = model.config
    heads = f"{c.num_attention_heads}/{c.num_key_value_heads} heads"
    return (
        f"{c.num_hidden_layers} blocks, hidden {c.hidden_size}, {heads}, MLP {c.intermediate_size}, "
        f"vocab {c.vocab_size}"
    )


# ---------------------------------------------------------------------------------------- timing
def time_once(model: torch.nn.Module, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation with the KV cache."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return prefill, decode_tokens / decode


def time_variants(
    models: dict[str, torch.nn.Module], vocab: int, prompt_tokens: int, decode_tokens: int, repeats: int
) -> list[Timing]:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, vocab, (1, prompt_tokens), generator=generator)
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        time_once(model, prompt[:, :8], 2)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(repeats):
        # Alternate the order (ABCD, DCBA, ...) so a slow drift in machine load favours no variant.
        for name in names if repeat % 2 == 0 else names[::-1]:
            p, d = time_once(models[name], prompt, decode_tokens)
            prefill[name].append(p)
            decode[name].append(d)
    return [
        Timing(
            name,
            sum(p.numel() for p in model.parameters()),
            linear_macs(model),
            prefill[name],
            decode[name],
        )
        for name, model in models.items()
    ]


def linear_macs(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def timing_table(timings: list[Timing]) -> list[str]:
    parent = timings[0]
    lines = [
        "| variant | params (M) | prefill s, median (best) | prefill speed-up, paired median (bests) | "
        "decode tok/s, median (best) | decode speed-up, paired median (bests) | MAC bound |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        prefill_up = t.prefill_speedup(parent)
        lines.append(
            f"| {t.variant} | {t.params / 1e6:.2f} | {t.prefill_median:.4f} ({t.prefill_best:.4f}) "
            f"| {prefill_up:.2f}x ({parent.prefill_best / t.prefill_best:.2f}x) "
            f"| {t.decode_median:.1f} ({t.decode_best:.1f}) "
            f"| {t.decode_speedup(parent):.2f}x ({t.decode_best / parent.decode_best:.2f}x) "
            f"| {parent.macs_per_token / t.macs_per_token:.2f}x |"
        )
    return lines


# --------------------------------------------------------------------------------------- quality
def perplexity(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Perplexity of ``prompt answer</s>``, the definition tasks.evaluate uses."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in pairs:
            ids = tokenizer(f"{prompt} {answer}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[*ids, tokenizer.eos_token_id]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll -= float(log_probs.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def quality(models: dict[str, torch.nn.Module], tokenizer, pairs: list[tuple[str, str]]) -> list[str]:
    from lockgate.tasks.demo.model import exact_match

    lines = ["| variant | exact match | perplexity |", "|---|---:|---:|"]
    for name, model in models.items():
        accuracy, ppl = exact_match(model, tokenizer, pairs), perplexity(model, tokenizer, pairs)
        lines.append(f"| {name} | {accuracy:.3f} | {ppl:.3f} |")
    return lines


def demo_context(parent_dir: Path) -> StepContext:
    from lockgate.tasks.demo.corpus import demo_dataset

    train = demo_dataset("train")
    return StepContext(
        parent=parent_dir,
        calibration_prompts=tuple(demo_dataset("calibration")["prompt"]),
        train_pairs=tuple(zip(train["prompt"], train["answer"], strict=True)),
    )


def distil_demo(context: StepContext, steps: int, work: Path) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForCausalLM

    from lockgate.flows.spec import DistillStep

    step = DistillStep(layers_ratio=0.5, steps=steps, batch_size=16, lr=1e-3, temperature=4.0)
    outcome = distill.apply(context.parent, work / "student", step, context)
    return AutoModelForCausalLM.from_pretrained(outcome.folder).eval(), outcome.report


def recover_demo(
    pruned: torch.nn.Module, tokenizer, context: StepContext, steps: int, work: Path
) -> torch.nn.Module:
    """LoRA on every projection of a pruned variant, merged (the prune -> recover recipe)."""
    from transformers import AutoModelForCausalLM

    from lockgate.flows.spec import RecoverStep

    folder = work / f"pruned-{id(pruned)}"
    pruned.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    step = RecoverStep(r=8, alpha=16, steps=steps, lr=3e-3, batch_size=16, target_modules=targets)
    outcome = recover.apply(folder, work / f"recovered-{id(pruned)}", step, context)
    return AutoModelForCausalLM.from_pretrained(outcome.folder).eval()


# ------------------------------------------------------------------------------------------ main
def machine_description() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {name: metadata.version(name) for name in ("torch", "transformers")}
    return [
        f"nproc: {len(os.sched_getaffinity(0))}; torch threads: {torch.get_num_threads()}",
        f"CPU: {cpu}",
        f"Python: {platform.python_version()}, {platform.platform()}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def verdict(timings: list[Timing]) -> str:
    """Judged on the median paired ratio (robust to a disturbed repeat); best-of in brackets."""
    parent = timings[0]
    student = next(t for t in timings if t.variant == "student-half-depth")
    decode = student.decode_speedup(parent)
    prefill = student.prefill_speedup(parent)
    decode_best = student.decode_best / parent.decode_best
    prefill_best = parent.prefill_best / student.prefill_best
    ok = decode >= SPEEDUP_GOAL and prefill >= SPEEDUP_GOAL
    return (
        f"half-depth student: decode {decode:.2f}x ({decode_best:.2f}x), prefill {prefill:.2f}x "
        f"({prefill_best:.2f}x) the parent (goal >= {SPEEDUP_GOAL}x): {'met' if ok else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, demo model only, print only")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats, Qwen2-shaped models")
    parser.add_argument(
        "--demo-repeats", type=int, default=25, help="interleaved repeats, demo model (milliseconds each)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--qwen-decode-tokens", type=int, default=16)
    parser.add_argument("--qwen-vocabs", default="151936,32000", help="comma-separated; empty to skip")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--recover-steps", type=int, default=150)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on a shared 2-core machine two threads spin in OpenMP "
        "barriers whenever another process holds a core, which made timings swing by 10x",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.demo_repeats, args.decode_tokens = 1, 3, 8
        args.qwen_vocabs, args.distill_steps, args.recover_steps = "", 20, 10

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lockgate.tasks.demo.corpus import demo_dataset
    from lockgate.tasks.demo.model import ensure_demo_model

    started = time.perf_counter()
    report = ["# Distilled and pruned models vs their parent — CPU benchmark", "", "## Machine", ""]
    report += [f"- {line}" for line in machine_description()]
    report += [
        f"- `uptime` at start: {uptime()}",
        "",
        "Command: `.venv/bin/python bench/bench_distill.py`",
        "",
    ]

    demo_dir = ensure_demo_model(DEMO_CACHE)
    demo = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    shapes: list[tuple[str, torch.nn.Module | int, int, int]] = [
        ("demo model", demo, args.decode_tokens, args.demo_repeats)
    ]
    for vocab in [int(v) for v in args.qwen_vocabs.split(",") if v.strip()]:
        # Built lazily, one shape at a time: four ~2 GB variants of one shape are in memory at once.
        shapes.append((f"Qwen2-0.5B shape, vocab {vocab}", vocab, args.qwen_decode_tokens, args.repeats))

    verdicts = []
    demo_models: dict[str, torch.nn.Module] = {}
    for title, source, decode_tokens, repeats in shapes:
        model = source if isinstance(source, torch.nn.Module) else qwen2_shaped(source)
        models = variants(model)
        print(f"== {title}: {describe(model)}", flush=True)
        timings = time_variants(models, model.config.vocab_size, args.prompt_tokens, decode_tokens, repeats)
        table = timing_table(timings)
        print("\n".join(table), flush=True)
        verdicts.append(f"{title}: {verdict(timings)}")
        report += [f"## Speed: {title}", "", f"Parent: {describe(model)}.", ""]
        for name, m in models.items():
            if name != "parent":
                report.append(f"- {name}: {describe(m)}")
        report += [
            "",
            f"Batch 1, fp32, prompt {args.prompt_tokens} tokens, {decode_tokens} decoded tokens, "
            f"{repeats} interleaved repeats (order reversed every other repeat), "
            f"{torch.get_num_threads()} torch thread(s). Speed-up: the median over repeats of the "
            "ratio to the parent measured in the same repeat; in brackets the ratio of the bests. "
            "MAC bound: the parent's Linear multiply-adds per decoded token (output head included) "
            "over the variant's — what decode could gain if time followed compute.",
            "",
            *table,
            "",
        ]
        if title == "demo model":
            demo_models = models
        else:
            del models, model
            gc.collect()

    # Quality on the demo model: every timed variant as derived (no training), then the distilled student.
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    eval_frame = demo_dataset("eval")
    pairs = list(zip(eval_frame["prompt"], eval_frame["answer"], strict=True))
    context = demo_context(demo_dir)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        student, distil_report = distil_demo(context, args.distill_steps, Path(work))
        distil_seconds = time.perf_counter() - t0
        demo_models[f"student-half-depth, distilled {args.distill_steps} steps"] = student
        for name in ("heads-50%", "neurons-50%"):
            recovered = recover_demo(demo_models[name], tokenizer, context, args.recover_steps, Path(work))
            demo_models[f"{name} + recover {args.recover_steps} steps"] = recovered
        table = quality(demo_models, tokenizer, pairs)
    print("\n".join(table), flush=True)
    before, after = distil_report["before"], distil_report["after"]
    report += [
        f"## Quality on the demo model ({len(pairs)} held-out questions)",
        "",
        "Variants as derived from the parent, without any training; the half-depth student after "
        f"`distill` (layers_ratio 0.5, T 4, alpha 0.5, beta 0.5, batch 16, lr 1e-3, {args.distill_steps} "
        f"steps on the 2,000 train rows + 128 calibration prompts, {distil_seconds:.0f} s); the "
        f"pruned variants after `recover` (LoRA r 8 on all seven projections, {args.recover_steps} "
        "steps, batch 16, lr 3e-3, answer-only loss, merged).",
        "",
        *table,
        "",
        f"Distillation loss on the first 32 train rows: {before['loss']:.3f} -> {after['loss']:.3f} "
        f"(CE {before['ce']:.3f} -> {after['ce']:.3f}, T²·KL {before['kl']:.3f} -> {after['kl']:.3f}; "
        f"teacher CE {distil_report['teacher_ce']:.3f}).",
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        f"`uptime` at the end: {uptime()}; total run {time.perf_counter() - started:.0f} s.",
        "",
        READING,
    ]
    print("\n".join(verdicts))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
