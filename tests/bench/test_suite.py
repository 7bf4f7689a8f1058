import pytest

from kvdrive.bench import suite
from kvdrive.cli import build_parser, main
from kvdrive.errors import KvdriveError


def test_every_headline_command_parses_with_the_real_options():
    parser = build_parser()
    todo = suite.commands("headline", "out dir", "/mnt/nvme")
    assert {"model", "io", "ttft", "decode-32k", "decode-128k"} <= set(todo)
    for name, argv in todo.items():
        args = parser.parse_args(argv)  # exits on an unknown option
        assert args.out == f"out dir/{name}.json", name  # every result lands in the output directory
    assert suite.commands("headline", "o", "/mnt/nvme")["io"][-3:] == ["/mnt/nvme", "-o", "o/io.json"]


def test_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    assert main(["bench", "suite", "headline", "--dry-run", "--only", "io", "model", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"[model] kvdrive bench model -m random:llama-3.1-8b -c 4096 -b 1 16 -n 64 --repeats 3 "
        f"-o {tmp_path}/model.json",
        f"[io] kvdrive bench io --dir bench/disk -o {tmp_path}/io.json",
    ]
    assert list(tmp_path.iterdir()) == []


def test_unknown_entry_is_a_user_error():
    with pytest.raises(KvdriveError, match="no entries"):
        suite.commands("headline", "o", "d", ["decode-1m"])
