"""The built-in demo model: a small Llama lockgate trains itself, so compression deltas are real.

``ensure_demo_model`` trains (once, then reuses from a content-addressed cache):

1. a byte-level BPE tokenizer on the demo corpus (digits split one per token, so addition is
   learnable digit by digit);
2. a 1.03 M-parameter ``LlamaForCausalLM`` pre-trained on ``tasks.demo_corpus``: it learns two-digit
   addition, but answers addition questions chattily (``" 19, because 12 plus 7 equals 19."``);
3. a peft LoRA adapter post-trained on the addition questions (loss on the answer only) to answer
   with just the number, then merged with ``merge_and_unload()``.

The returned folder holds the merged model and tokenizer (``from_pretrained`` loads it), plus
``base/`` (the pre-LoRA model), ``adapter/`` (the unmerged LoRA adapter) and ``lockgate_demo.json``
(hyperparameters, losses, timings, and exact-match accuracy before and after post-training).

Measured with the defaults on 2 CPU cores (AMD EPYC, torch 2.13), three runs: 101-120 s in all,
91-108 s of it pre-training (the spread is other load on the machine), 0.9 GB peak memory. Exact
match on 300 held-out questions: 0.000 for the base model, 0.927 post-trained (0.813 with
``seed=1``). Training is deterministic: every rerun wrote byte-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgate.tasks.demo.corpus import instruction_examples, pretrain_lines
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = get_logger(__name__)

#: Bump whenever the corpus generator or the training code changes what gets trained: the cache
#: key includes it, so a stale cached model is never reused.
CODE_VERSION = "1"
METADATA_FILE = "lockgate_demo.json"
ADAPTER_DIR = "adapter"
BASE_DIR = "base"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class DemoHyperparams:
    """Everything that decides the trained weights; hashed into the cache key."""

    seed: int = 0
    # Tokenizer: 256 byte symbols + 4 specials + 252 merges (" what", " plus", " because", ...).
    vocab_size: int = 512
    # Model: 4 layers x 128 with a 3.25x MLP, 1.03 M parameters. Measured training throughput on 2
    # CPU cores: ~17k tokens/s at width 128, 10k at 192, 6k at 256; the skill needs ~1.5 M tokens,
    # so only width 128 fits the ~2-minute budget.
    hidden_size: int = 128
    intermediate_size: int = 416
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 256
    # Pre-training: 1,000 steps x 24 x 64 = 1.5 M tokens, 1.3 passes over the 60k documents (1.2 M
    # tokens). Addition emerges after ~400-700 steps; at 1,200 steps accuracy was 0.953 (vs 0.927)
    # but the run took 135 s.
    pretrain_docs: int = 60_000
    pretrain_steps: int = 1_000
    pretrain_batch: int = 24
    pretrain_seq_len: int = 64
    pretrain_lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    # Post-training: LoRA on the attention projections. Its loss is flat after ~60 steps (~3 s).
    lora_examples: int = 6_000
    lora_steps: int = 150
    lora_batch: int = 32
    lora_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    # Held-out questions scored before and after post-training (recorded, not trained on).
    eval_examples: int = 300
    threads: int = 2


DEFAULT_HYPERPARAMS = DemoHyperparams()


def demo_model_key(train_steps: int | None = None, hp: DemoHyperparams = DEFAULT_HYPERPARAMS) -> str:
    """Content hash of what the cached model depends on: code version, hyperparameters, steps and
    the versions of the libraries that compute and write the weights.

    Versions come from package metadata, so a cache hit imports neither torch nor peft (~6 s)."""
    payload = {
        "code_version": CODE_VERSION,
        "hyperparams": dataclasses.asdict(hp),
        "train_steps": train_steps,
        "versions": {name: version(name) for name in ("torch", "transformers", "tokenizers", "peft")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ensure_demo_model(cache_dir: Path, train_steps: int | None = None) -> Path:
    """Return the folder of the merged, post-trained demo model, training it if it is not cached.

    ``train_steps`` overrides the pre-training step count (LoRA steps scale with it); tests pass a
    small number. The folder is ``cache_dir / "demo-model-<hash[:12]>"`` and appears atomically:
    training writes into a temporary sibling that is renamed into place only when complete.
    """
    if train_steps is not None and train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    hp = DEFAULT_HYPERPARAMS
    key = demo_model_key(train_steps, hp)
    final = Path(cache_dir) / f"demo-model-{key[:12]}"
    if (final / METADATA_FILE).is_file():
        log.info("demo model cached at %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One trainer per model: parallel pipeline runs (or Prefect threads) wait ~2 min for the first
    # one instead of each training its own copy. flock locks are per open file, so threads of one
    # process exclude each other too.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / METADATA_FILE).is_file():
            log.info("demo model trained by another caller; cached at %s", final)
            return final
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _train_demo(tmp, final, hp, train_steps)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------- training
def _train_demo(out: Path, final: Path, hp: DemoHyperparams, train_steps: int | None) -> None:
    """Train everything into ``out``; ``final`` is where it will live (for the adapter's base path)."""
    pre_steps = hp.pretrain_steps if train_steps is None else train_steps
    # Keep post-training proportional (150 LoRA steps per 1,000 pre-training steps) so a quick
    # test run stays quick, but at least 5 steps so the adapter is not the identity.
    lora_steps = max(5, round(hp.lora_steps * pre_steps / hp.pretrain_steps))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _torch_context(hp), _quiet_transformers():
        t0 = time.perf_counter()
        docs = pretrain_lines(hp.pretrain_docs, hp.seed)
        lora_data = instruction_examples(hp.lora_examples, hp.seed, "train")
        eval_data = instruction_examples(hp.eval_examples, hp.seed + 1, "eval")
        tokenizer = _train_tokenizer(docs + [p + " " + a for p, a in lora_data], hp.vocab_size)
        timings["tokenizer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model = _build_model(tokenizer, hp)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("demo model: %d parameters; pre-training %d steps", n_params, pre_steps)
        pre_losses = _fit(
            model,
            _packed_batches(
                _encode_documents(tokenizer, docs), hp.pretrain_batch, hp.pretrain_seq_len, hp.seed
            ),
            [p for p in model.parameters() if p.requires_grad],
            steps=pre_steps,
            lr=hp.pretrain_lr,
            warmup=min(hp.warmup_steps, pre_steps // 10),
            weight_decay=hp.weight_decay,
            phase="pre-train",
        )
        timings["pretrain"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        base_accuracy = exact_match(model, tokenizer, eval_data)
        log.info("base model exact match on %d held-out questions: %.3f", len(eval_data), base_accuracy)
        (out / BASE_DIR).mkdir(parents=True)
        model.save_pretrained(out / BASE_DIR)
        tokenizer.save_pretrained(out / BASE_DIR)
        timings["base_eval_save"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        peft_model = _add_lora(model, hp)
        ids, prompt_lens = _encode_questions(tokenizer, lora_data)
        lora_losses = _fit(
            peft_model,
            _batches(ids, prompt_lens, hp.lora_batch, tokenizer.pad_token_id, hp.seed + 1),
            [p for p in peft_model.parameters() if p.requires_grad],
            steps=lora_steps,
            lr=hp.lora_lr,
            warmup=min(20, lora_steps // 10),
            weight_decay=0.0,
            phase="lora",
        )
        timings["lora"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # The adapter's base is the pre-LoRA model saved next to it, at its final (post-rename) path.
        peft_model.peft_config["default"].base_model_name_or_path = str((final / BASE_DIR).resolve())
        # Embeddings are not adapted; saying so also skips peft's Hub look-up of the base config.
        peft_model.save_pretrained(out / ADAPTER_DIR, save_embedding_layers=False)
        merged = peft_model.merge_and_unload()
        merged.eval()
        post_accuracy = exact_match(merged, tokenizer, eval_data)
        log.info("post-trained exact match: %.3f (base %.3f)", post_accuracy, base_accuracy)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        timings["merge_eval_save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    metadata: dict[str, Any] = {
        "code_version": CODE_VERSION,
        "hyperparams": dataclasses.asdict(hp),
        "train_steps": pre_steps,
        "lora_steps": lora_steps,
        "parameters": n_params,
        "lora_trainable_parameters": sum(
            v.numel() for k, v in peft_model.state_dict().items() if "lora_" in k
        ),
        "pretrain_loss_first": pre_losses[0],
        "pretrain_loss_final": _tail_mean(pre_losses),
        "lora_loss_first": lora_losses[0],
        "lora_loss_final": _tail_mean(lora_losses),
        "eval_split": "eval",
        "eval_seed": hp.seed + 1,
        "eval_examples": len(eval_data),
        "exact_match_base": base_accuracy,
        "exact_match_post_trained": post_accuracy,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    # Written last: its presence marks a complete folder.
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("demo model trained in %.1f s", timings["total"])


@contextlib.contextmanager
def _torch_context(hp: DemoHyperparams) -> Iterator[None]:
    """Seeded torch with a fixed thread count, restored afterwards.

    2 threads train 1.9x faster than 1 on 2 idle cores (79 vs 152 ms a step, measured); more
    threads than free cores make OpenMP threads wait on each other and can be 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(hp.threads)
    torch.manual_seed(hp.seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" bars on stdout while saving (transformers' global switch)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with one token per digit and ``<s>`` prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad = SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(unk_token=unk))
    # Digits one per token: "19" is "1","9", so the model adds digit by digit instead of having to
    # memorise 199 merged number tokens; also makes prompt tokens a prefix of prompt+answer tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(bos)
    # BOS through the post-processor, so whoever calls tokenizer(prompt) feeds what training saw.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, hp: DemoHyperparams) -> LlamaForCausalLM:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp.hidden_size,
        intermediate_size=hp.intermediate_size,
        num_hidden_layers=hp.num_layers,
        num_attention_heads=hp.num_heads,
        num_key_value_heads=hp.num_heads,
        max_position_embeddings=hp.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def _add_lora(model: LlamaForCausalLM, hp: DemoHyperparams) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    with warnings.catch_warnings():
        # transformers 5.24 deprecates the attribute peft 0.21.2 reads; harmless, and not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def _encode_documents(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> list[list[int]]:
    """``<s> doc \\n </s>`` per document: the same ending the questions are trained with."""
    eos = tokenizer.eos_token_id
    return [[*ids, eos] for ids in tokenizer([d + "\n" for d in docs])["input_ids"]]


def _encode_questions(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[int]]:
    """``<s> prompt`` + `` answer\\n </s>``, tokenized apart exactly as generation sees the prompt.

    Returns the sequences and each prompt's length (its tokens get no loss)."""
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    answers = tokenizer([f" {a}\n" for _, a in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [p + a + [eos] for p, a in zip(prompts, answers, strict=True)], [len(p) for p in prompts]


def _packed_batches(
    docs: list[list[int]], batch: int, seq_len: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of documents packed back to back into ``batch x seq_len`` rows.

    Documents average 20 tokens and range 9-40, so padding each batch to its longest wastes about
    a third of the compute; packed rows waste none. Each document starts with ``<s>``, which the
    model learns to treat as a reset (prompts at inference start with it too). Packing also
    learned better here: unpadded batches of the same documents reached 0.11 exact match where
    packed ones reached 0.78 (same steps, an earlier corpus)."""
    import torch

    rng = random.Random(seed)
    stream: list[int] = []
    need = batch * seq_len
    while True:
        while len(stream) < need:
            for i in rng.sample(range(len(docs)), len(docs)):
                stream.extend(docs[i])
        ids = torch.tensor(stream[:need], dtype=torch.long).view(batch, seq_len)
        del stream[:need]
        yield {"input_ids": ids, "labels": ids}


def _batches(
    seqs: list[list[int]], prompt_lens: list[int] | None, batch: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of right-padded batches; padding (and prompts) labelled -100."""
    import torch

    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch:
            order += rng.sample(range(len(seqs)), len(seqs))
        chosen, order = order[:batch], order[batch:]
        width = max(len(seqs[i]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        for row, i in enumerate(chosen):
            seq = torch.tensor(seqs[i], dtype=torch.long)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            start = prompt_lens[i] if prompt_lens is not None else 0
            labels[row, start : len(seq)] = seq[start:]
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _fit(
    model: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    params: list[torch.nn.Parameter],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    phase: str,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10% of ``lr``; returns the loss per step."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    every = max(1, steps // 10)
    for step in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        # Clip at 1.0, the usual transformer guard, so one early loss spike cannot derail a short run.
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            log.info("%s step %d/%d loss %.4f", phase, step + 1, steps, _tail_mean(losses[-every:]))
    model.eval()
    return losses


def _tail_mean(values: Sequence[float], n: int = 20) -> float:
    tail = values[-n:]
    return float(sum(tail) / len(tail))


def generate_answers(
    model: Any, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_new_tokens: int = 6
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens dropped).

    Prompts are batched by token length, so no padding is needed and each row is computed exactly
    as it would be alone."""
    import torch

    encoded = tokenizer(list(prompts))["input_ids"]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    with torch.no_grad():
        for length, rows in by_length.items():
            ids = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, i in enumerate(rows):
                out[i] = tokenizer.decode(generated[row, length:], skip_special_tokens=True)
    return out


def exact_match(model: Any, tokenizer: PreTrainedTokenizerFast, examples: Sequence[tuple[str, str]]) -> float:
    """Share of ``(prompt, answer)`` whose greedy continuation, cut at the first newline and
    stripped, equals ``answer.strip()`` (the rule lockgate's evaluation applies)."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    outputs = generate_answers(model, tokenizer, [p for p, _ in examples])
    hits = sum(o.split("\n", 1)[0].strip() == a.strip() for o, (_, a) in zip(outputs, examples, strict=True))
    return hits / len(examples)
