"""A request's events as an OpenAI response: one JSON body, or server-sent events.

A request submitted to the engine is read to its end, or until the client goes away: a
disconnect (noticed while the body waits, or when a streamed chunk cannot be sent) aborts
the request, and the engine frees its KV before its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvdrive.engine.async_engine import RequestStream
from kvdrive.serve.errors import APIError, error_body


class Shape:
    """The envelope of one response: completion (``text_completion``) or chat (``chat.completion``)."""

    def __init__(self, chat: bool, model: str, include_usage: bool, token_ids: bool = False):
        # token_ids: every choice carries its token ids, and a stream sends one chunk per token
        self.chat, self.model, self.include_usage, self.token_ids = chat, model, include_usage, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, kind: str, **fields) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def body(self, stream: RequestStream) -> dict:
        r = stream.req
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
        if self.token_ids:
            choice["token_ids"] = list(r.output_ids)
        if self.chat:
            return self.envelope("chat.completion", choices=[choice], usage=usage(stream))
        return self.envelope("text_completion", choices=[choice], usage=usage(stream))

    def chunk(self, text: str | None, finish_reason: str | None, first: bool = False, token_id: int = -1) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            out = self.envelope("chat.completion.chunk", choices=[choice])
        else:
            out = self.envelope(
                "text_completion",
                choices=[{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}],
            )
        if self.token_ids and not first:
            out["choices"][0]["token_ids"] = [token_id] if token_id >= 0 else []
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, stream: RequestStream) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self.envelope(kind, choices=[], usage=usage(stream))


def usage(stream: RequestStream) -> dict:
    r = stream.req
    prompt, completion = len(r.prompt_ids), len(r.output_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body is already read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_response(stream: RequestStream, request: Request, shape: Shape) -> JSONResponse | None:
    """Read ``stream`` to its end and answer one body; a client that leaves first aborts it."""

    async def drain():
        async for _ in stream:
            pass

    done, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not done.done():
            stream.abort()
            done.cancel()
        gone.cancel()
    if not done.done() or done.cancelled():
        return None  # nobody to answer
    req = stream.req
    if req.finish_reason == "error":
        raise APIError(500, f"the request failed: {req.error}")
    return JSONResponse(shape.body(stream))


def sse_response(stream: RequestStream, request: Request, shape: Shape) -> StreamingResponse:
    return StreamingResponse(
        _events(stream, request, shape), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _events(stream: RequestStream, request: Request, shape: Shape) -> AsyncIterator[str]:
    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def abort_when_gone():
        await until_disconnected(request)
        stream.abort()

    watcher = asyncio.ensure_future(abort_when_gone())
    try:
        if shape.chat:
            yield sse(shape.chunk(None, None, first=True))
        async for event in stream:
            if event.finish_reason == "error":
                yield sse(error_body(500, f"the request failed: {stream.req.error}"))
                break
            if event.text_delta or event.finish_reason is not None or (shape.token_ids and event.token_id >= 0):
                yield sse(shape.chunk(event.text_delta, event.finish_reason, token_id=event.token_id))
        else:
            if stream.req.finish_reason == "abort":
                return  # the client went away (or the server is shutting down)
            if shape.include_usage:
                yield sse(shape.usage_chunk(stream))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        stream.abort()  # a no-op once the stream ended
