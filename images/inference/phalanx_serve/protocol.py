"""OpenAI-compatible request and response bodies.

Parameter ranges follow OpenAI's API reference (vLLM's for vLLM's extensions); a value outside
them is a 400, not a clamp. Three kinds of fields:

* implemented ones, which change the output as OpenAI or vLLM define it;
* known ones that this server does not implement (tools, response formats, beam search, ...):
  accepted only at their no-op value (``null``, ``false``, ``[]``, ``{"type": "text"}``), else a
  400 that names the field, never a silent 200;
* unknown ones: a 400 ``Unrecognized request argument supplied: <name>``, as OpenAI answers.

A lone UTF-16 surrogate anywhere in a body (valid JSON, invalid Unicode) is refused up front,
so no tokenizer or template ever sees one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_PROMPTS = 32
MAX_CHOICES = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64

# Known fields this server does not implement, with the values that mean "not used".
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prompt_logprobs": (None,),
    "priority": (None, 0),
    "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "logits_processors": (None,),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "add_special_tokens": (None, True),
}
_UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "store": (None, False),
    "echo": (None, False),
    "continue_final_message": (None, False),
    "documents": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
}


def _find_surrogate(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            if (hit := _find_surrogate(k, path)) or (hit := _find_surrogate(v, f"{path}.{k}")):
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if hit := _find_surrogate(v, f"{path}[{i}]"):
                return hit
    return None


def _refuse_unsupported(name: str, value: Any, table: dict[str, tuple[Any, ...]]) -> Any:
    if not any(value == a and type(value) is type(a) for a in table[name]):
        raise ValueError(f"{name} is not supported by this server; remove it from the request")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        if (path := _find_surrogate(data, "body")) is not None:
            where = path.removeprefix("body.").removeprefix("body")
            raise ValueError(
                f"{where or 'the request'} contains a lone UTF-16 surrogate, which is not "
                "valid Unicode text"
            )
        return data


class SamplingFields(_Body):
    model: str | None = Field(None, description="Served model name; defaults to the only model.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 disables top-k.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Any = Field(None, description="A string or up to 4; generation ends before one.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as text) -> bias added to logits."
    )
    min_tokens: int = Field(0, ge=0, description="Tokens generated before a stop may end it.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    # Informational fields that never change the output; accepted as OpenAI accepts them.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Known but not implemented (see _UNSUPPORTED_COMMON).
    response_format: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    prompt_logprobs: Any = None
    priority: Any = None
    truncate_prompt_tokens: Any = None
    return_tokens_as_token_ids: Any = None
    logits_processors: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if (
            not isinstance(items, list)
            or len(items) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_LENGTH for s in items)
        ):
            raise ValueError(
                f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings of at "
                f"most {MAX_STOP_LENGTH} characters"
            )
        return list(items)

    @field_validator(*_UNSUPPORTED_COMMON, mode="before")
    @classmethod
    def _unsupported_common(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(str(info.field_name), value, _UNSUPPORTED_COMMON)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


TokenIds = list[int]


class CompletionRequest(SamplingFields):
    prompt: Any = Field(
        description="Text, token ids, or a list of either (one completion per prompt)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate at most (0 with echo: score the prompt)."
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Any = None
    add_special_tokens: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[TokenIds]:
        problem = (
            "prompt must be a string, a list of strings, a list of token ids, or a list of "
            "token-id lists"
        )
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError(problem + " (and not empty)")
        if all(isinstance(p, str) for p in value):
            prompts: list[Any] = value
        elif all(_is_token(t) for t in value):
            prompts = [value]
        elif all(isinstance(p, list) and all(_is_token(t) for t in p) for p in value):
            prompts = value
        else:
            raise ValueError(problem)
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt may hold at most {MAX_PROMPTS} prompts")
        if any(isinstance(p, list) and any(t < 0 for t in p) for p in prompts):
            raise ValueError("prompt token ids must be non-negative integers")
        return prompts

    @field_validator(*_UNSUPPORTED_COMPLETION, mode="before")
    @classmethod
    def _unsupported_completion(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(str(info.field_name), value, _UNSUPPORTED_COMPLETION)

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError("best_of must be greater than or equal to n")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of greater than n cannot be streamed; set stream to false")
        return self


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Any = None
    name: str | None = None
    # Fields clients echo back from earlier assistant messages; only their empty values.
    refusal: None = None
    tool_calls: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_call_id: str | None = None
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part of type {kind!r} is not supported; only text")
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise ValueError("a text content part is {'type': 'text', 'text': <string>}")
            texts.append(part["text"])
        return "".join(texts)

    def text(self) -> str:
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """What the chat template sees: role, text, and whichever other fields were given."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if (value := getattr(self, name)) is not None:
                message[name] = value
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    store: Any = None
    echo: Any = None
    continue_final_message: Any = None
    documents: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None

    @field_validator(*_UNSUPPORTED_CHAT, mode="before")
    @classmethod
    def _unsupported_chat(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(str(info.field_name), value, _UNSUPPORTED_CHAT)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; the last one (when usage was asked for)
    has no choices and carries the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    """What a chunk adds to a chat message: the first chunk of a choice names the role, the
    last one (with the finish reason) is empty. Absent fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "phalanx"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_json(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorBody(message=message, type=type_, code=code, param=param)
    ).model_dump()
