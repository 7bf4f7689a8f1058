"""The server under a bounded property-based fuzz of its own OpenAPI schema (schemathesis): no
input is a 5xx. A tiny random decoder with SmolLM2's tokenizer keeps each generation short.
And the 503 the server answers while its model loads."""

import asyncio
import threading

import httpx
import pytest
import schemathesis
from factories import vocab_sized_tiny_model
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from kvdrive.engine.llm import LLM
from kvdrive.models.loader import LoadedModel
from kvdrive.serve.app import create_app
from kvdrive.serve.config import resolve
from kvdrive.serve.state import ServerState

NAME = "tiny"


def tiny_llm(smollm2, max_model_len=96):
    model = vocab_sized_tiny_model(smollm2.config.vocab_size)
    return LLM(
        loaded=LoadedModel(model, model.config, smollm2.tokenizer, "tiny (random weights)", True),
        max_model_len=max_model_len,
    )


# The app exists at import (schemathesis reads its schema then); its model loads in the fixture.
_SHARED: dict = {}
STATE = ServerState(
    resolve(flags={"served_model_name": NAME, "max_num_seqs": 4, "max_waiting": 64}),
    load=lambda: tiny_llm(_SHARED["smollm2"]),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(STATE, own_state=False))


@pytest.fixture(scope="module")
def fuzz_server(smollm2):
    _SHARED["smollm2"] = smollm2
    STATE.start()
    assert STATE.wait_loaded(120), STATE.load_error
    yield
    STATE.close()


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_is_a_server_error(case, fuzz_server):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = NAME  # past the 404: the body reaches the engine
    # Bodies the schema allows may still be a 400 (an empty prompt, one over the context, logprobs): not
    # "positive data rejected"; every other check runs, not_a_server_error among them.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


def test_the_server_answers_503_while_the_model_loads(smollm2):
    release = threading.Event()

    def load():
        release.wait(60)
        return tiny_llm(smollm2)

    state = ServerState(resolve(flags={"served_model_name": NAME}), load=load)
    state.start()

    async def ask():
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://kvdrive") as c:
            body = {"model": NAME, "prompt": "hi", "max_tokens": 2}
            loading = await c.get("/health"), await c.post("/v1/completions", json=body)
            release.set()
            await asyncio.to_thread(state.wait_loaded, 60)
            return loading, await c.get("/health"), await c.post("/v1/completions", json=body)

    try:
        (health, completion), health_after, completion_after = asyncio.run(ask())
    finally:
        release.set()
        state.close()
    for r in (health, completion):
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "model_loading"
    assert health_after.status_code == 200 and completion_after.status_code == 200
    assert completion_after.json()["usage"]["completion_tokens"] >= 1


def test_a_model_that_fails_to_load_is_reported(smollm2):
    def load():
        raise RuntimeError("no such weights")

    state = ServerState(resolve(), load=load)
    state.start()
    assert not state.wait_loaded(30)
    transport = httpx.ASGITransport(app=create_app(state))

    async def ask():
        async with httpx.AsyncClient(transport=transport, base_url="http://kvdrive") as c:
            return await c.get("/health")

    r = asyncio.run(ask())
    assert r.status_code == 503 and "no such weights" in r.json()["error"]["message"]
    state.close()
