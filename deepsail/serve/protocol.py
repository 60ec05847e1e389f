"""The wire format: OpenAI-compatible request and response bodies (plus vLLM's common extensions).

Requests are validated here, by pydantic, so a bad field is a 400 with the field's name before any work is done;
the checks that need the model (its name, context length, vocabulary) are in `openai.py`. Types are strict, as
OpenAI's are: `"max_tokens": "4"` or `true` is an error, not a 4 or a 1. Every text field must be valid Unicode (a
lone surrogate such as "\\ud800" is valid JSON but no text a tokenizer can read). Unknown fields are ignored, as vLLM
and OpenAI's own server do for forward compatibility, but fields that would change the answer and that we do not
implement (`tools`, `logit_bias`, penalties other than `repetition_penalty`, `best_of`) are refused when set to
anything but their no-op value: a client that relies on them should find out. `response_format` takes "text",
"json_object" and "json_schema" (structured output, infer/structured.py). Chat messages may hold images as OpenAI's
`image_url` content parts, inline `data:` URLs only (the server fetches nothing); `openai.py` decodes them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from deepsail.infer.structured import JSON_OBJECT
from deepsail.multimodal.connector import IMAGE_TOKEN

# Bounds that keep one request from asking for unbounded work. The context length bounds max_tokens further.
MAX_N = 16  # choices per request (OpenAI allows 128; each is a full generation here)
MAX_PROMPTS = 64  # prompts in one batched /v1/completions request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI's chat API
MAX_TOKENS_LIMIT = 1 << 20  # a sanity bound; the model's context is the real one
MAX_SEED = (1 << 63) - 1
# Images per chat request: each is a vision-encoder pass and `num_tokens` positions of context. The body limit
# (ServerConfig.max_body_bytes, 8 MiB) bounds their data: URLs' total size.
MAX_IMAGES = 8


class _Body(BaseModel):
    # NaN/inf are never meaningful sampling values and would slip past range checks (nan >= 0 is False, inf is big).
    # strict: no "4" -> 4 or true -> 1 coercion (an int is still a valid float).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"is not valid Unicode: an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start} (JSON "
            "escapes of characters outside the BMP come in pairs); send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every text field a client sends


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None


class SamplingFields(_Body):
    """Fields every generation endpoint shares; `app.sampling_params` turns them into `SamplingParams`."""

    model: Text | None = Field(None, description="must be an id /v1/models lists (or absent)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off (vLLM extension)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="vLLM extension; 1 = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported; must be empty")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS (benchmarks)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    response_format: dict[str, Any] | None = Field(
        None,
        description='{"type": "text"} (default), {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name": ..., "schema": {...}}}: the output is compact JSON valid under the schema, unless finish_reason '
        'is "length" (max_tokens ran out first: then it is a valid prefix)',
    )

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("is not supported (only 0); use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("is not supported (only an empty map)")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict | None) -> dict | None:
        kind = None if value is None else value.get("type")
        if value is None or kind in ("text", "json_object"):
            return value
        if kind != "json_schema":
            raise ValueError(f'type {kind!r} is not supported: use "text", "json_object" or "json_schema"')
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError(
                'json_schema needs its schema: {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}'
            )
        return value

    @property
    def json_schema(self) -> str | None:
        """The JSON schema text that `response_format` asks the output to follow (None: free text)."""
        kind = None if self.response_format is None else self.response_format["type"]
        if kind == "json_object":
            return JSON_OBJECT
        if kind == "json_schema":
            return json.dumps(self.response_format["json_schema"]["schema"])
        return None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# --- /v1/completions --------------------------------------------------------------------------------------------------
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _no_content_parts(value: Any) -> Any:
    """A prompt of chat-style parts (an image, say) would otherwise fail as "should be a valid string"."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, dict) for x in value)):
        raise ValueError(
            "content parts (text or image_url objects) are taken only in /v1/chat/completions messages; a prompt "
            "here is text or token ids"
        )
    return value


class CompletionRequest(SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="prepend the prompt; with logprobs, score every prompt token too")
    suffix: Text | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 (no server-side reranking)")

    _prompt_is_no_parts = field_validator("prompt", mode="before")(_no_content_parts)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("(insertion) is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return list(p)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class RouteInfo(BaseModel):
    """Where an edge/cloud-routed request ran (`deepsail serve --route`): absent on a server that does not route."""

    target: Literal["edge", "cloud"]
    mode: Literal["auto", "explicit"]
    difficulty: float | None = None
    threshold: float | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    route: RouteInfo | None = None


# --- /v1/chat/completions ---------------------------------------------------------------------------------------------
class ImageURL(_Body):
    url: Text = Field(description="data:image/png;base64,<payload>: inline only, the server fetches no URL")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted and ignored: every image is read at the model's one resolution"
    )


class ContentPart(_Body):
    """One part of a message's content, in OpenAI's shape: {"type": "text", "text": ...} or {"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}}. One model rather than a tagged union of two, so that an
    error's path reads `messages.0.content.1.text` (pydantic puts a union member's tag into the path)."""

    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> ContentPart:
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError('a "text" part holds `text` (and no image_url): {"type": "text", "text": "..."}')
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError(
                'an "image_url" part holds `image_url` (and no text): {"type": "image_url", "image_url": {"url": '
                '"data:image/png;base64,..."}}'
            )
        return self


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _images_only_from_the_user(self) -> ChatMessage:
        if self.role != "user" and self.images():
            raise ValueError(f"a {self.role} message holds an image; images go in user messages (as OpenAI's API)")
        return self

    def text(self) -> str:
        """The content as the chat template sees it: text parts joined, each image as IMAGE_TOKEN in its place (the
        prompt training rendered for IMAGE_TOKEN + text)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(IMAGE_TOKEN if p.type == "image_url" else p.text for p in self.content)

    def images(self) -> list[tuple[int, ImageURL]]:
        """(part index, image) of each image part, in order."""
        if not isinstance(self.content, list):
            return []
        return [(k, p.image_url) for k, p in enumerate(self.content) if p.image_url is not None]


def chat_images(messages: list[ChatMessage]) -> list[tuple[str, ImageURL]]:
    """Every image of a chat in reading order, with where it is ("messages.0.content.1")."""
    return [(f"messages.{i}.content.{k}", image) for i, m in enumerate(messages) for k, image in m.images()]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="vLLM extension")
    tools: list[Any] | None = Field(None, description="not supported yet: only absent or empty")
    tool_choice: Any = Field(None, description='not supported yet: only absent or "none"')
    functions: list[Any] | None = Field(None, description="not supported (deprecated by OpenAI too)")
    function_call: Any = Field(None, description="not supported (deprecated by OpenAI too)")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tool calling is not supported yet; the model would answer as if no tools were given")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError('tool calling is not supported yet: only "none"')
        return value

    @field_validator("messages")
    @classmethod
    def _few_images(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        n = len(chat_images(messages))
        if n > MAX_IMAGES:
            raise ValueError(f"hold {n} images; at most {MAX_IMAGES} per request")
        return messages

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    def template_messages(self) -> list[dict[str, str]]:
        return template_messages(self.messages)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    route: RouteInfo | None = None


# --- /generate (plain JSON, no OpenAI envelope) -----------------------------------------------------------------------
class GenerateRequest(SamplingFields):
    prompt: Text
    max_tokens: int | None = Field(128, ge=1, le=MAX_TOKENS_LIMIT)
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False  # use /v1/completions to stream

    _prompt_is_no_parts = field_validator("prompt", mode="before")(_no_content_parts)


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "abort"] | None
    usage: Usage


# --- /tokenize, /detokenize, /tokenizer_info (vLLM's extensions: clients need no local tokenizer) -------------------
MAX_DETOKENIZE = 1 << 20  # ids per /detokenize request; far beyond any context


class TokenizeRequest(_Body):
    """Text (`prompt`) or chat `messages`: the ids the completion / chat endpoint would feed the model for it."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None
    add_generation_prompt: bool = True
    # deepsail adds no special tokens to a prompt (the ids are the text's, as /v1/completions feeds them), so this
    # vLLM field is accepted and changes nothing.
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` (text) or `messages` (a chat)")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DETOKENIZE)]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-eval's remote tokenizer (and vLLM's clients) read from GET /tokenizer_info."""

    tokenizer_class: str = "deepsail.data.Tokenizer"
    vocab_size: int
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None


# --- /v1/models, errors ---------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "deepsail"
    max_model_len: int | None = None
    parent: str | None = None  # for a LoRA adapter: the base model it runs on (as vLLM reports it)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's {"error": {...}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers
        self.code = code if code is not None else status


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()
