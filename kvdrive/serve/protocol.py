"""The OpenAI API's request and response bodies, as pydantic models (validated strictly: a
field of the wrong type, an unknown field or a value kvdrive cannot honour is a 400).

Beyond OpenAI's fields a request may carry vLLM's extras (``top_k``, ``ignore_eos``,
``stop_token_ids``, ``return_token_ids``) and kvdrive's own options under ``kvdrive``
(``extra_body={"kvdrive": {"prefix_cache": False}}`` with the openai client).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class KvdriveOptions(_Strict):
    """kvdrive's per-request options."""

    prefix_cache: bool = Field(
        True,
        description="load this prompt's stored prefix from the prefix pool and store "
        "its new chunks there (false: neither)",
    )


class _Generation(_Strict):
    """The fields completions and chat completions share."""

    model: str
    temperature: Annotated[Finite, Field(ge=0)] = 1.0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    presence_penalty: Finite = 0.0
    frequency_penalty: Finite = 0.0
    logit_bias: dict[str, Finite] | None = None
    user: str | None = None
    # vLLM's sampling extras
    top_k: Annotated[int, Field(ge=-1)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    return_token_ids: bool = Field(
        False,
        description="each choice also carries its generated token ids (`token_ids`); "
        "streamed, one chunk per token (always so for a model without "
        "a tokenizer)",
    )
    kvdrive: KvdriveOptions | None = None

    @model_validator(mode="after")
    def _supported(self):
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name} is not supported by kvdrive (leave it out)")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def use_prefix_cache(self) -> bool:
        return self.kvdrive is None or self.kvdrive.prefix_cache


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Generation):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if self.echo or self.logprobs is not None or (self.best_of or 1) != 1 or self.suffix:
            raise ValueError("echo, logprobs, best_of and suffix are not supported by kvdrive (leave them out)")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)) and len(p) != 1:
            raise ValueError("send one prompt per request (a string or a list of token ids)")
        return self

    @property
    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], (str, list)) else p


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _no_logprobs(self):
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs are not supported by kvdrive (leave them out)")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


# -- responses (the OpenAPI schema; handlers build the same shapes as dicts) ----------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
