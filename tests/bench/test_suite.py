import pytest

from kvdrive.bench import suite
from kvdrive.cli import build_parser, main
from kvdrive.errors import KvdriveError


@pytest.mark.parametrize("name", list(suite.SUITES))
def test_every_suite_command_parses_with_the_real_options(name):
    parser = build_parser()
    todo = suite.commands(name, "out dir", "/mnt/nvme")
    for entry_name, entry in todo.items():
        assert all(k.startswith("KVDRIVE_") for k in entry.env)
        if entry.script:  # a script of the repository: its result in the output directory, or what a
            # later entry reads (a model directory) under --disk
            assert entry.argv[0].startswith("bench/scripts/")
            assert entry.argv[1] == f"out dir/{entry_name}.json" or entry.argv[-1].startswith("/mnt/nvme/")
            continue
        args = parser.parse_args(entry.argv)  # exits on an unknown option
        assert args.out == f"out dir/{entry_name}.json", entry_name  # every result lands in the output directory


def test_headline_covers_the_readme_rows_a_gpu_regenerates():
    todo = suite.commands("headline", "o", "/mnt/nvme")
    assert {"eval-smollm2-budgets", "eval-gemma3-budgets", "decode-8b-32k-b8-default", "prefill", "ttft"} <= set(todo)
    assert todo["ttft"].argv[3:5] == ["/mnt/nvme/ttft-pool/p0", "/mnt/nvme/ttft-pool/p1"]


def test_settings_lead_the_command_and_go_to_its_environment():
    entry = suite.commands("prefill", "o", "d", ["prefill-triton"])["prefill-triton"]
    assert entry.env == {"KVDRIVE_PREFILL_KERNEL": "triton"} and entry.argv[:2] == ["bench", "prefill"]
    assert entry.line().startswith("KVDRIVE_PREFILL_KERNEL=triton kvdrive bench prefill ")


def test_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    argv = ["bench", "suite", "prefill", "--dry-run", "--only", "chunk-kernels", "prefill-flash"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"[chunk-kernels] python3 bench/scripts/chunk_attention_kernels.py {tmp_path}/chunk-kernels.json",
        f"[prefill-flash] KVDRIVE_PREFILL_KERNEL=flash kvdrive bench prefill -l 32768 131072 --systems plain "
        f"-o {tmp_path}/prefill-flash.json",
    ]
    assert list(tmp_path.iterdir()) == []


def test_unknown_entry_is_a_user_error():
    with pytest.raises(KvdriveError, match="no entries"):
        suite.commands("headline", "o", "d", ["decode-1m"])
