"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health`` and ``/metrics``.

A request is checked in this order: the API key (401), the model being loaded (503), the
body (400), the model name (404), the prompt against the context (400,
``context_length_exceeded``), the queue (429 with ``Retry-After``); then it goes to the
engine and its events come back as one JSON body or as server-sent events.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response

from kvdrive.engine.async_engine import QueueFull
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError
from kvdrive.serve import errors
from kvdrive.serve.errors import APIError
from kvdrive.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from kvdrive.serve.responses import Shape, json_response, sse_response
from kvdrive.serve.state import MAX_TENANT, TENANT_PATTERN, ServerState


def create_app(state: ServerState, own_state: bool = True) -> FastAPI:
    """The app over ``state``. ``own_state``: the app's lifespan starts loading the model and
    closes the state at shutdown (False: the caller does, e.g. around many in-process clients)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_state:
            state.start()
        try:
            yield
        finally:
            if own_state:
                state.close()

    app = FastAPI(title="kvdrive", summary="OpenAI-compatible server of kvdrive", lifespan=lifespan)
    app.state.kvdrive = state
    errors.install(app)

    @app.get("/health", responses=errors.RESPONSES)
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=errors.RESPONSES)
    async def models(tenant: Tenant):
        return {
            "object": "list",
            "data": [
                {
                    "id": state.name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "kvdrive",
                    "max_model_len": state.llm.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions", response_model=CompletionResponse, responses=errors.STREAMING)
    async def completions(body: CompletionRequest, request: Request, tenant: Tenant):
        state.check_model(body.model)
        prompt, llm = body.single_prompt, state.llm
        ids = await state.tokenize(_user_error, lambda: llm.encode(prompt)) if isinstance(prompt, str) else prompt
        return await _generate(state, request, body, ids, body.max_tokens, tenant, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors.STREAMING)
    async def chat(body: ChatCompletionRequest, request: Request, tenant: Tenant):
        state.check_model(body.model)
        llm = state.llm

        def encode():
            return llm.encode(llm.apply_chat_template(body.chat_messages()))

        ids = await state.tokenize(_user_error, encode)
        return await _generate(state, request, body, ids, body.max_new, tenant, chat=True)

    return app


def _tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_tenant: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=MAX_TENANT,
            pattern=TENANT_PATTERN,
            description="the prefix pool tenant (within the API key's)",
        ),
    ] = None,
) -> str | None:
    """The request's prefix pool tenant (the API key checked first), once the model is ready."""
    state: ServerState = request.app.state.kvdrive
    tenant = state.tenant(authorization, x_tenant)
    state.ready()
    return tenant


Tenant = Annotated[str | None, Depends(_tenant)]


def _user_error(fn):
    """``fn()``, its ``KvdriveError`` (a text the tokenizer refuses, no chat template) a 400."""
    try:
        return fn()
    except KvdriveError as err:
        raise APIError(400, str(err)) from None


async def _generate(
    state: ServerState, request: Request, body, ids, max_tokens: int | None, tenant: str | None, chat: bool
):
    llm = state.llm
    if isinstance(ids, tuple):  # llm.encode -> (text, ids)
        ids = ids[1]
    param = "messages" if chat else "prompt"
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param=param)
    vocab = llm.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param=param)
    limit = llm.max_model_len
    asked = len(ids) + (max_tokens or 1)
    if asked > limit:
        detail = f"{len(ids)} in the prompt" + (f", {max_tokens} in the completion" if max_tokens else "")
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested {asked} "
            f"tokens ({detail}). Please reduce the length of the prompt or the completion.",
            param=param if max_tokens is None or len(ids) >= limit else "max_tokens",
            code="context_length_exceeded",
        )
    try:
        params = SamplingParams(
            max_tokens=max_tokens or limit - len(ids),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stops,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
        )
    except KvdriveError as err:
        raise APIError(400, str(err)) from None
    req = llm.new_request(ids, params, tenant)
    req.use_prefix = body.use_prefix_cache
    try:
        stream = state.engine.submit(req)
    except QueueFull as err:
        raise APIError(429, str(err), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    shape = Shape(chat, state.name, body.include_usage, body.return_token_ids or llm.tokenizer is None)
    if body.stream:
        return sse_response(stream, request, shape)
    out = await json_response(stream, request, shape)
    return out if out is not None else JSONResponse({}, status_code=499)
