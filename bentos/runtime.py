"""Model loading and text generation: the one implementation used by the LLM service and by evaluation.

No BentoML here, so ``tasks/evaluate.py`` can import it to score exactly what the service would serve.
Loads plain Hugging Face folders, lockgate-quantized folders (``lockgate_quant.json`` next to the
weights, see ``bentos.quantized``), torchao-quantized folders (``quantization_config.quant_method ==
"torchao"`` in config.json) and optimum-quanto folders (``quanto_qmap.json`` next to the weights).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# torchao prints "Failed to load ..._C_*.so" (CUDA-only kernels) at import time; it is harmless
# (verified-stack §6) and would drown the service log, so silence it before transformers imports it.
logging.getLogger("torchao").setLevel(logging.ERROR)

import torch  # noqa: E402  (must come after the torchao logger is silenced)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from lockgate.bentos.penalties import penalty_processors  # noqa: E402
from lockgate.bentos.quantized import CONFIG_FILE as LOCKGATE_QUANT_CONFIG  # noqa: E402
from lockgate.bentos.quantized import load_quantized  # noqa: E402

logger = logging.getLogger(__name__)

Quantization = Literal["none", "lockgate", "torchao", "quanto"]
FinishReason = Literal["eos", "stop", "length"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
QUANTO_QMAP = "quanto_qmap.json"


class ModelLoadError(RuntimeError):
    """The folder holds no model this runtime can load."""


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation and its costs.

    ``output_tokens`` counts the tokens the model produced for this prompt, up to and including EOS,
    or up to the token that completed a stop string. ``latency_s`` and ``first_token_s`` are measured
    for the whole ``generate`` call, so every prompt of one batch reports the same values.
    """

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    first_token_s: float | None
    finish_reason: FinishReason
    #: Probability of the first generated token under softmax(logits / calibration temperature):
    #: the confidence that feedback labels turn into ECE, and that recalibration fits.
    confidence: float | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. ``temperature == 0`` means greedy (top_p and seed are ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's penalties over the tokens generated so far (bentos/penalties.py; vLLM's own).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class _FirstTokenTimer(BaseStreamer):
    """Records when the first new token exists; ``generate`` first puts the prompt ids, then each step."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_token_s: float | None = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token_s = time.perf_counter() - self.started

    def end(self) -> None:
        pass


class _PerRowBudget(StoppingCriteria):
    """Stops each row at its own ``max_new_tokens``, so a batch of mixed budgets wastes no steps on
    rows that are done (HF's ``max_new_tokens`` is one number for the whole batch)."""

    def __init__(self, prompt_len: int, budgets: torch.Tensor) -> None:
        self.prompt_len = prompt_len
        self.budgets = budgets

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        return (generated >= self.budgets.to(input_ids.device)).to(torch.bool)


class _Cancelled(StoppingCriteria):
    """Ends a streaming generation early when the reader went away or a stop string was seen."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _TokenQueue(BaseStreamer):
    """Hands each generated token (batch size 1) to the reading thread through a queue."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._prompt_seen = False
        self.produced = 0  # decode steps the model ran: shows whether a cancel really stopped it

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt itself
            self._prompt_seen = True
            return
        self.produced += 1
        self.items.put(("tokens", [int(t) for t in value.reshape(-1).tolist()]))

    def end(self) -> None:
        self.items.put(("end", None))


_FORWARD_LOCK = threading.RLock()


class _FirstStepLogits:
    """Keeps the raw logits of the first generated position (the prefill's last one) while a
    ``generate`` call runs, through a forward hook on the output head: asking ``generate`` for
    ``output_logits`` instead would keep batch × vocab logits of *every* step (hundreds of MB for a
    150k vocabulary) to use only the first."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._head = model.get_output_embeddings()
        self._handle: Any = None
        self.logits: torch.Tensor | None = None

    def _keep_first(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = output[:, -1, :].detach()

    def __enter__(self) -> _FirstStepLogits:
        self._handle = self._head.register_forward_hook(self._keep_first)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class LoadedModel:
    """A causal LM and its tokenizer, ready for batched generation. Thread-safe: calls are serialised."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        folder: Path,
        quantization: Quantization,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.folder = folder
        self.quantization = quantization
        # One forward pass at a time per process, across models: the model is not re-entrant (KV caches,
        # global RNG for seeds); two models (old and new during a registry hot swap) running passes at
        # once were seen to hang the service; and on few CPU cores parallel passes only fight anyway.
        self._lock = _FORWARD_LOCK
        self._eos_ids = _eos_ids(model, tokenizer)
        #: Temperature-scaling factor fitted on feedback (monitor ``recalibrate`` response): divides the
        #: logits behind ``Generation.confidence``; 1.0 until a fit says otherwise.
        self.calibration_temperature = 1.0

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int | Sequence[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> list[Generation]:
        """Continue every prompt in one left-padded batch; greedy when ``temperature == 0``.

        ``max_new_tokens`` is one budget for all prompts or one per prompt. Text is cut before the
        first ``stop`` string. A ``seed`` makes sampling reproducible for the same batch. The penalties
        are OpenAI's (:class:`OpenAIPenalties`).
        """
        if not prompts:
            return []
        budgets = _budgets(max_new_tokens, len(prompts))
        params = _params(temperature, top_p, seed, stop, presence_penalty, frequency_penalty)
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            inputs = self._encode(prompts)
            prompt_len = int(inputs["input_ids"].shape[1])
            timer = _FirstTokenTimer(started)
            criteria = StoppingCriteriaList([_PerRowBudget(prompt_len, torch.tensor(budgets))])
            first = _FirstStepLogits(self.model)
            with first:
                out = self.model.generate(
                    **inputs,
                    generation_config=self._generation_config(params, max(budgets)),
                    logits_processor=penalty_processors(params, prompt_len),
                    stopping_criteria=criteria,
                    streamer=timer,
                )
            latency = time.perf_counter() - started
            confidence = self._first_token_confidence(first.logits, out[:, prompt_len])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        rows = out[:, prompt_len:].tolist()
        for row, budget, n_prompt, conf in zip(rows, budgets, prompt_tokens, confidence, strict=True):
            text, n_out, reason = self._finish(row[:budget], params.stop)
            results.append(Generation(text, int(n_prompt), n_out, latency, timer.first_token_s, reason, conf))
        return results

    def _first_token_confidence(self, logits: torch.Tensor, chosen: torch.Tensor) -> list[float]:
        """P(first generated token) per row, temperature-scaled as σ(logit(p) / T): the same transform
        the monitor fits on feedback (tasks/monitoring/feedback.py), so a fitted T applies here unchanged."""
        probs = torch.softmax(logits.float(), dim=-1)
        p = probs.gather(1, chosen[:, None].to(probs.device))[:, 0]
        return calibrated(p, self.calibration_temperature).tolist()

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> TextStream:
        """Start generating for one prompt in a background thread; iterate the result for text chunks."""
        params = _params(temperature, top_p, seed, stop, presence_penalty, frequency_penalty)
        return TextStream(self, prompt, _budgets(max_new_tokens, 1)[0], params)

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text`` (special tokens the tokenizer adds included)."""
        return len(self.tokenizer(text)["input_ids"])

    # -- internals shared with TextStream ------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def _generation_config(self, params: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        # Start from the model's own config so its eos ids (e.g. Llama-3's list) are kept.
        cfg = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        cfg.max_new_tokens = max_new_tokens
        cfg.max_length = None
        cfg.pad_token_id = self.tokenizer.pad_token_id
        cfg.eos_token_id = list(self._eos_ids) or None
        cfg.num_beams = 1
        if params.greedy:
            # None rather than 1.0: a sampling value left over from the model's config next to
            # do_sample=False makes transformers warn on every call.
            cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
        else:
            cfg.do_sample, cfg.temperature, cfg.top_p = True, params.temperature, params.top_p
            if params.seed is not None:
                torch.manual_seed(params.seed)  # global RNG: safe because callers hold self._lock
        return cfg

    def _finish(self, ids: list[int], stop: tuple[str, ...]) -> tuple[str, int, FinishReason]:
        """Cut one row at EOS, then at the first stop string; returns text, tokens used, reason."""
        reason: FinishReason = "length"
        for i, tok in enumerate(ids):
            if tok in self._eos_ids:
                ids, reason = ids[: i + 1], "eos"
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, stop)
        if cut is None:
            return text, len(ids), reason
        # The fewest tokens whose text already contains the stop string: what the model "spent".
        used = next(k for k in range(1, len(ids) + 1) if _first_stop(self._decode(ids[:k]), stop) is not None)
        return text[:cut], used, "stop"

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TokenStream:
    """Continuation text of one prompt, chunk by chunk, from token ids a producer puts in ``_tokens``.

    Iterate it once. When iteration ends, ``generation`` holds the totals; an exception raised by the
    model is re-raised from the iterator (never turned into text). ``close()`` stops generation early.
    Producers: :class:`TextStream` (a ``generate`` call in a thread) and
    ``bentos.continuous.ContinuousStream`` (a request of the continuous-batching engine).
    """

    def __init__(self, model: LoadedModel, max_new_tokens: int, params: SamplingParams) -> None:
        self._model = model
        self._budget = max_new_tokens
        self._params = params
        self._tokens = _TokenQueue()
        self._started = time.perf_counter()
        self._first_token_s: float | None = None
        self._prompt_tokens = 0
        self.generation: Generation | None = None

    def cancel(self) -> None:
        """Ask generation to stop after its current step; returns at once (safe from any thread)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop generation (if still running) and wait until the producer has let go of the model."""
        raise NotImplementedError

    def _confidence(self) -> float | None:
        """First-token confidence, when the producer knows it."""
        return None

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        emitted = ""
        reason: FinishReason = "length"
        stop = self._params.stop
        # Hold back the last len(longest stop)-1 chars: they may be the start of a stop string.
        hold = max((len(s) for s in stop), default=1) - 1
        try:
            while True:
                kind, payload = self._tokens.items.get()
                if kind == "error":
                    raise payload
                if kind == "end":
                    break
                if self._first_token_s is None:
                    self._first_token_s = time.perf_counter() - self._started
                for tok in payload:
                    if reason == "eos" or len(ids) >= self._budget:
                        continue  # padding after EOS, or a token past the budget
                    ids.append(tok)
                    if tok in self._model._eos_ids:
                        reason = "eos"
                text = self._model._decode(ids)
                cut = _first_stop(text, stop)
                if cut is not None:
                    reason = "stop"
                    self.cancel()
                    if cut > len(emitted):
                        yield text[len(emitted) : cut]
                    emitted = text[:cut]
                    break
                # A trailing U+FFFD is half of a multi-byte character: wait for the rest.
                safe = len(text.rstrip("\ufffd")) - hold
                if safe > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted) : safe]
                    emitted = text[:safe]
            if reason != "stop":
                text = self._model._decode(ids)
                if len(text) > len(emitted):
                    yield text[len(emitted) :]
                emitted = text
            self.generation = Generation(
                text=emitted,
                prompt_tokens=self._prompt_tokens,
                output_tokens=len(ids),
                latency_s=time.perf_counter() - self._started,
                first_token_s=self._first_token_s,
                finish_reason=reason,
                confidence=self._confidence(),
            )
        finally:
            self.close()

    @property
    def tokens_generated(self) -> int:
        """Tokens the model has generated so far (read after ``close()`` for the final count): less
        than the budget after a cancel means generation really stopped early."""
        return self._tokens.produced

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens


class TextStream(TokenStream):
    """A stream produced by one ``generate`` call in a background thread (holds the model lock)."""

    def __init__(self, model: LoadedModel, prompt: str, max_new_tokens: int, params: SamplingParams) -> None:
        super().__init__(model, max_new_tokens, params)
        self._prompt = prompt
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lockgate-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        m = self._model
        try:
            with m._lock, torch.inference_mode():
                inputs = m._encode([self._prompt])
                self._prompt_tokens = int(inputs["attention_mask"].sum())
                criteria = StoppingCriteriaList([_Cancelled(self._cancel)])
                m.model.generate(
                    **inputs,
                    generation_config=m._generation_config(self._params, self._budget),
                    logits_processor=penalty_processors(self._params, int(inputs["input_ids"].shape[1])),
                    stopping_criteria=criteria,
                    streamer=self._tokens,
                )
        except BaseException as exc:  # handed to the reader, which re-raises it
            self._tokens.items.put(("error", exc))

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        self._thread.join()


def load_model(folder: Path, device: str | None = None) -> LoadedModel:
    """Load the model and tokenizer in ``folder`` onto ``device`` (cuda when available, else cpu)."""
    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantization = detect_quantization(folder)
    started = time.perf_counter()
    if quantization == "quanto":
        model = _load_quanto(folder, device)
    elif quantization == "lockgate":
        model = load_quantized(folder, device)
    else:
        # torchao folders need nothing special: transformers reads quantization_config from config.json.
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=device)
    model.eval()
    tokenizer = _load_tokenizer(folder, model)
    logger.info(
        "loaded %s (quantization=%s) on %s in %.1fs",
        folder,
        quantization,
        device,
        time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, device, folder, quantization)


def detect_quantization(folder: Path) -> Quantization:
    """Which loader ``folder`` needs, from its files; raises for quantization methods not handled here."""
    if (folder / QUANTO_QMAP).is_file():
        return "quanto"
    if (folder / LOCKGATE_QUANT_CONFIG).is_file():
        return "lockgate"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    qconfig = json.loads(config_path.read_text()).get("quantization_config")
    if qconfig is None:
        return "none"
    method = qconfig.get("quant_method")
    if method == "torchao":
        return "torchao"
    raise ModelLoadError(
        f"{folder}: quantization method {method!r} is not supported (lockgate, torchao, quanto are)"
    )


def weights_size_bytes(folder: Path) -> int:
    """Bytes of weight files (*.safetensors, *.bin, *.pt) directly in ``folder``."""
    return sum(
        p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def _load_quanto(folder: Path, device: str) -> PreTrainedModel:
    from optimum.quanto import QuantizedModelForCausalLM

    wrapper = QuantizedModelForCausalLM.from_pretrained(str(folder))
    # The wrapper only forwards __call__/forward; .generate and .generation_config live on the wrapped
    # transformers model (optimum/quanto/models/transformers_models.py keeps it in ``_wrapped``).
    model: PreTrainedModel = wrapper._wrapped
    if (folder / "generation_config.json").is_file():
        # quanto rebuilds the model with from_config, which ignores generation_config.json.
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device)


def _load_tokenizer(folder: Path, model: PreTrainedModel) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Left padding: generation appends on the right, so every row's last real token must be last.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{folder}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens: got {len(budgets)} budgets for {n} prompts")
    if min(budgets) < 1:
        raise ValueError("max_new_tokens: must be >= 1")
    return budgets


def _params(
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: list[str] | None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> SamplingParams:
    if temperature < 0:
        raise ValueError("temperature: must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError("top_p: must be in (0, 1]")
    if stop and any(not s for s in stop):
        raise ValueError("stop: strings must not be empty")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2.0 <= value <= 2.0:  # OpenAI's (and vLLM's) range; also refuses NaN
            raise ValueError(f"{name}: must be between -2 and 2")
    return SamplingParams(
        float(temperature),
        float(top_p),
        seed,
        tuple(stop or ()),
        float(presence_penalty),
        float(frequency_penalty),
    )


def calibrated(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """σ(logit(p) / T): a probability after temperature scaling (T fitted by the monitor on feedback)."""
    p = p.float().clamp(1e-7, 1 - 1e-7)
    return torch.sigmoid(torch.logit(p) / temperature)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
