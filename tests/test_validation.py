"""User mistakes, on the command line and in the Python API: each is one line naming the flag
or argument and a value that works (exit 2 or ``KvdriveError``), found before the model loads
where it can be; never a traceback."""

import io
import math
import os
import re
import subprocess
import sys

import pytest
from factories import ROOT

from kvdrive.cache.sparse import SparseConfig
from kvdrive.cli import main
from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.cache import TieredConfig


def one_line_error(capsys, argv, *words, stdin=None, monkeypatch=None) -> str:
    if stdin is not None:
        fake = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        fake.isatty = lambda: False
        monkeypatch.setattr(sys, "stdin", fake)
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("kvdrive: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ro; needs root), else skip."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True, check=False
    ).returncode:
        pytest.skip("mounting a read-only tmpfs needs root")
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory):
    from kvdrive.models import embedded

    out = tmp_path_factory.mktemp("gguf") / "cut.gguf"
    with open(embedded.smollm2_path(), "rb") as f:
        out.write_bytes(f.read(5000))  # inside the header's metadata
    return str(out)


# -- the command line --------------------------------------------------------------------------

GENERATE_FLAGS = [
    (["-t", "inf"], ["--temperature", "e.g."]),
    (["-t", "abc"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p", "0.95"]),
    (["--top-k", "-5"], ["--top-k"]),
    (["-n", "0"], ["--max-tokens"]),
    (["--seed", str(2**70)], ["--seed", "e.g. 1"]),
    (["--seed", "-1"], ["--seed"]),
    (["--max-model-len", "0"], ["--max-model-len"]),
    (["--budget", "0"], ["--budget"]),
    (["--budget", "64", "--disk", "/tmp", "--host-gib", "-1"], ["--host-gib", "e.g. 8"]),
    (["--budget", "64", "--disk", "/tmp", "--host-gib", "1", "--disk-gib", "0"], ["--disk-gib"]),
    (["--budget", "64", "--host-gib", "1"], ["--host-gib", "--disk"]),
    (["--device", "tpu"], ["'tpu'", "cpu, cuda"]),
    (["--device", "cuda:x"], ["cuda:x"]),
    (["--budget", "64", "--disk", "/proc", "--host-gib", "1"], ["/proc", "writable"]),
    (["--budget", "64", "--disk", "/no/such/dir", "--host-gib", "1"], ["not a directory", "mkdir"]),
]


@pytest.mark.parametrize("flags, words", GENERATE_FLAGS, ids=[" ".join(f) for f, _ in GENERATE_FLAGS])
def test_generate_flags_are_checked_before_the_model_loads(capsys, flags, words):
    # -m names no model: reaching the loader would be another error
    one_line_error(capsys, ["generate", "-m", "/no/such/model.gguf", "hi", *flags], *words)


def test_disk_on_a_read_only_file_system(capsys, read_only_dir):
    one_line_error(
        capsys,
        ["generate", "-m", "/no/such/model.gguf", "--budget", "64", "--disk", read_only_dir, "--host-gib", "1", "hi"],
        read_only_dir,
        "Read-only file system",
    )
    one_line_error(capsys, ["probe", read_only_dir], read_only_dir, "Read-only file system")


def test_prompts_that_are_not_utf8(capsys, monkeypatch, tmp_path):
    one_line_error(
        capsys,
        ["generate"],
        "standard input is not UTF-8",
        "0xff at offset 4",
        stdin=b"abc \xff\xfe def",
        monkeypatch=monkeypatch,
    )
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin1"))
    one_line_error(capsys, ["generate", "-f", str(bad)], "latin1.txt is not UTF-8", "iconv")
    one_line_error(capsys, ["generate", "caf\udce9"], "PROMPT", "lone surrogate")  # argv bytes that were not UTF-8


def test_a_truncated_gguf(capsys, truncated_gguf):
    one_line_error(capsys, ["generate", "-m", truncated_gguf, "hi"], "cut.gguf", "not a complete GGUF", "again")
    one_line_error(capsys, ["info", truncated_gguf], "cut.gguf", "not a complete GGUF")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--mib", "0"], ["--mib"]),
        (["--depth", "0"], ["--depth"]),
        (["--slot-kib", "6"], ["--slot-kib", "multiple of 4"]),
        (["--slot-kib", "0"], ["--slot-kib"]),
    ],
)
def test_probe_flags(capsys, tmp_path, flags, words):
    one_line_error(capsys, ["probe", str(tmp_path), *flags], *words)
    assert os.listdir(tmp_path) == []  # nothing measured over nothing


def test_probe_paths_are_checked_before_any_is_measured(capsys, tmp_path):
    one_line_error(capsys, ["probe", str(tmp_path), "/proc"], "/proc")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, word",
    [
        (["info", "--batch", "0"], "--batch"),
        (["info", "--context", "-1"], "--context"),
        (["info", "--gpu-gib", "nan"], "--gpu-gib"),
        (["demo", "-n", "0"], "--max-tokens"),
    ],
)
def test_info_and_demo_flags(capsys, argv, word):
    one_line_error(capsys, argv, word)


def test_a_host_arena_too_small_names_the_flag_and_a_size_that_works(capsys, tmp_path):
    """Users tried 0.01, 0.1, 0.2 GiB against "raise the host budget"; now the refusal says how much."""
    prompt = "The keeper climbed the lighthouse stairs to light the lamp at dusk. " * 20
    base = ["generate", "--raw", "--device", "cpu", "--budget", "64", "--disk", str(tmp_path), "-n", "2", prompt]
    line = one_line_error(capsys, base + ["--host-gib", "0.001"], "--host-gib", "or more")
    fix = re.search(r"use --host-gib ([0-9.]+)", line).group(1)
    assert main(base + ["--host-gib", fix]) == 0
    assert os.listdir(tmp_path) == []
    one_line_error(capsys, base + ["--host-gib", fix, "--disk-gib", "0.00001"], "--disk-gib", "or more")


# -- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(smollm2):
    with LLM(loaded=smollm2) as m:
        yield m


@pytest.mark.parametrize(
    "prompts, word",
    [
        ([], "at least one prompt"),
        (None, "at least one prompt"),
        ([[]], "empty prompt"),
        (["\ud800 hi"], "lone surrogate"),
        ([{"prompt": "x"}], "prompt_token_ids"),
        ([3.5], "a prompt is"),
        ([[1, 2, 10**9]], "token ids must be in"),
    ],
)
def test_generate_refuses_bad_prompts(llm, prompts, word):
    with pytest.raises(KvdriveError, match=re.escape(word)):
        llm.generate(prompts)


@pytest.mark.parametrize(
    "messages, word",
    [
        ([], "non-empty list"),
        (None, "non-empty list"),
        ([{"role": "user"}], "'content' string"),
        ([{"role": "user", "content": 5}], "'content' string"),
        (["hi"], "message 0"),
        ([{"role": "user", "content": "\udcff"}], "lone surrogate"),
    ],
)
def test_chat_refuses_bad_messages(llm, messages, word):
    with pytest.raises(KvdriveError, match=re.escape(word)):
        llm.chat(messages)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_sampling_params_are_checked_when_made(kwargs, word):
    with pytest.raises(KvdriveError, match=word):
        SamplingParams(**kwargs)


def test_generate_refuses_bad_sampling_params_lists(llm):
    with pytest.raises(KvdriveError, match="2 prompts but 1"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(KvdriveError, match="sampling_params"):
        llm.generate(["a"], {"temperature": 0})


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"device": "tpu"}, "'tpu'"),
        ({"device": 3}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_model_len": "9"}, "max_model_len"),
        ({"model": 5}, "model"),
        ({"seed": "abc"}, "seed"),
        ({"kv_cache": "host"}, "kv_cache"),
        ({"prefix_cache": {}}, "prefix_cache"),
        ({"tenant": 1}, "tenant"),
    ],
)
def test_llm_arguments_are_checked_before_the_model_loads(kwargs, word):
    kwargs.setdefault("model", "/no/such/model.gguf")  # reaching the loader would be another error
    with pytest.raises(KvdriveError, match=re.escape(word)):
        LLM(**kwargs)


def test_llm_refuses_disk_paths_it_cannot_write_before_loading():
    bad = TieredConfig(SparseConfig(budget=64), disk=(PoolPath("/proc", 1 << 30),), host_bytes=1 << 30)
    with pytest.raises(KvdriveError, match="/proc"):
        LLM("/no/such/model.gguf", kv_cache=bad)


def test_llm_refuses_a_truncated_gguf(truncated_gguf):
    with pytest.raises(KvdriveError, match="not a complete GGUF"):
        LLM(truncated_gguf, device="cpu")


def test_the_api_host_arena_refusal_names_host_bytes(smollm2, tmp_path):
    cfg = TieredConfig(SparseConfig(budget=64), disk=(PoolPath(str(tmp_path), 1 << 30),), host_bytes=1 << 20)
    with LLM(loaded=smollm2, kv_cache=cfg) as m, pytest.raises(KvdriveError, match=r"host_bytes=\d+\) or more"):
        m.generate(["The keeper climbed the stairs. " * 30], SamplingParams(max_tokens=2))
    assert os.listdir(tmp_path) == []  # refused before the cache made any file


def test_cli_errors_come_from_a_fresh_process_too():
    """The same one line and exit 2 from ``python -m kvdrive`` (argparse's own errors included)."""
    out = subprocess.run(
        [sys.executable, "-m", "kvdrive", "generate", "hi", "--seed", str(2**70)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--seed" in out.stderr
