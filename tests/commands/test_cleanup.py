"""``kvdrive generate --disk`` leaves no file behind, finished or interrupted."""

import os
import signal
import subprocess
import sys

from factories import ROOT

PROMPT = "The keeper climbed the stairs of the lighthouse every evening to light the lamp. " * 3


def extents(path) -> list[str]:
    return [f for f in os.listdir(path) if f.endswith(".extent")]


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "kvdrive", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KVDRIVE_NO_PROGRESS": "1"},
        **kw,
    )


def test_cli_runs_with_disk_leave_nothing_behind_even_when_interrupted(tmp_path):
    args = [
        "generate",
        "--raw",
        "--device",
        "cpu",
        "--budget",
        "64",
        "--disk",
        str(tmp_path),
        "--host-gib",
        "0.05",
        "--disk-gib",
        "0.25",
    ]
    done = _cli(*args, "-n", "3", PROMPT)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert os.listdir(tmp_path) == []
    running = _cli(*args, "-n", "2000", "--ignore-eos", PROMPT)
    try:
        running.stdout.read(1)  # generating: the extents exist
        assert extents(tmp_path)
        running.send_signal(signal.SIGTERM)
        _, err = running.communicate(timeout=120)
    finally:
        running.kill()
    assert running.returncode == 130 and "interrupted" in err
    assert os.listdir(tmp_path) == []
