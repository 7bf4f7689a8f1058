"""``kvdrive bench serve``: its workloads and statistics, and one small run against a live server
(a tiny random decoder with SmolLM2's tokenizer) end to end, result file and plot included."""

import json

import pytest
from factories import live_server, vocab_sized_tiny_model

from kvdrive.bench.serving import client, workloads
from kvdrive.cli import main


def test_percentiles_and_summary():
    assert client.percentile([], 50) is None
    assert client.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and client.percentile([5.0], 99) == 5.0
    recs = [
        client.Record("doc0", True, 0.0, [1.0, 1.5, 2.5], 100, 3, 0),
        client.Record("doc0", False, 0.5, [0.9, 1.1], 100, 2, 64),
        client.Record("", True, 1.0, [], error="HTTP 429: full"),
    ]
    s = client.summarize(recs, 2.0)
    assert s["requests"] == 3 and s["errors"] == 1 and s["error_examples"] == ["HTTP 429: full"]
    assert s["output_tokens"] == 5 and s["output_tok_per_s"] == 2.5 and s["prefix_hit_rate"] == 64 / 200
    assert s["ttft_first_of_group_p50_s"] == 1.0 and s["ttft_later_of_group_p50_s"] == pytest.approx(0.4)
    assert s["itl_p50_s"] == pytest.approx(0.5)


def test_workloads_share_documents_and_arrive_as_poisson():
    prompts = workloads.Prompts(tokens=True, seed=0, nonce="abcd")
    items = workloads.shared_prefix(3, 4, 100, 8, prompts, seed=0)
    assert len(items) == 12 and sum(i.first for i in items) == 3
    by_doc = {}
    for i in items:
        by_doc.setdefault(i.group, []).append(i.prompt)
    assert all(len({tuple(p[:100]) for p in ps}) == 1 for ps in by_doc.values())  # one document, many questions
    times = workloads.arrivals(2000, rate=4.0, seed=1)
    assert times == sorted(times) and times[-1] / len(times) == pytest.approx(0.25, rel=0.1)
    other = workloads.Prompts(tokens=True, seed=0, nonce="ef01").body(50, "document 0")
    assert other[:8] != prompts.body(50, "document 0")[:8]  # another run's nonce: another prefix
    text = workloads.Prompts(tokens=False, seed=0, nonce="abcd").body(200, "document 1")
    assert text.startswith("[document 1 abcd]") and len(text) > 700


def test_a_small_run_against_a_live_server(smollm2, tmp_path):
    from kvdrive.engine.llm import LLM
    from kvdrive.models.loader import LoadedModel
    from kvdrive.prefix.pool import PrefixConfig
    from kvdrive.serve.config import resolve
    from kvdrive.serve.state import ServerState

    model = vocab_sized_tiny_model(smollm2.config.vocab_size)
    loaded = LoadedModel(model, model.config, smollm2.tokenizer, "tiny", True)
    state = ServerState(
        resolve(flags={"served_model_name": "tiny"}),
        load=lambda: LLM(
            loaded=loaded, max_model_len=1024, prefix_cache=PrefixConfig(host_bytes=16 << 20, chunk_tokens=32)
        ),
    )
    out = tmp_path / "serve.json"
    with live_server(state) as url:
        assert (
            main(
                [
                    "bench",
                    "serve",
                    "--url",
                    url,
                    "--docs",
                    "2",
                    "--questions",
                    "3",
                    "--doc-tokens",
                    "128",
                    "--random-prompts",
                    "3",
                    "--prompt-tokens",
                    "32",
                    "--max-tokens",
                    "4",
                    "--rate",
                    "20",
                    "--interference",
                    "300",
                    "--streams",
                    "2",
                    "--single-stream",
                    "8",
                    "--repeat-doc",
                    "128",
                    "--repeat-docs",
                    "2",
                    "--soak",
                    "3",
                    "--soak-clients",
                    "3",
                    "--soak-prompt-tokens",
                    "32",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
    doc = json.loads(out.read_text())
    r = doc["results"]["kvdrive"]
    assert doc["bench"] == "serve" and doc["config"]["nonce"] and out.with_suffix(".png").exists()
    for phase in ("shared_prefix/prefix_off", "shared_prefix/prefix_on", "random/prefix_off", "random/prefix_on"):
        assert r[phase]["errors"] == 0 and r[phase]["requests"] in (6, 3) and r[phase]["ttft_p50_s"] > 0
        assert r[phase]["output_tokens"] == 4 * r[phase]["requests"] and r[phase]["short_outputs"] == 0  # ignore_eos
    assert r["shared_prefix/prefix_off"]["cached_tokens"] == 0 and r["random/prefix_on"]["cached_tokens"] == 0
    assert r["shared_prefix/prefix_on"]["cached_tokens"] > 0  # later questions found their document stored
    inter = r["interference"]
    assert inter["long_error"] is None and inter["long_prompt_tokens"] > 200
    assert inter["gaps_after_long_prompt"] and all(g > 0 for _, g in inter["gaps_after_long_prompt"])
    assert inter["graph_captures_during"] == 0 and inter["graph_capture_s_during"] == 0  # no CUDA graphs on a CPU
    assert r["single_stream"]["tokens"] == 8 and r["single_stream"]["decode_tok_per_s"] > 0
    rd = r["repeat_doc"]
    assert rd["error_count"] == 0 and len(rd["ttft_cold_s"]) == 2 and len(rd["ttft_repeated_s"]) == 4
    assert all(share > 0.5 for share in rd["repeated_cached_share"])  # asked again: its document was stored
    soak = r["soak"]
    assert soak["errors"] == 0 and soak["requests"] >= 3 and soak["samples"] and soak["memory"]["rss"]["end"] > 0


def test_a_model_without_a_tokenizer_streams_token_ids(smollm2, tmp_path):
    """Random-weight models have no tokenizer: token prompts, and each streamed chunk carries its token id."""
    from kvdrive.engine.llm import LLM
    from kvdrive.models.loader import LoadedModel
    from kvdrive.serve.config import resolve
    from kvdrive.serve.state import ServerState

    model = vocab_sized_tiny_model(smollm2.config.vocab_size)
    loaded = LoadedModel(model, model.config, None, "tiny", True)
    state = ServerState(
        resolve(flags={"served_model_name": "tiny"}), load=lambda: LLM(loaded=loaded, max_model_len=256)
    )
    out = tmp_path / "serve.json"
    with live_server(state) as url:
        assert (
            main(
                [
                    "bench",
                    "serve",
                    "--url",
                    url,
                    "--token-prompts",
                    "--workloads",
                    "random",
                    "--random-prompts",
                    "3",
                    "--prompt-tokens",
                    "16",
                    "--max-tokens",
                    "5",
                    "--rate",
                    "20",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
    r = json.loads(out.read_text())["results"]["kvdrive"]["random/prefix_off"]
    assert r["errors"] == 0 and r["output_tokens"] == 15 and r["itl_p50_s"] > 0


def test_an_interference_run_alone_plots_the_gaps_over_time(tmp_path):
    """A result holding only --interference draws the streams' gaps against time, not empty bars."""
    from kvdrive.bench.serving.plot import plot

    inter = {
        "streams": 2,
        "long_prompt_tokens": 1000,
        "itl_p50_before_s": 0.01,
        "itl_p50_during_s": 0.012,
        "prefill_s": 1.5,
        "gaps_after_long_prompt": [[0.1 * i, 0.01 + 0.001 * (i % 3)] for i in range(20)],
    }
    path = plot({"kvdrive": {"interference": inter}}, str(tmp_path / "i.png"))
    from PIL import Image

    img = Image.open(path).convert("L")
    assert img.size[0] > 500 and len(set(img.getdata())) > 10  # points and lines, not a blank canvas


@pytest.mark.parametrize("listed", [[{"id": "served-name", "max_model_len": 512}], []])
def test_a_server_that_lists_no_model_is_asked_for_the_one_it_was_started_on(listed):
    """transformers serve lists only its hub cache's models at /v1/models; a directory it was
    started on is then named by its path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvdrive.bench.serving import servers
    from kvdrive.errors import KvdriveError

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": listed}).encode() if self.path == "/v1/models" else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        server = servers.Server("transformers", url)
        servers.wait_ready(server, 10, default_model="/models/r8b")
        assert server.model == ("served-name" if listed else "/models/r8b")
        assert server.max_model_len == (512 if listed else None)
        if not listed:
            with pytest.raises(KvdriveError, match="lists no model"):
                servers.wait_ready(servers.Server("kvdrive", url), 10)
    finally:
        httpd.shutdown()
