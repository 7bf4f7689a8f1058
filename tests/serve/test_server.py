"""``kvdrive serve`` end to end: a real uvicorn server on 127.0.0.1 with SmolLM2 on CPU, a host
prefix pool and two API keys, talked to with the official openai client (and httpx for bodies
the client would not send). One server for the module; prompts short, outputs a few tokens."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from factories import live_server
from prometheus_client.parser import text_string_to_metric_families

from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.prefix.pool import PrefixConfig
from kvdrive.serve.config import resolve
from kvdrive.serve.state import ServerState

KEY_A, KEY_B = "key-a", "key-b"
MAX_LEN = 512
MAX_SEQS = 16
MAX_WAITING = 4
CHUNK = 64  # prefix pool chunk tokens
LONG = " ".join(f"Line {i}: the tide came in over the grey stones of Lyme." for i in range(16))  # ~250 tokens
PROMPTS = [f"Question {i}: name a colour that starts with the letter {c}." for i, c in enumerate("BGRPOWYSCMTLVNAK")]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the server's engine and the tests' reference LLM share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(smollm2, one_thread):
    cfg = resolve(
        flags={
            "max_model_len": MAX_LEN,
            "max_num_seqs": MAX_SEQS,
            "max_waiting": MAX_WAITING,
            "api_key": (KEY_A, KEY_B),
            "max_num_batched_tokens": 256,
        }
    )
    prefix = PrefixConfig(host_bytes=96 << 20, chunk_tokens=CHUNK)
    state = ServerState(cfg, load=lambda: LLM(loaded=smollm2, max_model_len=MAX_LEN, prefix_cache=prefix))
    with live_server(state) as url:
        yield url, state


@pytest.fixture(scope="module")
def reference(smollm2, one_thread):
    """``LLM.generate`` on the same weights, without a prefix pool."""
    with LLM(loaded=smollm2, max_model_len=MAX_LEN) as llm:
        yield llm


def client(server, key=KEY_A, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def metrics(server) -> dict[str, float]:
    """/metrics parsed by prometheus_client's parser: sample name (+ tier label) -> value."""
    text = httpx.get(server[0] + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + (f"[{s.labels['tier']}]" if "tier" in s.labels else "")] = s.value
    return out


def wait_for(check, timeout=60.0):
    """Poll ``check()`` until it is true (the engine thread publishes between steps)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- outputs ---------------------------------------------------------------------------------


def test_completion_and_chat_stream_and_not_equal_llm_generate(server, reference):
    c = client(server)
    prompt = "The history of the printing press begins"
    want = reference.generate([prompt], greedy(10))[0]
    out = c.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(want.prompt_token_ids) and out.usage.completion_tokens == 10
    chunks = list(c.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text and chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = reference.chat(messages, greedy(12))
    out = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want.text and "Paris" in want.text
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == len(want.token_ids)
    chunks = list(
        c.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [m.id for m in c.models.list().data] == ["smollm2"]


def test_sixteen_concurrent_streams_each_equal_their_run_alone(server, reference):
    c = client(server)

    def stream(prompt):
        chunks = list(
            c.completions.create(
                model="smollm2",
                prompt=prompt,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

    before = metrics(server)["kvdrive:generation_tokens_total"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(stream, PROMPTS))
    for prompt, (text, n) in zip(PROMPTS, outs):
        want = reference.generate([prompt], greedy(8))[0]
        assert text == want.text and n == len(want.token_ids)
    # counted before the last event went out
    assert metrics(server)["kvdrive:generation_tokens_total"] - before == sum(n for _, n in outs)


def test_a_client_that_disconnects_mid_stream_frees_its_kv(server):
    before = metrics(server)
    stream = client(server).completions.create(
        model="smollm2",
        prompt="Tell me a long story about a lighthouse.",
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = [next(stream) for _ in range(3)]
    assert len(got) == 3
    wait_for(lambda: metrics(server)["kvdrive:kv_cache_used_bytes[gpu]"] > 0)
    stream.close()  # the connection goes, mid-stream
    wait_for(
        lambda: (
            (m := metrics(server))["kvdrive:num_requests_running"] == 0 and m["kvdrive:kv_cache_used_bytes[gpu]"] == 0
        )
    )
    after = metrics(server)
    assert after["kvdrive:generation_tokens_total"] - before["kvdrive:generation_tokens_total"] < 400


def test_a_repeated_long_prompt_reports_cached_tokens_and_the_same_output(server, reference):
    c = client(server)
    prompt = "Story A. " + LONG
    first = c.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    second = c.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 3 * CHUNK and cached % CHUNK == 0 and cached < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text == reference.generate([prompt], greedy(6))[0].text
    m = metrics(server)
    assert m["kvdrive:prefix_cache_hits_total"] >= cached and m["kvdrive:prefix_cache_queries_total"] > cached


def test_an_fp8_prefix_pool_set_by_prefix_kv_dtype_serves_a_repeated_prompt_from_fp8_chunks(smollm2, one_thread):
    cfg = resolve(
        flags={
            "max_model_len": MAX_LEN,
            "prefix_host_gib": 0.0625,
            "prefix_chunk_tokens": CHUNK,
            "prefix_kv_dtype": "fp8",
        }
    )
    state = ServerState(cfg, load=lambda: LLM(loaded=smollm2, max_model_len=MAX_LEN, prefix_cache=cfg.prefix.config()))
    with live_server(state) as url:
        assert state.llm.prefix.layout.kv_dtype == "fp8"
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        prompt = "Story F. " + LONG
        first = c.completions.create(model="smollm2", prompt=prompt, max_tokens=2, temperature=0)
        second = c.completions.create(model="smollm2", prompt=prompt, max_tokens=2, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 3 * CHUNK and cached % CHUNK == 0
        m = smollm2.config
        fp32_bytes = cached * m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * 4
        assert 0 < metrics((url,))["kvdrive:prefix_pool_bytes_loaded_total"] < fp32_bytes / 3  # fp8 payload + scales


def test_one_tenants_prefix_is_not_a_hit_for_another(server):
    prompt = "Story B. " + LONG

    def cached(key, tenant=None):
        c = client(server, key, default_headers={"X-Tenant": tenant} if tenant else None)
        return c.completions.create(
            model="smollm2", prompt=prompt, max_tokens=1
        ).usage.prompt_tokens_details.cached_tokens

    assert cached(KEY_A) == 0 and cached(KEY_A) > 0  # key A stored it, and hits it
    assert cached(KEY_B) == 0 and cached(KEY_B) > 0  # another key: its own tenant
    assert cached(KEY_A, "team-1") == 0  # a key's X-Tenant divides its tenant further
    off = client(server).completions.create(
        model="smollm2", prompt=prompt, max_tokens=1, extra_body={"kvdrive": {"prefix_cache": False}}
    )
    assert off.usage.prompt_tokens_details.cached_tokens == 0


def test_return_token_ids_streams_one_chunk_per_token(server, reference):
    prompt = "The lighthouse keeper wrote in his log"
    want = reference.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    chunks = list(
        client(server).completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    )
    ids = [choice.model_extra["token_ids"] for ch in chunks for choice in ch.choices]
    assert [i for i in ids if i] == [[t] for t in want.token_ids]  # one chunk per token, the finish may add none
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    whole = client(server).completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert whole.choices[0].model_extra["token_ids"] == list(want.token_ids)


# -- bad input ---------------------------------------------------------------------------------

TOO_LONG = "word " * (MAX_LEN + 50)
BAD = [
    ("malformed JSON", b'{"model": "smollm2", "prompt": ', 400, None),
    ("wrong type", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("unknown field", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("temperature -1", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top_p 0", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p 2", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -1", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens over the context", {"prompt": "hi", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty token list", {"prompt": []}, 400, "prompt"),
    ("token id out of range", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("prompt over the context", {"prompt": TOO_LONG}, 400, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n 2", {"prompt": "hi", "n": 2}, 400, None),
    ("unknown model", {"prompt": "hi", "model": "gpt-5"}, 404, "model"),
    ("empty stop string", {"prompt": "hi", "stop": [""]}, 400, None),
    ("bad chat role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("no messages", {"messages": []}, 400, "messages"),
    ("chat temperature -1", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    (
        "chat max_tokens over the context",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_LEN},
        400,
        "max_tokens",
    ),
    ("kvdrive option of the wrong type", {"prompt": "hi", "kvdrive": {"prefix_cache": "yes"}}, 400, "prefix_cache"),
    ("unknown kvdrive option", {"prompt": "hi", "kvdrive": {"budget": 5}}, 400, "budget"),
]


@pytest.mark.parametrize("what, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_shaped_4xx_and_the_server_keeps_serving(server, what, body, status, param):
    route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps({"model": "smollm2", "max_tokens": 2, **body})
    r = httpx.post(
        server[0] + route,
        content=content,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param or param in err["message"], err
    if "context" in what:
        assert err["code"] == "context_length_exceeded"
    assert client(server).completions.create(model="smollm2", prompt="Hello", max_tokens=1).choices[0].text is not None


def test_a_wrong_or_missing_api_key_is_a_401(server):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(server, key="key-c").completions.create(model="smollm2", prompt="hi", max_tokens=1)
    r = httpx.get(server[0] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/health").status_code == 200  # health and metrics need no key
    assert client(server).completions.create(model="smollm2", prompt="Hello", max_tokens=1).usage.completion_tokens == 1


def test_a_full_queue_is_a_429_with_retry_after(server):
    """Every sequence slot busy and the wait queue full: the next request is refused, not queued."""
    done = threading.Event()

    def hold(i):
        body = {
            "model": "smollm2",
            "prompt": f"Count to a thousand, slowly, number {i}:",
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST", server[0] + "/v1/completions", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY_A}"}
        ) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                if done.is_set():
                    return

    pool = ThreadPoolExecutor(MAX_SEQS + MAX_WAITING)
    try:
        for i in range(MAX_SEQS + MAX_WAITING):
            pool.submit(hold, i)
        wait_for(
            lambda: (
                metrics(server)["kvdrive:num_requests_running"] == MAX_SEQS
                and server[1].engine.num_waiting == MAX_WAITING
            ),
            timeout=90,
        )
        with pytest.raises(openai.RateLimitError) as err:
            client(server).completions.create(model="smollm2", prompt="one more", max_tokens=1)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "rate_limit_exceeded"
    finally:
        done.set()
        pool.shutdown(wait=True)
    wait_for(
        lambda: (
            (m := metrics(server))["kvdrive:num_requests_running"] == 0
            and m["kvdrive:num_requests_waiting"] == 0
            and m["kvdrive:kv_cache_used_bytes[gpu]"] == 0
        )
    )
    assert client(server).completions.create(model="smollm2", prompt="Hello", max_tokens=1).usage.completion_tokens == 1


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_parse_and_their_counters_move(server):
    before = metrics(server)
    client(server).completions.create(
        model="smollm2", prompt="Metrics test: one two three", max_tokens=3, extra_body={"ignore_eos": True}
    )
    wait_for(
        lambda: metrics(server)["kvdrive:generation_tokens_total"] >= before["kvdrive:generation_tokens_total"] + 3
    )
    after = metrics(server)
    for name in (
        "kvdrive:prompt_tokens_total",
        "kvdrive:time_to_first_token_seconds_count",
        "kvdrive:inter_token_latency_seconds_count",
        "kvdrive:e2e_request_latency_seconds_count",
    ):
        assert after[name] > before.get(name, 0), name
    assert after["kvdrive:kv_cache_capacity_bytes[gpu]"] > 0 and after["kvdrive:prefix_pool_capacity_bytes[host]"] > 0
    for name in (
        "kvdrive:num_requests_running",
        "kvdrive:num_requests_waiting",
        "kvdrive:kv_cache_usage_perc",
        "kvdrive:prefix_cache_queries_total",
        "kvdrive:prefix_cache_hits_total",
        "kvdrive:kv_bytes_host_to_gpu_total",
        "kvdrive:kv_bytes_disk_read_total",
        "kvdrive:gpu_selection_cache_hit_rate",
        "kvdrive:selections_deferred_total",
        "kvdrive:kv_reads_failed_total",
        "kvdrive:prefix_pool_chunks_corrupt_total",
    ):
        assert name in after, name
