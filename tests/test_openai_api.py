"""The OpenAI-compatible API (/v1) against a real server, driven by clients nobody here wrote: the
official ``openai`` SDK, LiteLLM and lm-evaluation-harness. Tiny random Llama, API keys on."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from lockgate.bentos.auth import add_key
from lockgate.bentos.chat import ChatMessage, render_chat
from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.request_log import RequestLog
from lockgate.bentos.runtime import load_model
from lockgate.bentos.scoring import score_tokens
from lockgate.tasks.evaluate import exact_match
from lockgate.tasks.release.serving import ServiceProcess, start_services

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS = REPO_ROOT / "tests" / "lm_eval_tasks"
PROMPT = "Q: what is 3 plus 4?\nA:"
SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no", "maybe"]}, "confident": {"type": "boolean"}},
    "required": ["verdict", "confident"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("openai")
    keys = root / "keys.json"
    fast = add_key(keys, "team-openai", rate_per_s=1000, burst=1000)
    slow = add_key(keys, "team-slow", rate_per_s=0.05, burst=1)
    config = ServiceConfig.model_validate(
        {
            "limits": {"max_new_tokens": 64, "max_prompt_chars": 2000, "concurrency": 64},
            "batching": {"max_batch_size": 8, "max_latency_ms": 10},
            "warmup_requests": 1,
        }
    )
    [process] = start_services(
        [
            {
                "target": "lockgate.bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": str(tiny_llm_dir),
                "request_log": root / "requests.sqlite",
                "log_dir": root / "logs",
                "api_keys_file": keys,
                "config": config,
            }
        ]
    )
    with process:
        listed = httpx.get(
            f"{process.url}/v1/models", headers={"Authorization": f"Bearer {fast}"}, timeout=30
        )
        model = listed.json()["data"][0]["id"]
        yield {
            "process": process,
            "fast": fast,
            "slow": slow,
            "log": root / "requests.sqlite",
            "model": model,
        }


def _client(service: dict, key: str | None = None) -> openai.OpenAI:
    proc: ServiceProcess = service["process"]
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key=key or service["fast"], max_retries=0, timeout=60)


def test_models_list_names_the_served_version(service: dict) -> None:
    models = _client(service).models.list().data
    assert len(models) == 1 and models[0].metadata["role"] == "stable"  # type: ignore[attr-defined]
    assert models[0].owned_by == "lockgate-stable"


def test_chat_and_completion_in_openai_shapes(service: dict) -> None:
    client = _client(service)
    chat = client.chat.completions.create(
        model=service["model"],
        messages=[{"role": "user", "content": "what is 3 plus 4?"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.created > 0
    [choice] = chat.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    done = client.completions.create(
        model=service["model"], prompt=[PROMPT, "Q: 1 plus 1?\nA:"], max_tokens=4, temperature=0, n=2
    )
    assert done.object == "text_completion" and [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text == done.choices[1].text  # greedy: both choices of one prompt agree
    # Same request through /generate: the /v1 layer changes the shape, not the text.
    proc: ServiceProcess = service["process"]
    native = httpx.post(
        f"{proc.url}/generate",
        json={"prompt": PROMPT, "max_new_tokens": 4},
        headers={"Authorization": f"Bearer {service['fast']}"},
        timeout=60,
    ).json()
    assert done.choices[0].text == native["text"]


def test_streaming_with_usage_equals_unary(service: dict) -> None:
    client = _client(service)
    messages = [{"role": "user", "content": "count to five"}]
    unary = client.chat.completions.create(
        model=service["model"], messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=service["model"], messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_stream_of_whole_choices_equals_unary(service: dict) -> None:
    """n > 1, logprobs and constrained output with stream: true come as whole choices in stream chunks,
    equal to the unary answer (greedy), reassembled by the SDK like any stream."""
    client = _client(service)
    messages = [{"role": "user", "content": "count to five"}]
    asked = {"model": service["model"], "messages": messages, "max_tokens": 8, "temperature": 0}
    asked |= {"n": 2, "logprobs": True, "top_logprobs": 2}
    unary = client.chat.completions.create(**asked)
    usage = {"include_usage": True}
    chunks = list(client.chat.completions.create(**asked, stream=True, stream_options=usage))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == unary.choices[index].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [unary.choices[index].finish_reason]
        [scored] = [c.logprobs for c in mine if c.logprobs is not None]
        expected = unary.choices[index].logprobs.content
        assert [t.token for t in scored.content] == [t.token for t in expected]
        assert all(len(t.top_logprobs) == 2 for t in scored.content)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == unary.usage.total_tokens
    # constrained output, greedy (as test_json_schema's json_object case): the streamed text is the unary
    # answer, a JSON object
    constrained = {"model": service["model"], "messages": [{"role": "user", "content": "json"}]}
    constrained |= {"max_tokens": 32, "temperature": 0, "response_format": {"type": "json_object"}}
    whole = client.chat.completions.create(**constrained).choices[0].message.content
    streamed = client.chat.completions.create(**constrained, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole and isinstance(json.loads(text), dict)
    completion = client.completions.create(
        model=service["model"], prompt=PROMPT, max_tokens=4, temperature=0, stream=True, logprobs=2, echo=True
    )
    pieces = list(completion)
    assert pieces[0].choices[0].text.startswith(PROMPT) and pieces[0].choices[0].logprobs is not None


def test_penalties_match_the_in_process_engine(service: dict, tiny_llm_dir: Path) -> None:
    """presence/frequency penalties (OpenAI's semantics, bentos/penalties.py) reach the
    service's transformers engine, unary and streamed, and answer what the same model does in-process."""
    client = _client(service)
    model = load_model(tiny_llm_dir)
    penalties = {"presence_penalty": 0.4, "frequency_penalty": 0.8}
    want = model.generate([PROMPT], 12, **penalties)[0].text
    assert want != model.generate([PROMPT], 12)[0].text, "the penalties change this answer"
    done = client.completions.create(
        model=service["model"], prompt=PROMPT, max_tokens=12, temperature=0, **penalties
    )
    assert done.choices[0].text == want
    chunks = client.completions.create(
        model=service["model"], prompt=PROMPT, max_tokens=12, temperature=0, stream=True, **penalties
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_logprobs_match_an_in_process_forward_pass(service: dict, tiny_llm_dir: Path) -> None:
    client = _client(service)
    echo = client.completions.create(
        model=service["model"], prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    lp = echo.choices[0].logprobs
    model = load_model(tiny_llm_dir)
    ids = model.tokenizer(PROMPT)["input_ids"]
    expected = score_tokens(model, ids, 2)
    assert lp.tokens == [tok for tok, _, _ in expected] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([v for _, v, _ in expected[1:]], abs=1e-4)
    # a dict keyed by token text, as in OpenAI's API: two byte-fragment tokens may share one key
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert echo.choices[0].text == PROMPT

    chat = client.chat.completions.create(
        model=service["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    # Greedy: each chosen token is the most likely one.
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5)


def test_json_schema_output_always_parses_and_validates(service: dict) -> None:
    client = _client(service)
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}

    def one(i: int) -> tuple[str | None, str | None]:
        answer = client.chat.completions.create(
            model=service["model"], messages=[{"role": "user", "content": f"case {i}: verdict?"}],
            max_tokens=48, temperature=1.0, seed=i, response_format=fmt,
        )  # fmt: skip
        return answer.choices[0].message.content, answer.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(50)))
    for content, reason in answers:
        assert reason == "stop", content
        jsonschema.validate(json.loads(content or ""), SCHEMA)
    assert len({c for c, _ in answers}) > 1  # sampled, not one canned answer
    obj = client.chat.completions.create(
        model=service["model"], messages=[{"role": "user", "content": "json"}], max_tokens=32,
        temperature=0, response_format={"type": "json_object"},
    )  # fmt: skip
    # json_object allows any keys: a sampled random model can write one key until max_tokens (OpenAI's
    # caveat too), so greedy here; what ends by itself ("stop") is a JSON object.
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_errors_are_the_sdks_typed_exceptions(service: dict) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(service, key="lg_not-a-key").models.list()
    slow = _client(service, key=service["slow"])
    slow.models.list()
    with pytest.raises(openai.RateLimitError):
        slow.models.list()
    client = _client(service)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=service["model"], messages=messages, extra_body={"best_of": 3})
    assert unknown.value.param == "best_of" and "best_of" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as penalty:
        client.chat.completions.create(model=service["model"], messages=messages, presence_penalty=2.5)
    assert penalty.value.param == "presence_penalty" and "between -2 and 2" in penalty.value.message
    with pytest.raises(openai.BadRequestError) as constrained:
        client.chat.completions.create(
            model=service["model"], messages=messages, frequency_penalty=0.5,
            response_format={"type": "json_object"},
        )  # fmt: skip
    assert constrained.value.param == "frequency_penalty"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.completions.create(model=service["model"], prompt="x" * 2001)
    assert too_long.value.param == "prompt"


def test_v1_requests_are_logged_and_counted_by_endpoint(service: dict) -> None:
    client = _client(service)
    client.completions.create(model=service["model"], prompt=PROMPT, max_tokens=2, temperature=0)
    proc: ServiceProcess = service["process"]
    text = httpx.get(f"{proc.url}/metrics", timeout=10).text
    counted = [line for line in text.splitlines() if line.startswith("llm_endpoint_requests_total{")]
    assert any('endpoint="v1_completions"' in line and 'status="ok"' in line for line in counted), counted
    assert any('endpoint="v1_chat_completions"' in line for line in counted), counted
    log = RequestLog(service["log"])
    try:
        frame = log.read_frame()
    finally:
        log.close()
    rows = frame[(frame["endpoint"] == "v1_completions") & (frame["status"] == "ok")]
    assert len(rows) and rows.iloc[-1]["prompt_tokens"] > 0 and rows.iloc[-1]["output_tokens"] == 2


def test_litellm_openai_provider_chat(service: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Else litellm fetches its model price list from GitHub at import (no network at run time here).
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    proc: ServiceProcess = service["process"]
    answer = litellm.completion(
        model=f"openai/{service['model']}", api_base=f"{proc.url}/v1", api_key=service["fast"],
        messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
    )  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1


def _lm_eval(service: dict, model_type: str, task: str, model_args: str, out: Path, *extra: str) -> float:
    proc: ServiceProcess = service["process"]
    env = {**os.environ, "OPENAI_API_KEY": service["fast"], "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", model_type, "--tasks", task, "--include_path", str(TASKS),
        "--model_args", f"model={service['model']},base_url={proc.url}{model_args}",
        "--output_path", str(out), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = list(out.rglob("results_*.json"))
    metrics = json.loads(result.read_text())["results"][task]
    return float(next(v for k, v in metrics.items() if k.split(",")[0] in ("acc", "exact_match")))


def _items() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "lockgate_arith.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lm_eval_harness_scores_equal_lockgates_own(
    service: dict, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    completions = (
        f"/v1/completions,tokenizer={tiny_llm_dir},tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    harness_ll = _lm_eval(service, "local-completions", "lockgate_arith_mc", completions, tmp_path / "ll")
    chat = "/v1/chat/completions,num_concurrent=1,max_retries=1"
    harness_gen = _lm_eval(
        service,
        "local-chat-completions",
        "lockgate_arith_gen",
        chat,
        tmp_path / "gen",
        "--apply_chat_template",
    )
    # lockgate's own evaluation of the same items, in process: sum of choice-token log-probabilities
    # (lm-eval's acc) and exact match of the greedy answer's first line (tasks/evaluate.py).
    model = load_model(tiny_llm_dir)
    tok = model.tokenizer
    correct_ll, correct_gen = [], []
    for item in _items():
        context = tok(item["prompt"])["input_ids"]
        scores = []
        for choice in item["choices"]:
            ids = context + tok(" " + choice, add_special_tokens=False)["input_ids"]
            scores.append(sum(lp for _, lp, _ in score_tokens(model, ids)[len(context) :]))
        correct_ll.append(scores.index(max(scores)) == item["label"])
        prompt = render_chat(tok, [ChatMessage(role="user", content=item["prompt"])])
        [gen] = model.generate([prompt], max_new_tokens=8, stop=["\n"])
        correct_gen.append(exact_match(gen.text, item["answer"]))
    own_ll = 100 * sum(correct_ll) / len(correct_ll)
    own_gen = 100 * sum(correct_gen) / len(correct_gen)
    print(f"log-likelihood acc: lm-eval {100 * harness_ll:.1f} lockgate {own_ll:.1f}; "
          f"generation exact match: lm-eval {100 * harness_gen:.1f} lockgate {own_gen:.1f}")  # fmt: skip
    assert abs(100 * harness_ll - own_ll) <= 1.0, (harness_ll, own_ll)
    assert abs(100 * harness_gen - own_gen) <= 1.0, (harness_gen, own_gen)


def test_protocol_names_every_unknown_or_unsupported_parameter() -> None:
    from lockgate.bentos import openai_protocol as oai
    from lockgate.bentos.protocol import Refusal

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    unknown = oai.parse(oai.ChatCompletionRequest, {**base, "tools": [], "best_of": 2})
    assert isinstance(unknown, Refusal) and unknown.status == 400
    assert "tools" in unknown.message and "best_of" in unknown.message
    cases = {
        "frequency_penalty": {"frequency_penalty": 2.5},
        "presence_penalty": {"presence_penalty": 0.5, "response_format": {"type": "json_object"}},
        "n": {"n": 9},
        "top_logprobs": {"top_logprobs": 2},
        "stream_options": {"stream_options": {"include_usage": True}},
        "max_tokens": {"max_tokens": 3, "max_completion_tokens": 3},
    }
    for field, extra in cases.items():
        parsed = oai.parse(oai.ChatCompletionRequest, {**base, **extra})
        assert not isinstance(parsed, Refusal), parsed
        refusal = oai.unsupported(parsed)  # type: ignore[arg-type]
        assert refusal is not None and refusal.field == field, (field, refusal)
    penalized = oai.parse(oai.ChatCompletionRequest, {**base, "presence_penalty": -2, "frequency_penalty": 0})
    assert not isinstance(penalized, Refusal) and oai.unsupported(penalized) is None  # type: ignore[arg-type]
    assert oai.penalties(penalized) == {"presence_penalty": -2.0}  # type: ignore[arg-type]
    wrong_type = oai.parse(oai.CompletionRequest, {"model": "m", "prompt": {"a": 1}})
    assert isinstance(wrong_type, Refusal) and wrong_type.field.startswith("prompt")
    assert [oai.finish_reason(r) for r in ("eos", "stop", "length")] == ["stop", "stop", "length"]
    error = oai.error_object(429, "slow down", None)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "rate_limit_exceeded"
