"""``kvdrive serve``'s settings: file < environment < flags, one name everywhere, each value
checked where it is read; --print-config shows the resolved settings and their sources."""

from pathlib import Path

import pytest

from kvdrive.cli import main
from kvdrive.errors import KvdriveError
from kvdrive.serve.config import read_file, resolve
from kvdrive.serve.settings import BY_NAME, SETTINGS


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path):
    path = tmp_path / "kvdrive.yaml"
    path.write_text("port: 7000\nmax_num_seqs: 4\nbudget: 2048\ndisk: [/a, /b]\nhost_gib: 8\napi_key: [k1]\n")
    cfg = resolve(
        read_file(str(path)),
        {"KVDRIVE_PORT": "7001", "KVDRIVE_MAX_NUM_SEQS": "6", "KVDRIVE_DISK": "/c,/d"},
        {"port": 7002},
        file_name="kvdrive.yaml",
    )
    assert cfg.server.port == 7002 and cfg.sources["port"] == "flag --port"
    assert cfg.engine.max_num_seqs == 6 and cfg.sources["max_num_seqs"] == "environment KVDRIVE_MAX_NUM_SEQS"
    assert cfg.kv.disk == ("/c", "/d") and cfg.server.api_key == ("k1",) and cfg.kv.budget == 2048.0
    assert cfg.sources["budget"] == "file kvdrive.yaml" and "log_level" not in cfg.sources
    tiered = cfg.kv.tiered()
    assert [p.path for p in tiered.disk] == ["/c", "/d"] and tiered.host_bytes == 8 << 30
    assert cfg.prefix.config() is None and cfg.kv.tiered().sparse.budget == 2048


def test_every_setting_has_one_name_in_file_environment_and_flags():
    for s in SETTINGS:
        assert s.env == "KVDRIVE_" + s.name.upper() and s.flag == "--" + s.name.replace("_", "-")
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    assert resolve().value("max_num_batched_tokens") == 2048


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KVDRIVE_PORT": "eighty"}, "KVDRIVE_PORT: 'eighty' is not an integer"),
        ({"KVDRIVE_PORT": "70000"}, "<= 65535"),
        ({"KVDRIVE_BUDGET": "-1"}, "KVDRIVE_BUDGET: '-1' is not a finite number > 0"),
        ({"KVDRIVE_DTYPE": "float64"}, "one of float32"),
        ({"KVDRIVE_GPU_CACHE_TOKENS": "lots"}, "or auto"),
        ({"KVDRIVE_DISK": "/a", "KVDRIVE_HOST_GIB": "8"}, "set budget too"),
    ],
)
def test_a_bad_value_names_where_it_came_from(env, message):
    with pytest.raises(KvdriveError, match=message):
        resolve(env=env)


def test_the_config_file_refuses_unknown_settings_with_a_suggestion(tmp_path):
    path = tmp_path / "kvdrive.yaml"
    path.write_text("max_num_seq: 4\n")
    with pytest.raises(KvdriveError, match="did you mean 'max_num_seqs'"):
        read_file(str(path))
    path.write_text("port: [1\n")
    with pytest.raises(KvdriveError, match="not valid YAML"):
        read_file(str(path))
    path.write_text("port: true\n")
    with pytest.raises(KvdriveError, match="kvdrive.yaml: port: True is not an integer"):
        resolve(read_file(str(path)), file_name="kvdrive.yaml")


def test_print_config_shows_the_resolved_settings_and_hides_keys(tmp_path, capsys, monkeypatch):
    path = tmp_path / "kvdrive.yaml"
    path.write_text("prefix_host_gib: 2\nmax_model_len: 4096\n")
    monkeypatch.setenv("KVDRIVE_API_KEY", "secret-1,secret-2")
    monkeypatch.setenv("KVDRIVE_MAX_MODEL_LEN", "8192")
    assert main(["serve", "gemma3", "--config", str(path), "--port", "9001", "--print-config"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith("#")}
    assert set(lines) == {s.name for s in SETTINGS}
    assert '"gemma3"' in lines["model"] and "flag --model" in lines["model"]
    assert (
        "9001" in lines["port"]
        and "8192" in lines["max_model_len"]
        and "KVDRIVE_MAX_MODEL_LEN" in lines["max_model_len"]
    )
    assert "2.0" in lines["prefix_host_gib"] and "file" in lines["prefix_host_gib"]
    assert "secret" not in out and '["<set>", "<set>"]' in lines["api_key"]


def test_serve_flags_are_checked_at_the_edge(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--max-num-seqs", "0", "--print-config"])
    assert exit_.value.code == 2 and "'0' is not an integer >= 1" in capsys.readouterr().err
    assert main(["serve", "a", "--model", "b", "--print-config"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_the_remote_prefix_tier_is_set_from_the_file_and_environment(tmp_path):
    path = tmp_path / "kvdrive.yaml"
    path.write_text("prefix_host_gib: 1\nprefix_remote_master: 10.0.0.5:50051\n")
    cfg = resolve(
        read_file(str(path)),
        {"KVDRIVE_PREFIX_REMOTE_METADATA": "http://10.0.0.5:8080/metadata"},
        {},
        file_name="kvdrive.yaml",
    )
    remote = cfg.prefix.config().remote
    assert (remote.master, remote.metadata, remote.protocol) == (
        "10.0.0.5:50051",
        "http://10.0.0.5:8080/metadata",
        "tcp",
    )
    assert resolve({}, {}, {}).prefix.config() is None  # no pool, no remote tier
    with pytest.raises(KvdriveError, match="KVDRIVE_PREFIX_REMOTE_PROTOCOL: .udp. is not one of tcp, rdma"):
        resolve({}, {"KVDRIVE_PREFIX_REMOTE_PROTOCOL": "udp"}, {})


def test_the_prefix_pools_storage_format_is_a_flag_over_the_environment_over_the_file(tmp_path):
    path = tmp_path / "kvdrive.yaml"
    path.write_text("prefix_host_gib: 1\nprefix_kv_dtype: int4\n")
    file = read_file(str(path))
    assert resolve({"prefix_host_gib": 1}).prefix.config().kv_dtype == "bf16"  # the default: the model dtype
    assert resolve(file, file_name="kvdrive.yaml").prefix.config().kv_dtype == "int4"
    cfg = resolve(file, {"KVDRIVE_PREFIX_KV_DTYPE": "fp8"}, file_name="kvdrive.yaml")
    assert (
        cfg.prefix.config().kv_dtype == "fp8"
        and cfg.sources["prefix_kv_dtype"] == "environment KVDRIVE_PREFIX_KV_DTYPE"
    )
    cfg = resolve(file, {"KVDRIVE_PREFIX_KV_DTYPE": "fp8"}, {"prefix_kv_dtype": "bf16"}, file_name="kvdrive.yaml")
    assert cfg.prefix.config().kv_dtype == "bf16" and cfg.sources["prefix_kv_dtype"] == "flag --prefix-kv-dtype"


def test_the_prefix_storage_formats_are_the_quantizers_and_a_bad_one_is_refused_by_name(tmp_path, capsys):
    from kvdrive.quant.formats import KV_DTYPES

    assert BY_NAME["prefix_kv_dtype"].choices == KV_DTYPES
    with pytest.raises(KvdriveError, match="KVDRIVE_PREFIX_KV_DTYPE: 'fp4' is not one of bf16, fp8, int8, int4"):
        resolve(env={"KVDRIVE_PREFIX_KV_DTYPE": "fp4"})
    path = tmp_path / "kvdrive.yaml"
    path.write_text("prefix_kv_dtype: int2\n")
    with pytest.raises(KvdriveError, match="kvdrive.yaml: prefix_kv_dtype: 'int2' is not one of bf16, fp8, int8, int4"):
        resolve(read_file(str(path)), file_name="kvdrive.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--prefix-kv-dtype", "fp16", "--print-config"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--prefix-kv-dtype: invalid choice: 'fp16'" in err
    assert all(name in err.split("choose from")[1] for name in KV_DTYPES)
    assert main(["serve", "--prefix-host-gib", "1", "--prefix-kv-dtype", "fp8", "--print-config"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prefix_kv_dtype:"))
    assert '"fp8"' in line and "flag --prefix-kv-dtype" in line


def test_the_tiered_caches_storage_format_reaches_its_config_and_needs_a_budget(tmp_path):
    assert resolve({"budget": 2048}).kv.tiered().kv_dtype == "bf16"  # the default: the model dtype
    cfg = resolve({"budget": 2048}, {"KVDRIVE_KV_DTYPE": "int4"})
    assert cfg.kv.tiered().kv_dtype == "int4" and cfg.sources["kv_dtype"] == "environment KVDRIVE_KV_DTYPE"
    assert resolve({"budget": 2048}, {}, {"kv_dtype": "fp8"}).kv.tiered().kv_dtype == "fp8"
    with pytest.raises(KvdriveError, match="kv_dtype is the tiered cache's storage format: set budget"):
        resolve({"kv_dtype": "fp8"})


def test_generate_takes_the_tiered_caches_storage_format():
    import argparse

    from kvdrive.commands import generate

    p = argparse.ArgumentParser()
    generate.add_sampling_options(p)
    args = p.parse_args(["--budget", "64", "--kv-dtype", "fp8"])
    assert generate.tiered_config(args).kv_dtype == "fp8"
    with pytest.raises(KvdriveError, match="add --budget"):
        generate.tiered_config(p.parse_args(["--kv-dtype", "int4"]))


def test_the_serve_guide_lists_every_setting():
    text = (Path(__file__).parents[2] / "docs" / "serve.md").read_text()
    assert [s.name for s in SETTINGS if f"| `{s.name}` |" not in text] == []


def test_budget_auto_takes_the_models_measured_budget():
    """``budget: auto`` turns the tiered cache on with no budget fixed: the cache resolves it per model."""
    cfg = resolve({"budget": "auto"})
    assert cfg.kv.budget == "auto" and cfg.kv.tiered().sparse.budget is None
    assert resolve({}, {"KVDRIVE_BUDGET": "auto"}).kv.tiered() is not None
    with pytest.raises(KvdriveError, match="or auto"):
        resolve({"budget": "half"})
    import argparse

    from kvdrive.commands import generate

    p = argparse.ArgumentParser()
    generate.add_sampling_options(p)
    assert generate.tiered_config(p.parse_args(["--budget", "auto"])).sparse.budget is None
    assert generate.tiered_config(p.parse_args(["--budget", "0.375"])).sparse.budget == 0.375
