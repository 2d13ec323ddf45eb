"""The one schema of ``pipelines.yaml``.

Every stage receives the typed, frozen objects defined here — never raw dicts. Models forbid
unknown keys (the loader turns that into a did-you-mean), closed sets are ``Literal``s and
numbers are bounded, so a typo under ``canary:`` can never ship a model with default analysis.

This module is a leaf: it imports nothing from ``flows`` or ``tasks``, so stage code may
reference its types without creating an import cycle.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

SPEC_VERSION = 1
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class StrictModel(BaseModel):
    """Base of every spec model: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- model
class ModelSpec(StrictModel):
    """What to release: the uncompressed, post-trained parent model."""

    source: str = Field(
        "demo",
        min_length=1,
        description="'demo' (the built-in model lockgate trains itself), a local folder, a "
        "Hugging Face id ('org/name'), or an MLflow URI ('models:/name/version', "
        "'models:/name@alias', 'models:/name/Stage').",
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit).")
    adapter: str | None = Field(
        None,
        description="Optional peft LoRA adapter (local folder or HF id) merged into the model "
        "before compression.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the parent is loaded in; float32 is the CPU baseline."
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers' from_pretrained.")


# ---------------------------------------------------------------------------------------- data
class DatasetSpec(StrictModel):
    """One dataset. Files are JSON lines, CSV or Parquet with the columns of its role."""

    source: str = Field(
        "demo",
        min_length=1,
        description="'demo' for the built-in set of this role, or a path to a .jsonl, .csv "
        "or .parquet file (relative paths are relative to the spec file).",
    )
    max_samples: int | None = Field(None, ge=1, le=1_000_000, description="Use at most this many rows.")


class DataSpec(StrictModel):
    """Datasets by role. train and eval: columns prompt, answer. calibration and reference: prompt."""

    train: DatasetSpec = Field(
        default_factory=DatasetSpec,
        description="Training rows for the compression steps that train (qat, distill, recover).",
    )
    eval: DatasetSpec = Field(default_factory=DatasetSpec, description="Quality evaluation set.")
    calibration: DatasetSpec = Field(
        default_factory=DatasetSpec, description="Calibration set for static quantization."
    )
    reference: DatasetSpec = Field(
        default_factory=DatasetSpec,
        description="Reference traffic the monitor compares served traffic with.",
    )
    max_prompt_chars: int = Field(
        2000, ge=1, le=1_000_000, description="Data validation: longest prompt allowed."
    )


# ------------------------------------------------------------------------------------ compress
#: What the chapter's mixed-precision rule keeps in high precision unless a step says otherwise:
#: the output head, the embeddings, and the first and last transformer blocks ("{first}" and
#: "{last}" are resolved against the model's block list when the step runs).
DEFAULT_KEEP_HIGH_PRECISION: tuple[str, ...] = ("lm_head", "*embed*", "{first}", "{last}")


class QuantizeStep(StrictModel):
    """Post-training quantization of Linear layers (section 9.1.1)."""

    bits: Literal[8, 4] = Field(8, description="Weight bit width.")
    scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="symmetric: grid over [-a, a]; asymmetric: [min, max] with a zero point."
    )
    granularity: Literal["per_tensor", "per_channel", "group"] = Field(
        "per_channel", description="One scale per tensor, per output row, or per group of inputs."
    )
    group_size: int = Field(
        32, ge=8, le=4096, description="Inputs sharing one scale when granularity is group."
    )
    mode: Literal["weight_only", "dynamic", "static"] = Field(
        "weight_only",
        description="weight_only: int weights, float activations; dynamic: activations quantized "
        "per batch at run time (int8 matmul); static: activation ranges fixed from the "
        "calibration set.",
    )
    calibration_samples: int = Field(
        64, ge=1, le=100_000, description="Calibration prompts used when mode is static."
    )
    backend: Literal["auto", "torch", "torchao", "quanto", "bitsandbytes"] = Field(
        "auto",
        description="auto: lockgate's own int kernels (torch) on CPU, torchao on CUDA where it "
        "supports the scheme (else torch). torch: lockgate's format everywhere. torchao: INT8 "
        "weight-only (INT4 is CUDA-only). quanto: its own int8/int4 weight-only schemes. "
        "bitsandbytes: CUDA only.",
    )
    targets: tuple[str, ...] = Field(
        ("*",), min_length=1, description="Module-name patterns (fnmatch) of Linear layers to quantize."
    )
    ignore: tuple[str, ...] | Literal["auto"] = Field(
        DEFAULT_KEEP_HIGH_PRECISION,
        description="Patterns kept in high precision, or 'auto': the list an earlier sensitivity "
        "step wrote. Default: lm_head, embeddings, first and last blocks.",
    )

    @model_validator(mode="after")
    def _supported_combination(self) -> QuantizeStep:
        if self.mode in ("dynamic", "static") and self.bits != 8:
            raise ValueError(f"mode: {self.mode} quantizes activations to int8 and needs bits: 8")
        if self.bits == 4 and self.group_size % 2:
            raise ValueError(f"group_size: 4-bit codes are packed two per byte, {self.group_size} is odd")
        if self.backend == "torchao" and (self.scheme, self.mode) != ("symmetric", "weight_only"):
            raise ValueError("backend: torchao supports symmetric weight_only here; use backend torch")
        if self.backend == "torchao" and self.bits == 4 and self.granularity != "group":
            raise ValueError("backend: torchao int4 (CUDA) is group-wise; set granularity: group")
        if self.backend in ("quanto", "bitsandbytes") and self.mode != "weight_only":
            raise ValueError(f"backend: {self.backend} supports mode weight_only here; use backend torch")
        if self.backend == "quanto" and self.bits == 4:
            # Measured: optimum-quanto 0.2.7 qint4 models raise "Cannot set version_counter for
            # inference tensor" under torch.inference_mode, which the runtime serves with.
            raise ValueError("backend: quanto int4 cannot be served by the runtime; use backend torch")
        return self


class SensitivityStep(StrictModel):
    """Per-layer sensitivity: quantize one block at a time, measure the perplexity change."""

    bits: Literal[8, 4] = Field(4, description="Bit width probed (symmetric, weight-only).")
    granularity: Literal["per_tensor", "per_channel", "group"] = Field(
        "per_channel", description="Granularity probed: per tensor, per output row, or per group."
    )
    group_size: int = Field(
        32, ge=8, le=4096, description="Inputs sharing one scale when granularity is group."
    )
    samples: int = Field(32, ge=1, le=10_000, description="Calibration prompts scored per probe.")
    max_increase_pct: float = Field(
        1.0, ge=0, le=1000, description="A unit whose perplexity rises more than this is kept."
    )
    unit: Literal["block", "layer"] = Field("block", description="Probe whole blocks or single Linears.")


class QatStep(StrictModel):
    """Quantization-aware training: fake-quant forward, straight-through gradients."""

    bits: Literal[8, 4] = Field(4, description="Weight bit width, in training and in the result.")
    scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="symmetric: grid over [-a, a]; asymmetric: [min, max] with a zero point."
    )
    granularity: Literal["per_tensor", "per_channel", "group"] = Field(
        "per_channel", description="One scale per tensor, per output row, or per group of inputs."
    )
    group_size: int = Field(
        32, ge=8, le=4096, description="Inputs sharing one scale when granularity is group."
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Training steps.")
    lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate.")
    batch_size: int = Field(8, ge=1, le=4096, description="(prompt, answer) rows per step.")
    targets: tuple[str, ...] = Field(
        ("*",),
        min_length=1,
        description="Module-name patterns (fnmatch) of Linear layers to train quantized.",
    )
    ignore: tuple[str, ...] = Field(
        DEFAULT_KEEP_HIGH_PRECISION,
        description="Patterns kept in high precision (and trained in float). Default: lm_head, "
        "embeddings, first and last blocks.",
    )

    @model_validator(mode="after")
    def _packable(self) -> QatStep:
        if self.bits == 4 and self.group_size % 2:
            raise ValueError(f"group_size: 4-bit codes are packed two per byte, {self.group_size} is odd")
        return self


class DistillStep(StrictModel):
    """Knowledge distillation (section 9.1.2): ``α·CE + β·T²·KL(p_teacher ‖ p_student)``.

    The chapter's ``L_KL(σ(z_s/T), σ(z_t/T))`` follows PyTorch's ``kl_div(input, target)`` order:
    the teacher's tempered distribution is the target. ``T²`` keeps the soft-label gradients on the
    scale of the hard-label ones.
    """

    student: str | None = Field(
        None,
        description="A local model folder (same vocabulary as the parent) as the student; default: "
        "derived from the parent by layers_ratio / hidden_ratio. Nothing is downloaded.",
    )
    layers_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Derived student keeps round(ratio x blocks) blocks, initialised from evenly "
        "spaced parent blocks (first and last included).",
    )
    hidden_ratio: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Derived student's hidden and MLP width share; below 1 the student starts from "
        "random weights (head count kept, head_dim shrinks).",
    )
    temperature: float = Field(
        4.0, gt=0, le=100, description="T of the soft labels; the chapter advises 3-10 (T=1 is a trap)."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the hard-label cross-entropy (answer tokens)."
    )
    beta: float = Field(0.5, ge=0, le=1, description="Weight of the soft-label T²·KL term (every token).")
    hidden_alignment: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Weight of the relative hidden-state MSE on mapped blocks (learned projection "
        "when widths differ).",
    )
    attention_alignment: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Weight of the attention-map alignment, KL(A_t || A_s) per query row on mapped "
        "blocks (trains with eager attention).",
    )
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak AdamW learning rate (warm-up, cosine decay).")
    batch_size: int = Field(16, ge=1, le=4096, description="Rows per step.")

    @model_validator(mode="after")
    def _some_loss(self) -> DistillStep:
        if self.alpha + self.beta + self.hidden_alignment + self.attention_alignment == 0:
            raise ValueError("alpha, beta and both alignments are 0: nothing to learn from")
        if self.student is not None and (self.layers_ratio != 0.5 or self.hidden_ratio != 1.0):
            raise ValueError("give either student or layers_ratio/hidden_ratio, not both")
        if self.student is None and self.layers_ratio == 1 and self.hidden_ratio == 1:
            raise ValueError(
                "layers_ratio and hidden_ratio are both 1: the student would be the parent - "
                "lower one of them or give a student folder"
            )
        return self


class PruneStep(StrictModel):
    """Pruning by importance (section 9.1.3).

    Structured kinds remove the same number of units from every block (HF configs hold one head
    count and one MLP width for all blocks); under grouped-query attention whole KV groups go,
    together with their query heads.
    """

    importance: Literal["magnitude", "gradient", "taylor"] = Field(
        "magnitude",
        description="|W|, |dL/dW| or Taylor |W·dL/dW| (gradient kinds use the calibration prompts); "
        "a unit scores the sum over its weights.",
    )
    structure: Literal["unstructured", "heads", "mlp_neurons", "layers"] = Field(
        "unstructured",
        description="unstructured zeroes weights (no speed-up on dense hardware); heads, mlp_neurons "
        "and layers really shrink the tensors.",
    )
    sparsity: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of weights / heads / neurons / blocks removed (structured: rounded to whole "
        "units, at least one removed and one kept).",
    )
    samples: int = Field(
        32, ge=1, le=10_000, description="Calibration prompts for gradient and taylor importance."
    )


class RecoverStep(StrictModel):
    """Recovery fine-tuning with a peft LoRA adapter (answer-only loss), merged back before evaluation.

    A zero pattern left by unstructured pruning is re-applied after merging (the LoRA delta is dense).
    """

    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (delta = B·A·alpha/r).")
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of the adapter.")
    batch_size: int = Field(8, ge=1, le=4096, description="Rows per step.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        min_length=1,
        description="Names (last component) of the Linear layers that get an adapter.",
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"target_modules {bad} are not module names like q_proj (no dots or patterns)")
        if len(set(value)) != len(value):
            raise ValueError(f"target_modules {list(value)} repeat a name")
        return value


class CompressStep(StrictModel):
    """One recipe step: exactly one key, the step kind."""

    quantize: QuantizeStep | None = Field(None, description="Post-training quantization.")
    sensitivity: SensitivityStep | None = Field(None, description="Writes the ignore list for quantize.")
    qat: QatStep | None = Field(None, description="Quantization-aware training, then real quantization.")
    distill: DistillStep | None = Field(None, description="Train a smaller student from the parent.")
    prune: PruneStep | None = Field(None, description="Remove weights, heads, neurons or blocks.")
    recover: RecoverStep | None = Field(None, description="LoRA recovery fine-tuning, merged.")

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> CompressStep:
        kinds = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(kinds) != 1:
            allowed = ", ".join(type(self).model_fields)
            raise ValueError(f"a step has exactly one kind ({allowed}); got {len(kinds)}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def params(self) -> StrictModel:
        return getattr(self, self.kind)


#: Steps after which the weights are integers: nothing may train or restructure them any more.
_FINAL_KINDS = ("quantize", "qat")


def check_step_order(steps: tuple[CompressStep, ...]) -> list[str]:
    """Named cross-step checks; each message says how to fix the recipe."""
    problems = []
    kinds = [s.kind for s in steps]
    for i, kind in enumerate(kinds):
        before = kinds[:i]
        if any(k in _FINAL_KINDS for k in before):
            final = next(k for k in before if k in _FINAL_KINDS)
            problems.append(
                f"quantized-is-final: step {i + 1} ({kind}) comes after {final}; quantized weights "
                f"cannot be trained, pruned or quantized again - move {final} to the end"
            )
        if kind == "recover" and not any(k in ("prune", "distill") for k in before):
            problems.append(
                f"recover-needs-damage: step {i + 1} (recover) has no prune or distill before it "
                "to recover from - put it right after the prune/distill step"
            )
        if kind == "sensitivity" and (i + 1 >= len(kinds) or kinds[i + 1] != "quantize"):
            problems.append(
                f"sensitivity-feeds-quantize: step {i + 1} (sensitivity) must be directly followed by "
                "a quantize step with ignore: auto"
            )
        if kind == "distill" and before:
            problems.append(
                f"distill-first: step {i + 1} (distill) trains a new student from the parent, which "
                "discards the earlier steps - make distill the first step"
            )
        step = steps[i]
        if (
            kind == "quantize"
            and step.quantize.ignore == "auto"
            and (not before or before[-1] != "sensitivity")
        ):
            problems.append(
                f"auto-needs-sensitivity: step {i + 1} (quantize) has ignore: auto but no sensitivity "
                "step right before it - add one or list the ignore patterns"
            )
    return problems


class CandidateSpec(StrictModel):
    name: str = Field(..., pattern=_NAME, description="Candidate name (used in MLflow and tags).")
    steps: tuple[CompressStep, ...] = Field(..., min_length=1, description="Steps applied in order.")

    @model_validator(mode="after")
    def _valid_order(self) -> CandidateSpec:
        problems = check_step_order(self.steps)
        if problems:
            raise ValueError("; ".join(problems))
        return self


ObjectiveMetric = Literal[
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "tokens_per_s",
    "size_bytes",
    "perplexity",
    "accuracy",
    "ece",
]


class ObjectiveSpec(StrictModel):
    """How the winner is picked among candidates that pass every gate."""

    metric: ObjectiveMetric = Field("latency_p95_ms", description="The metric compared.")
    goal: Literal["minimize", "maximize"] = Field("minimize")


class CompressSpec(StrictModel):
    candidates: tuple[CandidateSpec, ...] = Field(..., min_length=1, description="Named recipes.")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="Picks the winner among gate-passing candidates."
    )
    allow_slower_quantized: bool = Field(
        False,
        description="By default a quantized candidate slower (p95) than its parent on the serving "
        "device never ships; true lifts that rule (e.g. a release for size).",
    )

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, value: tuple[CandidateSpec, ...]) -> tuple[CandidateSpec, ...]:
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
        return value


# ------------------------------------------------------------------------------------ evaluate
class RelativeGate(StrictModel):
    """A bound on the candidate relative to the uncompressed baseline."""

    max_increase_pct: float | None = Field(None, ge=0, le=10_000, description="Allowed rise, percent.")
    max_drop_pct: float | None = Field(None, ge=0, le=100, description="Allowed fall, percent.")
    max_ratio: float | None = Field(None, gt=0, le=100, description="candidate / baseline at most.")
    min_ratio: float | None = Field(None, gt=0, le=100, description="candidate / baseline at least.")
    min_speedup: float | None = Field(
        None, gt=0, le=1000, description="baseline / candidate at least (latency metrics): demand a speed-up."
    )

    @model_validator(mode="after")
    def _at_least_one_bound(self) -> RelativeGate:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("a gate needs one of max_increase_pct, max_drop_pct, max_ratio, min_ratio")
        if self.min_ratio is not None and self.max_ratio is not None and self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio {self.min_ratio} > max_ratio {self.max_ratio}: no value can pass")
        return self


GateMetric = Literal[
    "perplexity",
    "accuracy",
    "ece",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "tokens_per_s",
    "size_bytes",
]


class EvaluateSpec(StrictModel):
    max_samples: int = Field(200, ge=1, le=100_000, description="Eval rows used for quality metrics.")
    max_new_tokens: int = Field(8, ge=1, le=4096, description="Generation budget for accuracy.")
    latency_prompts: int = Field(
        30, ge=5, le=10_000, description="Prompts timed one by one for latency percentiles."
    )
    warmup: int = Field(3, ge=0, le=100, description="Untimed generations before timing.")
    gates: dict[GateMetric, RelativeGate] = Field(
        default_factory=dict, description="Gates relative to the baseline; any failure blocks release."
    )


# ------------------------------------------------------------------------------------- package
class ResourcesSpec(StrictModel):
    gpu: int = Field(0, ge=0, le=16, description="GPUs declared; the service falls back to CPU.")
    # coerce: `cpu: 2` in YAML is an int; it means the same as '2'.
    cpu: str = Field(
        "1",
        pattern=r"^\d+(\.\d+)?m?$",
        coerce_numbers_to_str=True,
        description="CPU request, e.g. '2' or '500m'.",
    )
    memory: str = Field(
        "2Gi",
        pattern=r"^\d+(Ki|Mi|Gi|Ti)?$",
        coerce_numbers_to_str=True,
        description="Memory request, e.g. '4Gi'.",
    )


class BatchingSpec(StrictModel):
    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests decoded together.")
    max_latency_ms: int = Field(
        50,
        ge=1,
        le=60_000,
        description="Longest wait to fill a whole-request batch (engine static, and sampling requests); "
        "the continuous engine never waits: a request joins at the next decode step.",
    )
    engine: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: greedy requests join the running batch between decode steps "
        "(iteration-level batching); static: whole requests are batched, like BentoML's adaptive batching.",
    )
    max_step_tokens: int = Field(
        2048,
        ge=16,
        le=65_536,
        description="Continuous engine: most tokens one forward step processes (running requests' next "
        "tokens + chunks of new prompts). Smaller: lower inter-token latency while prompts arrive; larger: "
        "prompts prefilled in fewer steps (lower time to first token).",
    )


class CapacitySpec(StrictModel):
    """KV-cache budget and backpressure of the service (bentos/kv_budget.py)."""

    kv_cache_budget_mb: float | None = Field(
        None,
        gt=0,
        le=10_000_000,
        description="KV-cache memory budget in MB (10^6 bytes). Each request reserves (prompt + "
        "max_new_tokens) x layers x kv_heads x head_dim x 2 x dtype bytes of it before it runs; unset = "
        "90 % of free GPU memory after loading (50 % of available RAM on CPU).",
    )
    max_queue: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Requests that may wait for KV-cache room; more get 503 with Retry-After (backpressure).",
    )


class LimitsSpec(StrictModel):
    max_prompt_chars: int = Field(4000, ge=1, le=1_000_000, description="Longer prompts get 422.")
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="Larger requests get 422.")
    timeout_s: int = Field(60, ge=1, le=3600, description="Request timeout.")
    concurrency: int = Field(16, ge=1, le=10_000, description="Requests in flight per worker.")
    max_batch_items: int = Field(64, ge=1, le=4096, description="Most requests in one POST /generate_batch.")


class PricingSpec(StrictModel):
    """Per-token prices behind ``llm_api_cost_dollars_total{model,customer}``."""

    prompt_per_1k_tokens: float = Field(0.0, ge=0, le=1000, description="USD per 1000 prompt tokens.")
    completion_per_1k_tokens: float = Field(0.0, ge=0, le=1000, description="USD per 1000 generated tokens.")


class ResponseCacheSpec(StrictModel):
    """Cache of greedy answers (bentos/response_cache.py): same prompt, budget, stop strings and model
    version give the same text, so a repeat is served without the model."""

    enabled: bool = Field(False, description="Serve repeated greedy requests from the cache.")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: in-process LRU per replica; redis: shared by every replica."
    )
    max_entries: int = Field(1024, ge=1, le=10_000_000, description="LRU size (memory backend).")
    redis_url: str | None = Field(
        None, pattern=r"^rediss?://", description="redis://host:port/db (redis backend)."
    )
    ttl_s: int = Field(3600, ge=1, le=30 * 24 * 3600, description="Lifetime of a Redis entry.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ResponseCacheSpec:
        if self.enabled and self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url: required when backend is redis")
        return self


class TracingSpec(StrictModel):
    """OpenTelemetry spans per request: root ``llm.request`` + auth/tokenize/queue/prefill/decode/
    postprocess children (bentos/tracing.py). Off by default."""

    exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="none: off; console: JSON on the service's stdout; otlp: OTLP/HTTP protobuf."
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", pattern=r"^https?://", description="OTLP/HTTP traces URL."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers (collector auth).")
    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of requests traced.")
    export_interval_ms: int = Field(1000, ge=10, le=60_000, description="Batch export interval.")


class PackageSpec(StrictModel):
    service_name: str = Field("lockgate-llm", pattern=_NAME, description="Bento name.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Declared resources.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Batching limits.")
    capacity: CapacitySpec = Field(
        default_factory=CapacitySpec, description="KV-cache budget and queue (backpressure)."
    )
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Input limits.")
    warmup_requests: int = Field(2, ge=0, le=100, description="Generations run before /readyz is ready.")
    pricing: PricingSpec = Field(default_factory=PricingSpec, description="Cost accounting per customer.")
    response_cache: ResponseCacheSpec = Field(
        default_factory=ResponseCacheSpec, description="Cache of greedy answers (off by default)."
    )
    tracing: TracingSpec = Field(
        default_factory=TracingSpec, description="OpenTelemetry spans (off by default)."
    )


# -------------------------------------------------------------------------------------- canary
class CanaryThresholds(StrictModel):
    """Effect sizes a canary may show before it is rolled back (each needs statistical support too)."""

    min_success_rate: float = Field(
        0.95, ge=0, le=1, description="Canary success-rate floor (the chapter's 0.95)."
    )
    max_error_rate_increase: float = Field(
        0.02, ge=0, le=1, description="Canary error rate may exceed stable's by at most this."
    )
    max_latency_p95_ratio: float = Field(
        2.0, gt=0, le=100, description="Canary p95 latency / stable p95 latency at most."
    )
    max_latency_ratio: float = Field(
        1.2,
        gt=1,
        le=100,
        description="Typical canary/stable latency ratio at most: the Hodges-Lehmann shift of log "
        "latency (about the ratio of medians). 1.2 flags a canary 20 % slower.",
    )
    max_output_tokens_change: float = Field(
        0.3,
        gt=0,
        le=10,
        description="Relative change of the mean number of generated tokens, either direction "
        "(0.3: 30 % longer or shorter answers).",
    )
    max_empty_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Share of empty answers may exceed stable's by at most this."
    )
    max_ttft_ratio: float = Field(
        1.5,
        gt=1,
        le=100,
        description="Typical canary/stable time-to-first-token ratio at most (where the service reports it).",
    )


class CanaryAnalysisSpec(StrictModel):
    """How evidence is weighed: one false-rollback budget, sequential tests, bounded extensions."""

    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="False-rollback budget of the whole canary (family-wise, over all checks and "
        "looks); the chapter's 'p > 0.05 means no significant difference'.",
    )
    max_extensions: int = Field(
        2,
        ge=0,
        le=20,
        description="An inconclusive step is held and its window extended (by its min_requests and "
        "duration_s again) at most this many times, then it fails (as Argo's inconclusive limit).",
    )
    mixture_prior: Literal["geometric", "uniform"] = Field(
        "geometric",
        description="Prior over the effect sizes the sequential checks average (mSPRT mixture): "
        "geometric halves the weight per doubling of the effect (small effects are found sooner, "
        "large ones a request or two later); uniform weighs every grid effect the same. Either keeps "
        "the false-rollback guarantee.",
    )


class CanaryStep(StrictModel):
    """One step: a traffic share held until its window has enough requests and time."""

    share: float = Field(..., gt=0, le=100, description="Canary traffic share, percent.")
    min_requests: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Canary requests the step's window needs before it may pass; default: "
        "canary.min_canary_requests.",
    )
    duration_s: float | None = Field(
        None,
        gt=0,
        le=604_800,
        description="Seconds the step's window lasts at least (with min_requests: both must hold); "
        "default: no time floor.",
    )


def _step_shorthand(value: object) -> object:
    """``25`` means ``{share: 25}``; a mapping is validated as a :class:`CanaryStep`."""
    if isinstance(value, bool):
        raise ValueError("a step is a traffic share (e.g. 25) or a mapping {share, min_requests, duration_s}")
    if isinstance(value, int | float):
        return {"share": value}
    if isinstance(value, dict | CanaryStep):
        return value
    raise ValueError("a step is a traffic share (e.g. 25) or a mapping {share, min_requests, duration_s}")


StepItem = Annotated[
    CanaryStep,
    BeforeValidator(
        _step_shorthand,
        json_schema_input_type=Annotated[float, Field(gt=0, le=100)] | CanaryStep,
    ),
]


class BlueGreenSpec(StrictModel):
    """Atomic switch of Production, a bake period against the switched service, switch back on failure."""

    pre_switch_requests: int = Field(
        10,
        ge=0,
        le=100_000,
        description="Smoke requests to the new version before the switch; any error aborts.",
    )
    baseline_requests: int = Field(
        50, ge=5, le=1_000_000, description="Requests to Production before the switch: the reference window."
    )
    bake_requests: int = Field(
        100, ge=5, le=10_000_000, description="Requests to the switched Production service the bake needs."
    )
    bake_s: float = Field(
        30,
        gt=0,
        le=604_800,
        description="Seconds the bake lasts at least (with bake_requests: both must hold).",
    )
    switch_timeout_s: float = Field(
        60,
        gt=0,
        le=3600,
        description="Longest wait for the service to serve the new version after the switch.",
    )
    registry_poll_s: float = Field(
        0.5, ge=0.1, le=60, description="How often the Production service re-reads the registry."
    )


class ShadowSpec(StrictModel):
    """The candidate gets a copy of traffic; users only get stable's answers; both are compared."""

    requests: int = Field(200, ge=5, le=10_000_000, description="Mirrored requests compared.")
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Exact-match agreement floor of candidate vs stable answers; default: reported "
        "only (a quantized model may word answers differently and still be right).",
    )
    mirror_workers: int = Field(
        2, ge=1, le=64, description="Threads sending mirrored copies (user requests never wait for them)."
    )


class CanarySpec(StrictModel):
    """The release strategy and its analysis: canary (default), blue_green or shadow."""

    strategy: Literal["canary", "blue_green", "shadow"] = Field(
        "canary",
        description="canary: stepwise traffic shift; blue_green: atomic switch + bake + switch back; "
        "shadow: mirrored traffic, users see stable only.",
    )
    steps: tuple[StepItem, ...] = Field(
        (5, 10, 25, 50, 100),
        min_length=1,
        validate_default=True,  # the shorthand default becomes CanaryStep objects too
        description="Canary steps, ascending to 100: a share (percent) or {share, min_requests, "
        "duration_s}; the exponential plan of exercise 9.3 is [2, 4, 8, 16, 32, 64, 100].",
    )
    min_canary_requests: int = Field(
        5, ge=1, le=1_000_000, description="Canary requests a step needs unless it sets min_requests."
    )
    max_requests_per_step: int = Field(
        400,
        ge=1,
        le=10_000_000,
        description="Total requests after which a step window is judged anyway (fewer canary requests "
        "than needed: inconclusive).",
    )
    traffic_per_s: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description="Rate replayed traffic is sent at, which `lockgate plan` assumes; default: as fast "
        "as the services answer.",
    )
    max_new_tokens: int = Field(8, ge=1, le=4096, description="Generation budget of replayed requests.")
    users: int = Field(50, ge=1, le=10_000_000, description="Distinct replayed user ids (sticky routing).")
    thresholds: CanaryThresholds = Field(default_factory=CanaryThresholds, description="Effect sizes.")
    analysis: CanaryAnalysisSpec = Field(
        default_factory=CanaryAnalysisSpec, description="Error budget and extensions."
    )
    blue_green: BlueGreenSpec = Field(
        default_factory=BlueGreenSpec, description="Parameters of strategy blue_green."
    )
    shadow: ShadowSpec = Field(default_factory=ShadowSpec, description="Parameters of strategy shadow.")
    promote: bool = Field(True, description="Promote automatically when the analysis passes.")
    on_interrupt: Literal["resume", "rollback"] = Field(
        "resume",
        description="A release killed mid-canary, on restart: resume the canary after its last completed "
        "step (when the same candidate is still in Staging, the stable version still in Production and "
        "this canary section unchanged; otherwise it rolls back), or always roll the candidate back. "
        "Blue-green and shadow always roll back.",
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> CanarySpec:
        for step in self.steps:
            needed = step.min_requests or self.min_canary_requests
            if needed > self.max_requests_per_step:
                raise ValueError(
                    f"step {step.share:g}% needs {needed} canary requests > max_requests_per_step "
                    f"({self.max_requests_per_step}): it could never be judged"
                )
        return self

    @model_validator(mode="after")
    def _parameters_match_strategy(self) -> CanarySpec:
        # Compared with the defaults, not model_fields_set: a dumped resolved spec (every default
        # written out) must load again.
        defaults = {"blue_green": BlueGreenSpec(), "shadow": ShadowSpec()}
        for other, default in defaults.items():
            if getattr(self, other) != default and self.strategy != other:
                raise ValueError(
                    f"{other} parameters are set but strategy is {self.strategy!r}: "
                    f"set strategy: {other} or remove them"
                )
        if self.strategy == "blue_green" and not self.promote:
            raise ValueError("blue_green switches Production before its checks: promote: false cannot apply")
        return self

    @field_validator("steps")
    @classmethod
    def _ascending_to_100(cls, value: tuple[CanaryStep, ...]) -> tuple[CanaryStep, ...]:
        shares = [step.share for step in value]
        if shares != sorted(set(shares)):
            raise ValueError("steps must be strictly ascending, e.g. [5, 10, 25, 50, 100]")
        if shares[-1] != 100:
            raise ValueError("the last step must be 100 (full traffic) before promotion")
        return value

    @property
    def shares(self) -> tuple[float, ...]:
        """The steps' traffic shares, in order."""
        return tuple(step.share for step in self.steps)

    def min_requests(self, step: CanaryStep) -> int:
        """Canary requests ``step``'s window needs (its own or the default)."""
        return step.min_requests or self.min_canary_requests


# ------------------------------------------------------------------------------------- monitor
#: Evidently drift methods lockgate lets a spec pick. The first group reports p-values (drift when
#: p < stattest_threshold), the second distances (drift when distance >= distance_threshold).
P_VALUE_METHODS: tuple[str, ...] = ("ks", "mannw", "t_test", "chisquare", "z")
DISTANCE_METHODS: tuple[str, ...] = ("wasserstein", "psi", "jensenshannon", "kl_div", "hellinger", "TVD")
NumericalMethod = Literal[
    "auto", "ks", "mannw", "t_test", "wasserstein", "psi", "jensenshannon", "kl_div", "hellinger"
]
CategoricalMethod = Literal["auto", "chisquare", "z", "jensenshannon", "psi", "kl_div", "hellinger", "TVD"]
_PROM_DURATION = r"^\d+[smhd]$"


class DriftSpec(StrictModel):
    stattest_threshold: float = Field(
        0.05, gt=0, lt=1, description="p-value threshold of p-value tests (ks, chisquare, z, ...)."
    )
    distance_threshold: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Threshold of distance methods (wasserstein, jensenshannon, psi, ...); 0.1 is "
        "Evidently's default for them.",
    )
    numerical_method: NumericalMethod = Field(
        "auto",
        description="Drift test of numeric columns; auto: Evidently's rule (ks up to 1000 reference "
        "rows, wasserstein above).",
    )
    categorical_method: CategoricalMethod = Field(
        "auto",
        description="Drift test of categorical columns (script/language share); auto: chisquare (z for "
        "two values) up to 1000 reference rows, jensenshannon above.",
    )
    max_drift_share: float = Field(
        0.5, gt=0, le=1, description="Dataset drifts when this share of columns drifts."
    )
    baseline_windows: int = Field(
        24,
        ge=0,
        le=10_000,
        description="Output-side features (output length, latency, output descriptors) have no "
        "reference set: they are compared with the requests of this many windows before the current "
        "one (0: not compared).",
    )

    def threshold_for(self, method: str) -> float:
        """The drift threshold that fits ``method``: a p-value bound or a distance bound."""
        return self.stattest_threshold if method in P_VALUE_METHODS else self.distance_threshold


class FeedbackSpec(StrictModel):
    """Labels that arrive after serving: a CSV of ``request_id,label[,confidence]`` (section 9.4.1)."""

    file: str | None = Field(
        None,
        description="CSV with columns request_id, label (the correct answer) and optionally confidence "
        "(the model's probability of its answer, for ECE); default: <lockgate home>/feedback/<pipeline>.csv.",
    )
    window: int = Field(100, ge=1, le=1_000_000, description="Sliding-window size of the accuracy monitor.")
    max_accuracy_drop: float = Field(
        0.1, gt=0, lt=1, description="Window accuracy below baseline by more than this is concept drift."
    )
    baseline_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Baseline accuracy (e.g. the release evaluation's); default: first window.",
    )
    adwin_delta: float = Field(1e-4, gt=0, lt=1, description="ADWIN confidence on the 0/1 error stream.")
    max_ece: float = Field(0.1, gt=0, le=1, description="Expected calibration error above this alarms.")
    min_labels: int = Field(30, ge=1, le=1_000_000, description="Fewer joined labels: no feedback verdict.")


class PrometheusRulesSpec(StrictModel):
    """Thresholds of the generated Prometheus alert rules (service metrics + lockgate's drift gauge)."""

    latency_p99_s: float = Field(
        5.0, gt=0, le=3600, description="HighLatency: p99 request latency above this."
    )
    latency_for: str = Field("5m", pattern=_PROM_DURATION, description="HighLatency must hold this long.")
    error_rate: float = Field(
        0.05, gt=0, le=1, description="HighErrorRate: share of status=error above this."
    )
    error_rate_for: str = Field(
        "5m", pattern=_PROM_DURATION, description="HighErrorRate must hold this long."
    )
    memory_growth_bytes_per_hour: float = Field(
        1e9, gt=0, description="MemoryGrowth: llm_memory_usage_bytes rising faster than this (deriv over 1h)."
    )
    memory_for: str = Field("15m", pattern=_PROM_DURATION, description="MemoryGrowth must hold this long.")
    drift_for: str = Field("0m", pattern=_PROM_DURATION, description="DataDrift must hold this long.")


class WebhookSpec(StrictModel):
    url: str = Field(..., pattern=r"^https?://\S+$", description="Receiver of JSON POSTs (http or https).")
    timeout_s: float = Field(5.0, gt=0, le=300, description="Per-attempt timeout.")
    retries: int = Field(
        3, ge=0, le=20, description="Attempts after the first; then queued to the spool file."
    )
    backoff_s: float = Field(0.5, ge=0, le=60, description="Wait before retry k is backoff_s * 2**(k-1).")


AlertGroupKey = Literal["alertname", "pipeline", "detector", "severity"]


class ThrottleSpec(StrictModel):
    """De-duplication: alerts with the same grouping key are sent at most max_alerts per window."""

    window_s: float = Field(3600, gt=0, le=604_800, description="Throttling window in seconds.")
    max_alerts: int = Field(1, ge=1, le=10_000, description="Alerts per grouping key and window.")
    group_by: tuple[AlertGroupKey, ...] = Field(
        ("alertname", "pipeline"), min_length=1, description="Labels that make two alerts 'the same'."
    )


class AlertingSpec(StrictModel):
    """Prometheus rules, Alertmanager routing and lockgate's own notifier."""

    rules: PrometheusRulesSpec = Field(
        default_factory=PrometheusRulesSpec, description="Alert rule thresholds."
    )
    critical_webhook: str = Field(
        "http://127.0.0.1:9095/critical",
        pattern=r"^https?://\S+$",
        description="Alertmanager receiver 'critical' (e.g. a pager bridge).",
    )
    warning_webhook: str = Field(
        "http://127.0.0.1:9095/warning",
        pattern=r"^https?://\S+$",
        description="Alertmanager receiver 'warning'.",
    )
    group_wait: str = Field("30s", pattern=_PROM_DURATION, description="Alertmanager group_wait.")
    group_interval: str = Field("5m", pattern=_PROM_DURATION, description="Alertmanager group_interval.")
    repeat_interval: str = Field("4h", pattern=_PROM_DURATION, description="Alertmanager repeat_interval.")
    webhook: WebhookSpec | None = Field(
        None, description="Where the monitor flow posts its own alerts; none: alerts are only logged."
    )
    throttle: ThrottleSpec = Field(default_factory=ThrottleSpec, description="De-duplication of alerts.")


Detector = Literal["data_drift", "concept_drift", "calibration", "text_quality"]
ResponseAction = Literal["alert", "rollback", "fallback", "retrain", "recalibrate"]


class ResponseRule(StrictModel):
    """What happens when one detector fires; damped so it cannot flap."""

    action: ResponseAction = Field(
        "alert",
        description="alert: notify only; rollback: Production back to the version it replaced; "
        "fallback: the version under fallback_alias becomes Production; retrain: start a release run; "
        "recalibrate: fit a temperature on feedback and tag the Production version with it. Every "
        "action also alerts.",
    )
    severity: Literal["warning", "critical"] = Field("warning", description="Severity of its alert.")
    min_evidence: int = Field(
        1, ge=1, le=1000, description="Consecutive monitor runs that must detect before the action runs."
    )
    cooldown_minutes: float = Field(
        60, ge=0, le=525_600, description="After an action, the same detector's action waits this long."
    )


class ResponsesSpec(StrictModel):
    data_drift: ResponseRule = Field(default_factory=ResponseRule, description="Evidently dataset drift.")
    concept_drift: ResponseRule = Field(
        default_factory=ResponseRule, description="Feedback accuracy drop (window rule or ADWIN)."
    )
    calibration: ResponseRule = Field(default_factory=ResponseRule, description="ECE above feedback.max_ece.")
    text_quality: ResponseRule = Field(
        default_factory=ResponseRule, description="Output text-quality z-scores vs the baseline window."
    )
    fallback_alias: str = Field(
        "fallback",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="Registry alias naming the fallback version (set it on a known-safe version).",
    )

    @model_validator(mode="after")
    def _recalibrate_needs_feedback(self) -> ResponsesSpec:
        for detector in ("data_drift", "text_quality"):
            if getattr(self, detector).action == "recalibrate":
                raise ValueError(
                    f"{detector}.action: recalibrate fits a temperature on feedback labels; use it on "
                    "calibration or concept_drift"
                )
        return self

    def rule(self, detector: Detector) -> ResponseRule:
        return getattr(self, detector)


class MonitorSpec(StrictModel):
    reference: Literal["reference"] = Field(
        "reference", description="Which data role is the reference traffic."
    )
    drift: DriftSpec = Field(default_factory=DriftSpec, description="Drift test settings.")
    schedule: str = Field(
        "0 * * * *",
        description="Cron schedule of the monitor deployment (5 fields).",
    )
    min_rows: int = Field(20, ge=1, le=10_000_000, description="Fewer logged requests: no verdict.")
    window_minutes: int = Field(
        60, ge=1, le=525_600, description="The scheduled monitor looks at requests of this last window."
    )
    max_latency_ms: float = Field(
        3_600_000, gt=0, description="Request-window validation: a logged latency above this is corrupt."
    )
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec, description="Feedback labels.")
    alerting: AlertingSpec = Field(default_factory=AlertingSpec, description="Alert rules and notifier.")
    responses: ResponsesSpec = Field(
        default_factory=ResponsesSpec, description="Automatic response per detector."
    )

    @field_validator("schedule")
    @classmethod
    def _five_cron_fields(cls, value: str) -> str:
        if len(value.split()) != 5 or not re.fullmatch(r"[\d*/,\- A-Za-z]+", value):
            raise ValueError("schedule must be a 5-field cron expression, e.g. '0 * * * *'")
        return value


# ------------------------------------------------------------------------------------ tracking
class TrackingSpec(StrictModel):
    experiment: str = Field("lockgate", min_length=1, max_length=200, description="MLflow experiment.")
    registered_model: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="MLflow registered model name."
    )


# ------------------------------------------------------------------------------------ pipeline
class PipelineSpec(StrictModel):
    description: str = Field("", max_length=2000, description="Free text shown in `lockgate status`.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The parent model.")
    data: DataSpec = Field(default_factory=DataSpec, description="Datasets.")
    compress: CompressSpec = Field(..., description="Compression candidates.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Metrics and gates.")
    package: PackageSpec = Field(default_factory=PackageSpec, description="BentoML service.")
    canary: CanarySpec = Field(default_factory=CanarySpec, description="Progressive rollout.")
    monitor: MonitorSpec = Field(default_factory=MonitorSpec, description="Drift monitoring.")
    tracking: TrackingSpec = Field(..., description="MLflow experiment and registry names.")


class PipelinesFile(StrictModel):
    """The whole ``pipelines.yaml``."""

    version: Literal[1] = Field(SPEC_VERSION, description="Spec format version.")
    pipelines: dict[Annotated[str, Field(pattern=_NAME)], PipelineSpec] = Field(
        ..., min_length=1, description="Named pipelines."
    )

    def pipeline(self, name: str | None) -> tuple[str, PipelineSpec]:
        """The named pipeline, or the only/first one when ``name`` is None."""
        if name is None:
            name = next(iter(self.pipelines))
        if name not in self.pipelines:
            known = ", ".join(self.pipelines)
            raise KeyError(f"no pipeline named {name!r}; known: {known}")
        return name, self.pipelines[name]
