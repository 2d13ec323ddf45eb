"""Chat requests: ``messages`` ([{role, content}]) turned into the one prompt string the model continues.

With a tokenizer that has a chat template (instruction-tuned models ship one in tokenizer_config.json),
the template renders the conversation and appends the assistant's turn header
(``add_generation_prompt=True``). Without one (base models, the demo model) the fallback is a plain
transcript, one ``role: content`` line per message, ending in ``"assistant:"`` so the model continues
as the assistant::

    system: You add numbers.
    user: what is 3 plus 4?
    assistant:

No torch here: rendering only needs the tokenizer object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    """One turn of a conversation (the OpenAI-style shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(description="What they said.")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused the conversation (e.g. roles that must alternate)."""


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt for ``messages``: the tokenizer's chat template when it has one, else the plain
    ``role: content`` transcript described in the module docstring."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError (raise_exception in the template) and kin
            raise ChatTemplateError(f"the model's chat template refused the conversation: {exc}") from exc
        return str(rendered)
    return plain_transcript(turns)


def plain_transcript(turns: list[dict[str, str]]) -> str:
    """``role: content`` per line, then ``assistant:`` for the model to continue."""
    lines = [f"{turn['role']}: {turn['content']}" for turn in turns]
    return "\n".join([*lines, "assistant:"])


PromptFormat = Literal["auto", "chat", "completion"]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(tokenizer: Any, prompt_format: PromptFormat) -> bool:
    """Whether ``prompt_format`` means the chat template for this tokenizer (auto: when it has one)."""
    if prompt_format == "chat" and not has_chat_template(tokenizer):
        raise ChatTemplateError("format: chat, but the model's tokenizer has no chat template")
    return prompt_format == "chat" or (prompt_format == "auto" and has_chat_template(tokenizer))


def render_prompt(
    tokenizer: Any,
    prompt: str,
    prompt_format: PromptFormat = "auto",
    few_shot: tuple[tuple[str, str], ...] = (),
    system: str | None = None,
) -> str:
    """The text the model continues for one dataset row, in evaluation, canary traffic and replay alike.

    chat: ``[system], (user: example, assistant: answer)…, user: prompt`` rendered by
    :func:`render_chat` - exactly what the service renders for a ``messages`` request with those turns.
    completion: few-shot examples as ``"prompt answer"`` blocks (a blank line after each), then the
    prompt (and no system text).
    """
    if uses_chat(tokenizer, prompt_format):
        turns = [ChatMessage(role="system", content=system)] if system else []
        for question, answer in few_shot:
            turns.append(ChatMessage(role="user", content=question))
            turns.append(ChatMessage(role="assistant", content=answer))
        return render_chat(tokenizer, [*turns, ChatMessage(role="user", content=prompt)])
    shots = "".join(f"{question} {answer}\n\n" for question, answer in few_shot)
    return shots + prompt
