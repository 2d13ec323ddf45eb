"""The ``distill`` step: train a smaller student on the parent's (the teacher's) soft labels.

Loss per batch (section 9.1.2)::

    α·CE(student, labels) + β·T²·KL(p_teacher^T ‖ p_student^T)
      + w_h·mean_mapped ‖P·h_s − h_t‖² / ‖h_t‖²  + w_a·mean_mapped KL(A_t ‖ A_s)

* KL direction: the teacher's tempered distribution is the target, ``Σ p_t·(log p_t − log p_s)``
  (Hinton et al. 2015). That is what the chapter's ``L_KL(σ(z_s/T), σ(z_t/T))`` computes when read
  as ``F.kl_div(log σ(z_s/T), σ(z_t/T))`` — PyTorch puts the model's log-probabilities first and
  the target second. The reverse direction would let the student ignore teacher modes.
* ``T²`` keeps the soft-label gradient on the scale of the hard-label one: the gradient of the
  tempered KL shrinks as ``1/T²``. The KL is averaged per token (``batchmean`` over positions).
* CE is on answer tokens only (labels -100 on the prompt); the KL and alignment terms use every
  real token, because the teacher's prediction on the prompt is knowledge too. Calibration prompts
  join the data as unlabeled text (KL and alignment only).
* Hidden-state alignment is a relative MSE (divided by the teacher's mean square, so its weight
  means the same for any model) after a learned linear projection ``P`` when the widths differ;
  ``P`` is trained with the student and discarded. Attention alignment is the KL between the
  teacher's and the student's attention rows (eager attention; averaged over heads when the head
  counts differ) on the mapped layers.

The student is ``step.student`` (a local model folder with the teacher's vocabulary) or derived
from the current model: ``round(layers_ratio·L)`` blocks, initialised from evenly spaced teacher
blocks (first and last included) together with the teacher's embeddings, final norm and head.
With ``hidden_ratio < 1`` the width shrinks too (intermediate size by the same ratio, head count
kept, so head_dim shrinks) and the student starts from **random** weights: slicing the teacher's
matrices would break RoPE, which pairs dimension ``i`` with ``i + head_dim/2`` at fixed frequencies.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.tasks.compression.base import StepContext, StepOutcome
from lockgate.tasks.compression.training import (
    EVAL_ROWS,
    collate,
    encode_pairs,
    encode_texts,
    endless_index_batches,
    pad_id_of,
    save_model,
)
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from lockgate.flows.spec import DistillStep

log = get_logger(__name__)


@dataclass
class Student:
    model: PreTrainedModel
    #: Student block j is aligned with teacher block layer_map[j].
    layer_map: tuple[int, ...]
    #: How the weights started: "teacher_blocks", "random" or "given".
    init: str


def evenly_spaced(count: int, keep: int) -> tuple[int, ...]:
    """``keep`` indices spread over ``range(count)``, first and last included (keep=1: the last)."""
    if keep >= count:
        return tuple(range(count))
    if keep == 1:
        return (count - 1,)
    return tuple(round(i * (count - 1) / (keep - 1)) for i in range(keep))


def proportional_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Student block j ↔ the teacher block at the same relative depth (its last one at the end)."""
    return tuple(max(0, round((j + 1) * teacher_layers / student_layers) - 1) for j in range(student_layers))


def _narrow_config(config: PretrainedConfig, hidden_ratio: float) -> PretrainedConfig:
    """A copy of ``config`` with hidden and intermediate sizes scaled; heads kept, head_dim shrinks."""
    config = copy.deepcopy(config)
    heads = config.num_attention_heads
    # hidden must split into `heads` heads of even size (RoPE rotates pairs of dimensions).
    quantum = 2 * heads
    hidden = max(quantum, round(config.hidden_size * hidden_ratio / quantum) * quantum)
    config.hidden_size = hidden
    config.head_dim = hidden // heads
    config.intermediate_size = max(1, round(config.intermediate_size * hidden_ratio))
    return config


def _keep_layers(config: PretrainedConfig, keep: tuple[int, ...]) -> None:
    """Config of the blocks ``keep``: the count, and the per-block types where the config has them."""
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


def derive_student(teacher: PreTrainedModel, layers_ratio: float, hidden_ratio: float) -> Student:
    """Fewer blocks (copied from the teacher) and optionally a narrower, randomly initialised width."""
    import torch
    from transformers import AutoModelForCausalLM

    layers = teacher.config.num_hidden_layers
    keep = evenly_spaced(layers, max(1, round(layers_ratio * layers)))
    if hidden_ratio >= 1:
        student = copy.deepcopy(teacher)
        blocks = [student.model.layers[i] for i in keep]
        for new_index, block in enumerate(blocks):
            block.self_attn.layer_idx = new_index  # the KV cache is indexed by it
        student.model.layers = torch.nn.ModuleList(blocks)
        _keep_layers(student.config, keep)
        return Student(student, keep, "teacher_blocks")
    config = _narrow_config(teacher.config, hidden_ratio)
    _keep_layers(config, keep)
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return Student(student, keep, "random")


def load_student(folder: str, teacher: PreTrainedModel, attn: str | None) -> Student:
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise StageFailed(
            "compress", f"distill.student {folder!r} is not a local model folder (no config.json)"
        )
    kwargs = {"attn_implementation": attn} if attn else {}
    student = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise StageFailed(
            "compress",
            f"distill.student has vocab_size {student.config.vocab_size}, the teacher "
            f"{teacher.config.vocab_size}: soft labels need the same vocabulary",
        )
    mapping = proportional_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return Student(student, mapping, "given")


# ------------------------------------------------------------------------------------------ loss
@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    ce: float
    kl: float
    hidden: float
    attention: float


def soft_label_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T²·KL(p_t ‖ p_s) of tempered softmaxes, averaged over the rows (tokens) given."""
    import torch.nn.functional as F

    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # kl_div(input, target) = Σ target·(log target − input): the teacher is the target distribution.
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def attention_kl(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(A_t ‖ A_s) per query row of the attention maps, averaged over real query positions.

    A KL between the row distributions (as in MiniLM), not an MSE: with T keys every weight is
    about 1/T, so an MSE is ~1/T² and its weight would have to change with the sequence length.
    With different head counts both sides are first averaged over heads (still distributions)."""
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    eps = 1e-8
    rows = (a_t * ((a_t + eps).log() - (a_s + eps).log())).sum(-1)  # [batch, heads, queries]
    query_mask = mask[:, None, :].to(rows.dtype)
    return (rows * query_mask).sum() / (query_mask.sum() * rows.shape[1]).clamp_min(1)


def _hard_label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    if not bool((targets != -100).any()):
        return torch.zeros((), dtype=torch.float32)
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=-100)


def distill_loss(
    student_out: CausalLMOutputWithPast,
    teacher_out: CausalLMOutputWithPast,
    batch: dict[str, torch.Tensor],
    step: DistillStep,
    layer_map: tuple[int, ...],
    projection: torch.nn.Module | None,
) -> LossTerms:
    import torch

    mask = batch["attention_mask"].bool()
    ce = _hard_label_ce(student_out.logits, batch["labels"])
    kl = soft_label_kl(student_out.logits[mask], teacher_out.logits[mask], step.temperature)
    hidden = torch.zeros(())
    if step.hidden_alignment > 0:
        terms = []
        for j, t in enumerate(layer_map):
            h_s = student_out.hidden_states[j + 1][mask]
            h_t = teacher_out.hidden_states[t + 1][mask]
            if projection is not None:
                h_s = projection(h_s)
            terms.append(((h_s - h_t) ** 2).mean() / (h_t**2).mean().clamp_min(1e-8))
        hidden = torch.stack(terms).mean()
    attention = torch.zeros(())
    if step.attention_alignment > 0:
        terms = []
        for j, t in enumerate(layer_map):
            terms.append(attention_kl(student_out.attentions[j], teacher_out.attentions[t], mask))
        attention = torch.stack(terms).mean()
    total = (
        step.alpha * ce
        + step.beta * kl
        + step.hidden_alignment * hidden
        + step.attention_alignment * attention
    )
    return LossTerms(
        total, float(ce.detach()), float(kl.detach()), float(hidden.detach()), float(attention.detach())
    )


def _forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], step: DistillStep
) -> CausalLMOutputWithPast:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=step.hidden_alignment > 0,
        output_attentions=step.attention_alignment > 0,
    )


def _measure(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    step: DistillStep,
    layer_map: tuple[int, ...],
    projection: torch.nn.Module | None,
) -> dict[str, float]:
    """The loss terms on a fixed batch, without gradients (the before/after numbers)."""
    import torch

    student.eval()
    with torch.no_grad():
        terms = distill_loss(
            _forward(student, batch, step), _forward(teacher, batch, step), batch, step, layer_map, projection
        )
    return {
        "loss": float(terms.total),
        "ce": terms.ce,
        "kl": terms.kl,
        "hidden": terms.hidden,
        "attention": terms.attention,
    }


# ----------------------------------------------------------------------------------- teacher cache
#: Teacher logits kept between steps, float16 (SmolLM2: ~10 MB per 100-token row, 49k vocabulary).
TEACHER_CACHE_BYTES = 2 << 30


class TeacherCache:
    """The teacher's logits per training row (its real tokens, float16), computed once and reused when
    the row comes back in a later epoch: the teacher's forward was a third of a SmolLM2 distillation
    step (a 30-block teacher for a 15-block student, whose forward and backward are the rest).

    Right padding makes a row's logits independent of the batch it is in (causal attention never looks
    at the padding after a token), so a cached row is the same soft label up to float16 rounding
    (relative 2⁻¹¹: ~0.01 at a logit of 20, ~0.0025 after the temperature). Only logits are kept:
    with hidden-state or attention alignment the teacher's activations are needed and it runs every
    step (``budget_bytes`` 0). A batch with any row not cached runs the teacher and caches its rows
    while the budget lasts."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.rows: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def outputs(
        self, teacher: torch.nn.Module, batch: dict[str, torch.Tensor], indices: list[int], step: DistillStep
    ) -> CausalLMOutputWithPast:
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if self.budget_bytes and all(i in self.rows for i in indices):
            self.hits += len(indices)
            cached = [self.rows[i] for i in indices]
            logits = torch.zeros((*batch["input_ids"].shape, cached[0].shape[-1]), dtype=torch.float16)
            for row, values in enumerate(cached):
                logits[row, : len(values)] = values
            return CausalLMOutputWithPast(logits=logits)
        with torch.no_grad():
            out = _forward(teacher, batch, step)
        self.misses += len(indices)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, index in enumerate(indices):
            kept = out.logits[row, : lengths[row]]
            size = kept.numel() * 2
            if index not in self.rows and self.used_bytes + size <= self.budget_bytes:
                self.rows[index] = kept.to(torch.float16)
                self.used_bytes += size
        return out

    def report(self) -> dict[str, int]:
        return {
            "budget_bytes": self.budget_bytes,
            "rows_cached": len(self.rows),
            "bytes": self.used_bytes,
            "row_hits": self.hits,
            "row_misses": self.misses,
        }


# ------------------------------------------------------------------------------------------ step
def apply(current: Path, out: Path, step: DistillStep, context: StepContext) -> StepOutcome:
    """Distil ``context.parent`` into a smaller student and save it (with the teacher's tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(context.seed)
    # Attention maps are only returned by the eager implementation (sdpa fuses them away).
    attn = "eager" if step.attention_alignment > 0 else None
    kwargs = {"attn_implementation": attn} if attn else {}
    teacher = AutoModelForCausalLM.from_pretrained(context.parent, **kwargs)
    teacher.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(context.parent)
    if step.student is not None:
        student = load_student(step.student, teacher, attn)
    else:
        # Derived from the current model (the parent, since distill must come first).
        base = (
            teacher
            if Path(current).resolve() == Path(context.parent).resolve()
            else AutoModelForCausalLM.from_pretrained(current, **kwargs)
        )
        student = derive_student(base, step.layers_ratio, step.hidden_ratio)
    model = student.model
    model.requires_grad_(True)

    pad = pad_id_of(tokenizer)
    labelled = encode_pairs(tokenizer, context.train_pairs)
    unlabelled = encode_texts(tokenizer, context.calibration_prompts)
    rows = labelled + unlabelled
    if not rows:
        raise StageFailed("compress", "distill needs train_pairs or calibration prompts; both are empty")
    probe = collate((labelled or unlabelled)[:EVAL_ROWS], pad)

    projection = None
    if step.hidden_alignment > 0 and model.config.hidden_size != teacher.config.hidden_size:
        projection = torch.nn.Linear(model.config.hidden_size, teacher.config.hidden_size, bias=False)
    params = list(model.parameters()) + (list(projection.parameters()) if projection else [])
    before = _measure(model, teacher, probe, step, student.layer_map, projection)
    teacher_ce = _measure(
        teacher, teacher, probe, step, tuple(range(teacher.config.num_hidden_layers)), None
    )["ce"]

    optimizer = torch.optim.AdamW(params, lr=step.lr, weight_decay=0.0)
    warmup = max(1, step.steps // 10)

    def schedule(i: int) -> float:
        # Linear warm-up, then cosine to 10 %: a fresh random student diverges at full lr from step 0.
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warmup) / max(1, step.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    aligned = step.hidden_alignment > 0 or step.attention_alignment > 0
    cache = TeacherCache(0 if aligned else TEACHER_CACHE_BYTES)
    batches = endless_index_batches(rows, step.batch_size, context.seed)
    train_started = time.perf_counter()
    model.train()
    train_losses = []
    real_tokens = padded_tokens = 0
    for _ in range(step.steps):
        indices = next(batches)
        batch = collate([rows[i] for i in indices], pad)
        real_tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["attention_mask"].numel()
        teacher_out = cache.outputs(teacher, batch, indices, step)
        terms = distill_loss(
            _forward(model, batch, step), teacher_out, batch, step, student.layer_map, projection
        )
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(float(terms.total.detach()))
    train_seconds = time.perf_counter() - train_started
    after = _measure(model, teacher, probe, step, student.layer_map, projection)
    if attn:
        model.set_attn_implementation("sdpa")  # serve with the fused kernel; eager was for training
    save_model(model, tokenizer, out)
    seconds = time.perf_counter() - started
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in model.parameters())
    log.info(
        "distill: %d -> %d blocks (%s init), loss %.4f -> %.4f (ce %.4f -> %.4f, teacher ce %.4f) in %.1f s",
        teacher.config.num_hidden_layers,
        model.config.num_hidden_layers,
        student.init,
        before["loss"],
        after["loss"],
        before["ce"],
        after["ce"],
        teacher_ce,
        seconds,
    )
    metrics = {
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "ce_before": before["ce"],
        "ce_after": after["ce"],
        "kl_before": before["kl"],
        "kl_after": after["kl"],
        "teacher_ce": teacher_ce,
        "student_layers": float(model.config.num_hidden_layers),
        "param_ratio": student_params / teacher_params,
        "seconds": seconds,
        "seconds_per_step": train_seconds / step.steps,
    }
    report = {
        "loss": "alpha*CE(answer tokens) + beta*T^2*KL(p_teacher || p_student) + alignments, first rows",
        "temperature": step.temperature,
        "init": student.init,
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": model.config.num_hidden_layers,
        "teacher_hidden": teacher.config.hidden_size,
        "student_hidden": model.config.hidden_size,
        "layer_map": list(student.layer_map),
        "teacher_params": teacher_params,
        "student_params": student_params,
        "before": before,
        "after": after,
        "teacher_ce": teacher_ce,
        "train_loss_first": train_losses[0],
        "train_loss_last": train_losses[-1],
        "rows": {"labelled": len(labelled), "unlabelled": len(unlabelled)},
        "seconds": seconds,
        "seconds_per_step": train_seconds / step.steps,
        # Share of the tokens the training forwards computed that were padding (length-grouped batches).
        "padding_share": 1 - real_tokens / max(1, padded_tokens),
        "teacher_cache": cache.report(),
    }
    return StepOutcome(folder=out, metrics=metrics, report=report)
