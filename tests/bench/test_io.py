import argparse
import json

from kvdrive.bench import io


def test_bench_io_runs_tiny_on_cpu(tmp_path, capsys):
    p = argparse.ArgumentParser()
    io.add_arguments(p)
    out = tmp_path / "io.json"
    args = p.parse_args(["--tiny", "--dir", str(tmp_path), "-o", str(out)])
    assert io.run(args) == 0
    doc = json.loads(out.read_text())
    r = doc["results"]
    assert r["b_disk"]["raw"]["seq_read_gbps"] > 0
    depth = r["b_disk"]["kvdrive"]["depths"]["4"]
    assert depth["pool_read_gbps"] > 0 and depth["pool_read_to_gbps"] > 0
    assert r["b_disk"]["kvdrive"]["write_gbps"] > 0
    assert r["c_pool_two_paths"]["kvdrive"]["paths"][0].endswith("kvdrive-pool-0")
    assert any("skipped" in n or "CUDA" in n for n in doc["notes"]) or "memcpy_h2d_gbps" in r["a_host_gpu"]
    assert "(b) raw seq read" in capsys.readouterr().out


def test_the_compressed_fetch_timings_cover_every_format_on_cpu(monkeypatch):
    """The fetch section's three ways (in place, on a quarter of the SMs, staged) on CPU tensors:
    the torch twins stand in for the kernels, pinning is a no-op, the GPU reports 132 SMs."""
    import torch

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: argparse.Namespace(multi_processor_count=132)
    )
    layout = io._llama_layout(16)
    out = io._fetch_formats(layout, 8, 1, torch.device("cpu"))
    assert out.pop("looped_programs") == 33
    assert sorted(out) == ["fp8", "int4", "int8"]
    assert out["fp8"]["bytes_over_bf16"] == out["int8"]["bytes_over_bf16"] == round(37120 / layout.group_bytes, 3)
    assert out["int4"]["stored_bytes"] == 20992
    for row in out.values():
        assert all(row[f"{way}_gbps"] > 0 and row[f"{way}_groups_per_s"] > 0 for way in ("direct", "looped", "staged"))
