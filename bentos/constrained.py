"""Constrained decoding for ``response_format`` json_object / json_schema, with xgrammar.

xgrammar compiles the JSON grammar (or the schema) against the tokenizer's vocabulary and masks, at
every step, the tokens that would leave the grammar; once the JSON is complete only EOS is allowed.
So every answer that ends by itself (finish_reason ``stop``) parses and validates against the schema;
an answer cut by ``max_tokens`` (``length``) may be incomplete, as in OpenAI's API.

Runs one request per ``generate`` call, beside the batcher and engine (their batches share one set of
logits processors); its KV-cache room is reserved like any other request's.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation, LoadedModel


class Grammars:
    """Compiled grammars of one model, cached by schema (compiling is the expensive part)."""

    def __init__(self, model: LoadedModel) -> None:
        import xgrammar as xgr

        vocab = model.model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(
            model.tokenizer, vocab_size=vocab, stop_token_ids=sorted(model._eos_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compile(self, schema: dict[str, Any] | None) -> Any:
        """The grammar for ``schema``; any JSON object when None (json_object). Raises ValueError for a
        schema xgrammar cannot compile."""
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key not in self._cache:
                try:
                    text = json.dumps(schema if schema is not None else {"type": "object"})
                    grammar = self._compiler.compile_json_schema(text, any_whitespace=False)
                except Exception as exc:  # xgrammar raises RuntimeError/ValueError on bad schemas
                    raise ValueError(f"cannot compile the JSON schema: {exc}") from exc
                self._cache[key] = grammar
            return self._cache[key]


def generate_constrained(
    model: LoadedModel,
    grammar: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> Generation:
    """One prompt's continuation with every token masked by ``grammar``."""
    from xgrammar.contrib.hf import LogitsProcessor

    from lockgate.bentos.runtime import Generation, SamplingParams

    params = SamplingParams(temperature, top_p, seed)
    with model._lock, torch.inference_mode():
        started = time.perf_counter()
        inputs = model._encode([prompt])
        prompt_len = int(inputs["input_ids"].shape[1])
        out = model.model.generate(
            **inputs,
            generation_config=model._generation_config(params, max_new_tokens),
            logits_processor=[LogitsProcessor(grammar)],
        )
        latency = time.perf_counter() - started
    text, used, reason = model._finish(out[0, prompt_len:].tolist(), ())
    return Generation(text, prompt_len, used, latency, None, reason)
