"""Validation of an OpenAI chat completions request.

The schema checks what OpenAI checks, with the same bounds; fields it does not
know pass through untouched, because providers add their own. The original
JSON object is what goes upstream (minus Tollgate's own routing fields), so
validation never rewrites a caller's request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import InvalidRequest

# Fields that steer Tollgate's routing; they are removed before forwarding.
ROUTING_FIELDS = ("models", "provider")
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128
MAX_FALLBACK_MODELS = 8
MAX_METADATA_PAIRS = 16


class _Open(BaseModel):
    """Accept unknown keys: providers extend the protocol."""

    model_config = ConfigDict(extra="allow", strict=True)


class _ImageUrl(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _InputAudio(_Open):
    data: str
    format: str


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: _ImageUrl


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: _InputAudio


class FilePart(_Open):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]
Content = str | list[ContentPart]


class _FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: _FunctionCall


class SystemMessage(_Open):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: Content


class UserMessage(_Open):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("assistant content may be null only with tool_calls")
        return self


class ToolMessage(_Open):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1)


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class _FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: _FunctionDef


class _NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: _NamedFunction


class _JsonSchema(_Open):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Open):
    type: Literal["text"]


class JsonObjectFormat(_Open):
    type: Literal["json_object"]


class JsonSchemaFormat(_Open):
    type: Literal["json_schema"]
    json_schema: _JsonSchema


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class StreamOptions(_Open):
    include_usage: bool | None = None


class ProviderPreferences(BaseModel):
    """Tollgate's routing preferences (OpenRouter's names)."""

    model_config = ConfigDict(extra="forbid")

    order: list[str] | None = Field(default=None, max_length=32)
    only: list[str] | None = Field(default=None, max_length=32)
    ignore: list[str] | None = Field(default=None, max_length=32)
    allow_fallbacks: bool = True


class ChatCompletionRequest(_Open):
    """The fields Tollgate checks; everything else passes through as sent."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, max_length=MAX_FALLBACK_MODELS
    )
    provider: ProviderPreferences | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_PAIRS)

    @model_validator(mode="after")
    def _cross_field(self) -> ChatCompletionRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise _FieldError("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs requires logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "stream_options requires stream: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise _FieldError("tool_choice", "tool_choice names a function not in tools")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise _FieldError("tool_choice", "tool_choice requires tools")
        return self


class _FieldError(ValueError):
    """A cross-field check that knows which parameter it is about."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated request: what routing needs, plus the body to forward."""

    model: str
    fallback_models: tuple[str, ...]
    provider: ProviderPreferences | None
    stream: bool
    include_usage: bool
    max_output_tokens: int | None
    n: int
    prompt_chars: int
    forward_body: dict[str, Any]


def parse_chat_request(body: object, *, max_messages: int, max_n: int) -> ChatRequest:
    """Check a decoded JSON body; raise ``InvalidRequest`` naming the bad parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise InvalidRequest(
            f"at most {max_messages} messages are accepted, got {len(messages)}",
            param="messages",
            code="too_many_messages",
        )
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise _to_invalid_request(error) from None
    if parsed.n is not None and parsed.n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}", param="n", code="invalid_value")
    forward = {key: value for key, value in body.items() if key not in ROUTING_FIELDS}
    return ChatRequest(
        model=parsed.model,
        fallback_models=tuple(m for m in parsed.models or () if m != parsed.model),
        provider=parsed.provider,
        stream=bool(parsed.stream),
        include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
        max_output_tokens=parsed.max_completion_tokens or parsed.max_tokens,
        n=parsed.n or 1,
        prompt_chars=_prompt_chars(body["messages"]),
        forward_body=forward,
    )


def _prompt_chars(messages: list[Any]) -> int:
    """Characters of text in the prompt: the basis of token estimates before usage is known."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return total


# Pydantic puts the branch it tried into error locations: the discriminator
# value of a tagged union (right after a list index, or after response_format)
# and the type of a plain union. OpenAI's param names have neither.
_TAGGED_UNION_FIELDS = {"response_format"}
_TAGS = {
    "system", "developer", "user", "assistant", "tool",
    "text", "image_url", "input_audio", "file", "refusal",
    "json_object", "json_schema",
}


def _to_invalid_request(error: ValidationError) -> InvalidRequest:
    # Of a union's failed branches the deepest error is the one the caller meant.
    first = max(error.errors(include_url=False), key=lambda item: len(item["loc"]))
    context = first.get("ctx") or {}
    inner = context.get("error")
    if isinstance(inner, _FieldError):
        return InvalidRequest(str(inner), param=inner.param, code="invalid_value")
    param = _param_name(first["loc"])
    kind = first["type"]
    if kind == "missing":
        return InvalidRequest(f"missing required parameter: '{param}'", param=param,
                              code="missing_required_parameter")
    message = str(first["msg"]).removeprefix("Value error, ")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(context.get("discriminator", "")).strip("'")
        param = f"{param}.{tag}" if param != "body" else tag
        message = f"invalid value; expected one of {context.get('expected_tags', '?')}"
    return InvalidRequest(f"invalid '{param}': {message}", param=param, code="invalid_value")


_BRANCH_PREFIXES = ("list[", "function-", "tagged-union", "literal[", "NamedToolChoice")


def _param_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _is_branch(part, previous):
            name += f".{part}" if name else part
        previous = part
    return name or "body"


def _is_branch(part: str, previous: int | str | None) -> bool:
    if part in _TAGS and (isinstance(previous, int) or previous in _TAGGED_UNION_FIELDS):
        return True
    return part == "str" or part.startswith(_BRANCH_PREFIXES)
