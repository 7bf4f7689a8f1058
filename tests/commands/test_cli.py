"""The command line: happy paths and one-line errors for user mistakes (no tracebacks)."""

import json
import subprocess
import sys

import pytest

from kvdrive.cli import main


def _cli(*args, stdin=None):
    proc = subprocess.run(
        [sys.executable, "-m", "kvdrive", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={"KVDRIVE_NO_PROGRESS": "1", **__import__("os").environ},
    )
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvdrive: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_info_llama_8b_kv_arithmetic(capsys):
    assert main(["info", "random:llama-3.1-8b", "--context", "131072", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_bytes_per_token"] == 128 * 1024
    assert info["kv_bytes_at_context"] == 16 * 2**30
    assert info["layers"] == 32 and info["kv_heads"] == 8


def test_info_plans_where_the_kv_can_live_on_a_given_gpu(capsys):
    """--gpu-gib: 4 x 128K of the 8B shape does not fit on an 80 GiB GPU, fits the tiered cache
    (host-bound at 8 sequences of 16 GiB in 128 GiB), with an auto GPU cache far above 4096
    tokens; 16 x 32K on 24 GiB with 32 GiB of host is refused with the disk tier named."""
    args = ["info", "random:llama-3.1-8b", "--json", "--host-gib", "128"]
    assert main(args + ["--context", "131072", "--batch", "4", "--gpu-gib", "80"]) == 0
    pl = json.loads(capsys.readouterr().out)["placement"]
    assert not pl["all_kv_on_gpu"] and pl["tiered_fits"] and pl["tiered_seqs_host"] == 8
    assert 4096 < pl["tiered_cache_tokens"] <= 131072 and pl["tiered_cache_tokens"] % 16 == 0
    assert (
        main(
            [
                "info",
                "random:llama-3.1-8b",
                "--context",
                "32768",
                "--batch",
                "16",
                "--gpu-gib",
                "24",
                "--host-gib",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "does not fit" in out and "--disk" in out
    assert main(["info", "random:llama-3.1-8b", "--context", "4096", "--batch", "4", "--gpu-gib", "80"]) == 0
    assert "fits (2.00 GiB)" in capsys.readouterr().out


def test_info_counts_the_host_tier_in_its_storage_format(capsys):
    """The same 21 GiB of host memory holds one 128K sequence of the 8B shape in bf16 and two in
    fp8 (9.06 GiB of stored rows each); the plan names the format in its setting."""
    base = ["info", "random:llama-3.1-8b", "--context", "131072", "--batch", "4", "--gpu-gib", "24"]
    seqs = {}
    for fmt in ("bf16", "fp8"):
        assert main(base + ["--host-gib", "21", "--kv-dtype", fmt]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert ("--kv-dtype fp8" in line) == (fmt == "fp8") and "does not fit" in line
        seqs[fmt] = line
    assert "(16.00 GiB pinned host per sequence)" in seqs["bf16"] and "1 by 21 GiB host" in seqs["bf16"]
    assert "(9.06 GiB pinned host per sequence)" in seqs["fp8"] and "2 by 21 GiB host" in seqs["fp8"]


def test_info_gemma_counts_sliding_layers(capsys):
    assert main(["info", "random:gemma3-270m", "--context", "32768", "--dtype", "float32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    per_layer = 2 * 1 * 256 * 4
    assert info["global_layers"] == 3
    assert info["kv_bytes_at_context"] == per_layer * (3 * 32768 + 15 * 512)


def test_generate_json_from_stdin():
    rc, out, err = _cli("generate", "--json", "-n", "8", "--device", "cpu", stdin="What is the capital of France?")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["finish_reason"] in ("stop", "length") and 0 < len(doc["token_ids"]) <= 8


def test_generate_from_file(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Say hello.")
    rc, out, err = _cli("generate", "-f", str(f), "-n", "5", "--raw", "--device", "cpu")
    assert rc == 0 and out.strip(), err


def test_missing_model_path():
    rc, _, err = _cli("generate", "hi", "-m", "/no/such/model.gguf")
    _one_line_error(rc, err, "not found", "random:PRESET")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc, _, err = _cli("info", str(tmp_path))
    _one_line_error(rc, err, "'gpt2' is not supported", "llama", "gemma3_text", "qwen3")


def test_prompt_longer_than_context():
    rc, _, err = _cli(
        "generate",
        "--raw",
        "--max-model-len",
        "16",
        "--device",
        "cpu",
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen x y",
    )
    _one_line_error(rc, err, "context is 16", "shorten the prompt")


@pytest.mark.parametrize(
    "flag, value, word",
    [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "2", "--top-p"),
        ("--top-k", "-5", "--top-k"),
        ("--max-tokens", "0", "--max-tokens"),
    ],
)
def test_invalid_sampling_values(flag, value, word):
    rc, _, err = _cli("generate", "hi", flag, value)
    _one_line_error(rc, err, word)


def test_empty_prompt_and_missing_file():
    rc, _, err = _cli("generate", stdin="")
    _one_line_error(rc, err, "empty")
    rc, _, err = _cli("generate", "-f", "/no/such/file.txt")
    _one_line_error(rc, err, "cannot read prompt file")


def test_help_explains_every_option():
    rc, out, _ = _cli("generate", "--help")
    assert rc == 0
    for opt in (
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--stop",
        "--raw",
        "--model",
        "--device",
        "--dtype",
        "--file",
        "--max-model-len",
    ):
        assert opt in out


def test_help_names_the_model_that_loads_by_default():
    from kvdrive.commands.common import DEFAULT_MODEL, model_help
    from kvdrive.models.embedded import DEFAULT

    assert DEFAULT_MODEL == DEFAULT
    assert model_help().endswith(f"Default: {DEFAULT}")
    assert model_help("random:llama-3.1-8b").endswith("Default: random:llama-3.1-8b")


def test_demo_runs():
    rc, out, err = _cli("demo", "-n", "12", "--device", "cpu")
    assert rc == 0, err
    assert out.strip() and "decode" in err and "tok/s" in err


@pytest.mark.parametrize("tasks,want", [(["none"], ()), ([], ()), (["passkey"], ("passkey",))])
def test_eval_tasks_none_skips_the_suite(tasks, want):
    from kvdrive.cli import build_parser

    args = build_parser().parse_args(["eval", "--tasks", *tasks])
    assert tuple(t for t in args.tasks if t != "none") == want


@pytest.mark.parametrize(
    "argv", [["--samples", "0"], ["--steps", "0"], ["--budgets", "1.5"], ["--items", "0"], ["--batch", "0"]]
)
def test_eval_refuses_empty_parts_before_loading_a_model(argv, capsys):
    """Each is a clear error naming the flag (``--samples 0`` once divided by zero), not a traceback."""
    assert main(["eval", "-m", "no-such-model", *argv]) != 0
    err = capsys.readouterr().err
    assert argv[0] in err and "Traceback" not in err
