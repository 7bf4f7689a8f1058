import argparse
import dataclasses
import json

import pytest
import torch

from kvdrive.bench import decode, roofline
from kvdrive.bench.decode import report as decode_report
from kvdrive.bench.decode import sweep
from kvdrive.bench.decode.args import decode_tokens
from kvdrive.bench.decode.fill import fill_random
from kvdrive.bench.decode.points import Options, Shape
from kvdrive.bench.decode.systems import SYSTEMS
from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.models.loader import load_config

TINY = [
    "-m",
    "random:smollm2-135m",
    "--device",
    "cpu",
    "--contexts",
    "64",
    "--batches",
    "1",
    "2",
    "-n",
    "1",
    "--warmup",
    "1",
    "--host-headroom-gib",  # the rows need under 1 GiB; the default headroom (16) depends on what else runs
    "1",
    "--rebalance-after",
    "0",
    "--budget",
    "32",
    "--sink",
    "16",
    "--window",
    "16",
    "--group-tokens",
    "16",
    "--fill-chunk",
    "32",
    "--bw-mib",
    "8",
    "--hf-new-tokens",
    "2",
    "--breakdown-steps",
    "1",
]


def _args(*extra):
    p = argparse.ArgumentParser()
    decode.add_arguments(p)
    return p.parse_args([*TINY, *extra])


def test_roofline_bound_on_a_hand_computed_step():
    bw = roofline.Bandwidths(hbm=2e12, h2d=50e9, probe_bytes=1 << 20)
    # compute: (16e9 + 4e9) / 2e12 = 10 ms; transfer: 1e9 / 50e9 = 20 ms -> transfer-bound, 20 ms
    b = roofline.bound(4, roofline.StepBytes(weights=16_000_000_000, gpu_kv=4_000_000_000, pcie=1_000_000_000), bw)
    assert b.compute_ms == pytest.approx(10.0) and b.transfer_ms == pytest.approx(20.0)
    assert b.step_ms == pytest.approx(20.0) and b.limit == "transfer"
    assert b.tokens_per_s == pytest.approx(4 / 0.020)
    # nothing over PCIe: compute-bound
    c = roofline.bound(2, roofline.StepBytes(16_000_000_000, 4_000_000_000, 0), bw)
    assert c.limit == "compute" and c.tokens_per_s == pytest.approx(2 / 0.010)
    # bytes must cross PCIe but no H2D bandwidth was measured (CPU run): no bound
    assert roofline.bound(1, roofline.StepBytes(1, 1, 1), roofline.Bandwidths(1e9, None, 1)) is None


def test_roofline_disk_term_bounds_a_disk_backed_step(tmp_path):
    bw = roofline.Bandwidths(hbm=2e12, h2d=50e9, probe_bytes=1 << 20, disk=1e9)
    # compute 10 ms, transfer 20 ms, disk: 0.1e9 / 1e9 = 100 ms -> disk-bound
    b = roofline.bound(4, roofline.StepBytes(16_000_000_000, 4_000_000_000, 1_000_000_000, disk=100_000_000), bw)
    assert b.limit == "disk" and b.disk_ms == pytest.approx(100.0) and b.step_ms == pytest.approx(100.0)
    assert b.tokens_per_s == pytest.approx(4 / 0.100)
    assert bw.as_dict()["disk_read_gbps"] == 1.0
    # bytes came from disk but its bandwidth was not measured: no bound rather than a wrong one
    no_disk = roofline.Bandwidths(hbm=2e12, h2d=50e9, probe_bytes=1)
    assert roofline.bound(1, roofline.StepBytes(1, 1, 1, disk=1), no_disk) is None
    assert "disk_read_gbps" not in no_disk.as_dict()
    # the probe reads real slots from a real file and leaves nothing behind
    gbps, ms = roofline.measure_disk(str(tmp_path), 16 << 10, probe_bytes=4 << 20)
    assert gbps > 0 and ms > 0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_weight_bytes_skip_an_untied_input_embedding():
    m = torch.nn.Module()
    m.embed_tokens = torch.nn.Embedding(100, 8)  # 800 floats, read B rows per step
    m.lm_head = torch.nn.Linear(8, 100, bias=False)  # 800 floats, read whole
    m.layer = torch.nn.Linear(8, 8, bias=False)  # 64 floats
    assert roofline.weight_bytes_read(m) == (800 + 64) * 4
    m.lm_head.weight = m.embed_tokens.weight  # tied: the one tensor is read whole by the head
    assert roofline.weight_bytes_read(m) == (800 + 64) * 4
    del m.lm_head
    m.other = torch.nn.Linear(8, 8, bias=False)
    assert roofline.weight_bytes_read(m) == (800 + 64 + 64) * 4  # no lm_head: the embedding is the head


@pytest.mark.parametrize(
    "make",
    [
        lambda cfg: ContiguousKVCache(cfg, 2, 80, torch.device("cpu"), torch.float32),
        lambda cfg: SparseKVCache(cfg, 2, 80, torch.device("cpu"), torch.float32, SparseConfig(budget=32)),
    ],
)
def test_fill_random_gives_each_sequence_its_length_and_is_seeded(make):
    cfg = load_config("random:smollm2-135m")
    caches = []
    for _ in range(2):
        cache = make(cfg)
        for s in (0, 1):
            cache.add(s, 80)
        fill_random(cache, [0, 1], 70, cfg, torch.device("cpu"), torch.float32, chunk=32, seed=3)
        assert cache.length(0) == 70 and cache.length(1) == 70
        caches.append(cache)
    k0, _ = caches[0].export_kv(1, 5, 0, 70)
    k1, _ = caches[1].export_kv(1, 5, 0, 70)
    assert torch.equal(k0, k1) and k0.std() > 0.5  # same seed, same KV; not zeros


def test_fill_random_ends_each_prompt_so_no_prefill_stage_outlives_it():
    """The tiered cache keeps a prompt's KV on the GPU while it is prefilled; the fill ends
    each prompt as the engine does, so the decode that follows holds no stage (a stage of
    every sequence was 16 GiB each at 4 x 128K of the 8B shape)."""
    from kvdrive.tiered import TieredConfig, TieredSparseKVCache

    cfg = load_config("random:smollm2-135m")
    cache = TieredSparseKVCache(
        cfg, 2, 80, torch.device("cpu"), torch.float32, TieredConfig(SparseConfig(budget=32), cache_tokens=48)
    )
    for s in (0, 1):
        cache.add(s, 80)
    cache.plan([0], 32)
    assert cache.prefill.staged(0)  # a prompt in several chunks is staged while it is prefilled
    fill_random(cache, [0, 1], 70, cfg, torch.device("cpu"), torch.float32, chunk=32, seed=3)
    assert cache.length(1) == 70 and not cache.prefill.staged(0) and not cache.prefill.staged(1)


def test_bench_decode_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    args = _args(
        "--systems",
        "full_gpu",
        "full_gpu_paged",
        "kvdrive_host",
        "streaming",
        "hf_offload",
        "--batches",
        "2",
        "--control-stream",
        "-o",
        str(out),
    )
    assert decode.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["kvdrive_host"]["control_stream"] is True  # recorded; on a CPU (one part) it changes nothing
    assert doc["bench"] == "decode" and doc["command"]
    assert doc["config"]["sparse"]["budget_tokens"] == {"64": 32}
    assert set(doc["config"]["systems"]) == {"full_gpu", "full_gpu_paged", "kvdrive_host", "streaming", "hf_offload"}
    rows = doc["results"]["rows"]
    assert {(r["system"], r["batch"]) for r in rows} == {(s, 2) for s in doc["config"]["systems"]}
    for r in rows:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] != "ok":
            assert r["reason"]
            assert any(r["reason"] in n for n in doc["notes"])
    by = {(r["system"], r["batch"]): r for r in rows}
    for name in ("streaming", "hf_offload"):  # CUDA-only systems are skipped on CPU, with the reason
        assert by[name, 2]["status"] == "skipped" and "CUDA" in by[name, 2]["reason"]
    full = by["full_gpu", 2]
    assert full["status"] == "ok" and full["steps_timed"] == 1 and full["filled"] == 64 - 4
    assert full["tokens_per_s"] == pytest.approx(2 * 1e3 / full["step_ms"])  # batch 2, one step
    rl = full["roofline"]
    assert rl["pcie_bytes"] == 0 and rl["limit"] == "compute"
    assert rl["gpu_kv_bytes"] == 2 * load_config("random:smollm2-135m").kv_bytes_at(64, torch.float32)
    assert full["fraction_of_bound"] == pytest.approx(full["tokens_per_s"] / rl["tokens_per_s"])
    paged = by["full_gpu_paged", 2]  # the same bound: the pages hold the same KV
    assert paged["status"] == "ok" and paged["roofline"]["gpu_kv_bytes"] == rl["gpu_kv_bytes"]
    r = by["kvdrive_host", 2]
    assert r["status"] == "ok", r.get("reason")
    # attention reads the 32-token budget of each of 30 layers and the minmax summary of each of 4 groups:
    # smollm2 fp32 keeps 2 x 3 heads x 64 x 4 bytes per token and layer, a summary is as large
    assert r["roofline"]["gpu_kv_bytes"] == 2 * 30 * 1536 * (32 + 4)
    # stats of the timed steps only, turned into rates and bytes per step
    assert r["stats"]["steps"] == 1 and r["stats"]["groups_selected"] > 0
    assert 0 <= r["per_step"]["gpu_hits_rate"] <= 1
    assert r["per_step"]["bytes_host_to_gpu_per_step"] == r["roofline"]["pcie_bytes"]
    assert {"select", "attention"} <= set(r["per_step"]["time_ms_per_step"])  # the profiled extra step
    assert doc["results"]["bandwidths"]["hbm_gbps"] > 0 and doc["results"]["bandwidths"]["h2d_gbps"] is None
    assert doc["results"]["best"]["64"]["full_gpu"]["batch"] == 2
    assert out.with_suffix(".png").exists()
    assert doc["config"]["decode_tokens"] == "random"  # random weights: the default feeds seeded random tokens
    assert any("seeded random token" in n for n in doc["notes"])


def test_decode_tokens_random_ignore_the_logits_and_repeat_per_row():
    """--decode-tokens random: every row (system) is fed the same tokens, whatever its logits say;
    greedy feeds the argmax; auto picks random only for random weights without --text."""
    args = _args()
    assert decode_tokens(args, random_weights=True) == "random"
    assert decode_tokens(args, random_weights=False) == "greedy"
    assert decode_tokens(_args("--decode-tokens", "greedy"), random_weights=True) == "greedy"
    args.feed = "random"
    logits = [torch.randn(3, 50), torch.randn(3, 50)]
    feed_a, feed_b = (sweep._feeder(args, 50, 3, torch.device("cpu")) for _ in range(2))
    a = [feed_a(x) for x in logits]
    b = [feed_b(-x) for x in logits]  # another system, other logits: the same tokens
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[0].shape == (3, 1)
    assert not torch.equal(a[0], a[1])  # a new token each step
    args.feed = "greedy"
    assert torch.equal(sweep._feeder(args, 50, 3, torch.device("cpu"))(logits[0]), logits[0].argmax(-1, keepdim=True))


def test_bench_decode_ssd_row_on_cpu_writes_under_the_disk_dir_and_cleans_up(tmp_path):
    out, disk = tmp_path / "decode.json", tmp_path / "disk"
    args = _args(
        "--systems",
        "kvdrive_ssd",
        "kvswap_ssd",
        "--batches",
        "1",
        "--disk",
        str(disk),
        "--ssd-host-gib",
        "0.01",
        "--no-plot",
        "-o",
        str(out),
    )
    assert decode.run(args) == 0
    doc = json.loads(out.read_text())
    for row in doc["results"]["rows"]:
        assert row["status"] == "ok", row.get("reason")
        assert row["stats"]["disk_bytes"] > 0  # every full group is written behind to disk (counters cover
        # only the timed steps, the pool's bytes in use cover the fill)
    kvswap = doc["results"]["rows"][1]["stats"]["capacity_per_layer"]
    assert max(kvswap.values()) < min(doc["results"]["rows"][0]["stats"]["capacity_per_layer"].values())
    assert [(r["system"], r["vs"]) for r in doc["results"]["ratios"]] == [("kvdrive_ssd", "kvswap_ssd")]
    assert doc["config"]["kvdrive_ssd"]["host_arena_gib"] == 0.01
    bw = doc["results"]["bandwidths"]  # the disk term's probe ran on the --disk path
    assert bw["disk_read_gbps"] > 0 and bw["disk_read_latency_ms"] > 0
    assert not (disk / "kvdrive-bench-decode").exists()
    assert not [p for p in disk.rglob("*") if p.is_file() and not p.name.startswith(".kvdrive-probe")]


def test_rows_a_system_cannot_hold_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "decode.json"
    # 10 TB of host headroom: nothing fits, nothing runs, the run still writes its JSON; a context of
    # 2 tokens leaves no room for the 4 decode steps
    args = _args(
        "--contexts",
        "2",
        "64",
        "--systems",
        "full_gpu",
        "sparse_gpu",
        "--host-headroom-gib",
        "1e4",
        "--no-plot",
        "-o",
        str(out),
    )
    assert decode.run(args) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    assert len(rows) == 8 and all(r["status"] == "skipped" for r in rows)
    assert all("no room" in r["reason"] for r in rows if r["context"] == 2)
    assert all("host memory" in r["reason"] for r in rows if r["context"] == 64)


def test_bench_decode_runs_each_tiered_system_once_per_storage_format(tmp_path):
    """``--kv-dtype bf16 fp8 int4``: the tiered systems run once per format in the same process, the
    others once; rows carry the format, the host tier holds the stored bytes, ratios compare each
    format with bf16."""
    out, disk = tmp_path / "decode.json", tmp_path / "disk"
    args = _args(
        "--systems",
        "full_gpu",
        "kvdrive_host",
        "kvdrive_ssd",
        "--batches",
        "1",
        "--kv-dtype",
        "bf16",
        "fp8",
        "int4",
        "--disk",
        str(disk),
        "--ssd-host-gib",
        "0.01",
        "--no-plot",
        "-o",
        str(out),
    )
    assert decode.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["kv_dtypes"] == ["bf16", "fp8", "int4"]
    rows = doc["results"]["rows"]
    assert [(r["system"], r.get("kv_dtype")) for r in rows] == [
        ("full_gpu", None),
        *[(s, f) for s in ("kvdrive_host", "kvdrive_ssd") for f in ("bf16", "fp8", "int4")],
    ]
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
    host = {r["kv_dtype"]: r for r in rows if r["system"] == "kvdrive_host"}
    assert {f: r["stats"]["kv_dtype"] for f, r in host.items()} == {f: f for f in host}
    assert (
        host["bf16"]["stats"]["host_bytes"] > host["fp8"]["stats"]["host_bytes"] > host["int4"]["stats"]["host_bytes"]
    )
    r = {(x["system"], x.get("kv_dtype"), x["vs"]): x for x in doc["results"]["ratios"]}
    for s in ("kvdrive_host", "kvdrive_ssd"):
        for f in ("fp8", "int4"):
            assert r[s, f, s]["vs_kv_dtype"] == "bf16" and r[s, f, s]["ratio"] > 0
    assert ("kvdrive_ssd", None, "kvdrive_host") in r and ("kvdrive_host", None, "full_gpu") in r  # bf16 rows as before
    assert doc["results"]["best"]["64"]["kvdrive_host@fp8"]["batch"] == 1


def test_ratios_compare_each_system_at_its_best_batch():
    rows = [
        {"system": s, "context": 1024, "batch": b, "status": "ok", "tokens_per_s": t}
        for s, b, t in [
            ("kvdrive_host", 1, 10.0),
            ("kvdrive_host", 4, 35.0),
            ("sparse_host", 1, 8.0),
            ("sparse_host", 4, 20.0),
            ("streaming", 2, 5.0),
            ("kvdrive_ssd", 2, 28.0),
        ]
    ]
    rows.append({"system": "streaming", "context": 1024, "batch": 4, "status": "skipped", "reason": "host memory"})
    best, ratios = decode_report.best_and_ratios(rows)
    assert best["1024"]["kvdrive_host"] == {"tokens_per_s": 35.0, "batch": 4}
    r = {(x["system"], x["vs"]): x for x in ratios}
    assert set(r) == {("kvdrive_host", "sparse_host"), ("kvdrive_host", "streaming"), ("kvdrive_ssd", "kvdrive_host")}
    assert r["kvdrive_host", "sparse_host"]["ratio"] == pytest.approx(35 / 20)
    assert r["kvdrive_host", "sparse_host"]["target"] == 1.74
    assert (
        r["kvdrive_host", "streaming"]["ratio"] == pytest.approx(7.0) and "target" not in r["kvdrive_host", "streaming"]
    )
    assert r["kvdrive_ssd", "kvdrive_host"]["ratio"] == pytest.approx(28 / 35)
    assert r["kvdrive_ssd", "kvdrive_host"]["target"] == 0.70


def test_every_system_estimates_memory_and_traffic():
    cfg = load_config("random:llama-3.1-8b")
    opts = Options(
        SparseConfig(budget=2048, sink_tokens=64, window_tokens=256, summary="minmax"), 4096, "lookahead", True, True
    )
    shape = Shape(cfg, torch.bfloat16, 4, 131072, 40)
    gib = 1 << 30
    assert shape.all_kv == 4 * 16 * gib  # 128 KiB per token
    full, sparse = SYSTEMS["full_gpu"], SYSTEMS["kvdrive_host"]
    assert full.gpu_bytes(shape, opts) == 64 * gib and full.host_bytes(shape, opts) == 0
    assert sparse.host_bytes(shape, opts) == 64 * gib
    fp8 = dataclasses.replace(opts, kv_dtype="fp8")  # stored rows: 0.566 of bf16's at G = 16, not rounded up
    assert sparse.host_bytes(shape, fp8) == 4 * 131072 // 16 * 32 * 37120
    assert sparse.gpu_bytes(shape, opts) < 8 * gib
    # attention reads 2048 tokens of KV per global layer plus the summaries (1/16 of the keys and values)
    assert sparse.gpu_kv_read(shape, opts) == 4 * 2048 * 128 * 1024 + shape.all_kv // 16
    token = Options(
        SparseConfig(budget=2048, sink_tokens=64, window_tokens=256, summary="tokenmax"), 4096, "lookahead", True, True
    )
    assert sparse.gpu_kv_read(shape, token) == 4 * 2048 * 128 * 1024 + shape.all_kv // 8  # D/2 bytes a token and head
    assert SYSTEMS["streaming"].pcie == "all_kv" and full.pcie == "none" and sparse.pcie == "measured"


def _row(system, batch, tps, status="ok"):
    r = {"system": system, "context": 1024, "batch": batch, "status": status}
    return {**r, "tokens_per_s": tps, "roofline": {}} if status == "ok" else {**r, "reason": "host memory"}


def test_merge_combines_split_runs_later_rows_win(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    decode_report.save(
        a,
        {"model": "m"},
        {"hbm_gbps": 1.0},
        [_row("sparse_host", 1, 10.0), _row("kvdrive_host", 1, 0.0, "skipped")],
        ["n1"],
    )
    decode_report.save(b, {"model": "m"}, {"hbm_gbps": 2.0}, [_row("kvdrive_host", 1, 20.0)], ["n2"])
    doc = json.loads(decode_report.merge([str(a), str(b)], out).read_text())
    rows = {r["system"]: r for r in doc["results"]["rows"]}
    assert len(rows) == 2 and rows["kvdrive_host"]["status"] == "ok" and rows["kvdrive_host"]["from"] == str(b)
    (ratio,) = doc["results"]["ratios"]
    assert ratio["ratio"] == pytest.approx(2.0)
    assert doc["notes"] == ["n1"]  # the first run's notes; its skipped row was measured by the second
    assert set(doc["config"]["merged_from"]) == {str(a), str(b)}


def test_merge_keeps_each_sources_environment(tmp_path):
    """A merge records where each run ran (its GPU, commit), not the merging machine."""
    a, b, ab, out = (tmp_path / f"{n}.json" for n in ("a", "b", "ab", "all"))
    for path, gpu in ((a, "GPU A"), (b, "GPU B")):
        decode_report.save(path, {"model": "m"}, {}, [_row("sparse_host", 1, 10.0)], [])
        doc = json.loads(path.read_text())
        doc["environment"] = {**doc["environment"], "gpu": gpu, "commit": gpu.lower()}
        path.write_text(json.dumps(doc))
    decode_report.merge([str(a)], ab)
    doc = json.loads(decode_report.merge([str(ab), str(b)], out).read_text())  # a merged input brings its sources
    assert [s["environment"]["gpu"] for s in doc["sources"]] == ["GPU A", "GPU B"]
    assert [s["path"] for s in doc["sources"]] == [str(a), str(b)]
    assert doc["environment"]["gpu"] == "GPU A" and doc["environment"]["commit"] == "gpu a"


def test_fill_text_prefills_real_prose_in_chunks(smollm2):
    """--text: each sequence gets its own window of prose, prefilled in chunks through the cache;
    the next token returned is the model's greedy choice after the whole window."""
    import random

    from kvdrive.bench.decode.fill import fill_text
    from kvdrive.cache.contiguous import ContiguousKVCache
    from kvdrive.cache.sparse import SparseConfig
    from kvdrive.eval.corpus import TokenHaystack, load_text
    from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

    model, cpu = smollm2.model, torch.device("cpu")
    hay = TokenHaystack(smollm2.tokenizer, load_text("persuasion-excerpt").text)
    cfg = TieredConfig(SparseConfig(budget=10_000), cache_tokens=64)
    cache = TieredSparseKVCache(smollm2.config, 2, 256, cpu, torch.float32, cfg)
    for s in (0, 1):
        cache.add(s, 256)
    first = fill_text(model, cache, [0, 1], 150, hay, chunk=50, seed=3)
    assert first.shape == (2, 1) and [cache.length(s) for s in (0, 1)] == [150, 150]
    assert cache.stats()["bytes_warm_start"] > 0  # each prompt's selection placed, as the engine does
    rng = random.Random(3)
    windows = [hay.sample(150, rng) for _ in range(2)]
    assert windows[0] != windows[1]
    for s, ids in enumerate(windows):
        plain = ContiguousKVCache(smollm2.config, 1, 256, cpu, torch.float32)
        plain.add(0, 256)
        batch = plain.plan([0], 150)
        assert model(torch.tensor([ids]), plain, batch).argmax(-1).item() == first[s, 0].item()
        plain.commit(batch)
        k, _ = cache.export_kv(s, 3, 0, 150)
        k_ref, _ = plain.export_kv(0, 3, 0, 150)
        torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-4)
