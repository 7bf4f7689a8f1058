import json
import subprocess

import pytest

from kvdrive import results


def _clear_settings(monkeypatch):
    for k in [k for k in results.os.environ if k.startswith("KVDRIVE_")]:
        monkeypatch.delenv(k)


def test_the_command_leads_with_the_settings_that_change_a_run(tmp_path, monkeypatch):
    _clear_settings(monkeypatch)
    monkeypatch.setattr(results.sys, "argv", ["kvdrive", "bench", "prefill", "--tiny"])
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "cudnn")
    monkeypatch.setenv("KVDRIVE_COMMIT", "abc1234")  # labels the run, changes nothing in it
    monkeypatch.setenv("KVDRIVE_NO_PROGRESS", "1")
    assert results.command_line() == "KVDRIVE_PREFILL_KERNEL=cudnn kvdrive bench prefill --tiny"


def test_the_command_names_the_program_that_ran(monkeypatch):
    _clear_settings(monkeypatch)
    for argv0 in ("/venv/bin/kvdrive", "/repo/kvdrive/__main__.py"):  # the entry point, python -m kvdrive
        monkeypatch.setattr(results.sys, "argv", [argv0, "eval", "--tiny"])
        assert results.command_line() == "kvdrive eval --tiny"
    monkeypatch.setattr(results.sys, "argv", ["bench/scripts/kv_noise_floor.py", "out.json"])
    assert results.command_line() == "python3 bench/scripts/kv_noise_floor.py out.json"


def test_result_records_commit_dirty_and_gpu(tmp_path, monkeypatch):
    _clear_settings(monkeypatch)
    monkeypatch.setattr(results.sys, "argv", ["kvdrive", "bench", "io", "--tiny"])
    path = results.write_result(tmp_path / "r" / "x.json", "io", {"a": 1}, {"b": 2}, ["n"])
    doc = json.loads(path.read_text())
    assert doc["command"] == "kvdrive bench io --tiny" and doc["config"] == {"a": 1} and doc["notes"] == ["n"]
    env = doc["environment"]
    for key in ("commit", "dirty", "gpu", "gpu_driver", "cuda"):
        assert key in env
    if (results.REPO / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(results.REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert env["commit"] == head and isinstance(env["dirty"], bool)
    if not results.torch.cuda.is_available():
        assert env["gpu"] is None and env["gpu_driver"] is None and env["cuda"] is None


def test_git_state_of_a_tree(tmp_path):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git not installed")
    assert results.git_state(tmp_path) == {"commit": None, "dirty": None}  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    clean = results.git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "untracked").write_text("x")
    assert results.git_state(tmp_path)["dirty"] is False
    (tmp_path / "f").write_text("2")
    assert results.git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


def test_a_copied_tree_names_its_code_by_the_stated_commit(tmp_path, monkeypatch):
    """A tree copied to another machine may carry a stale .git: KVDRIVE_COMMIT wins over it."""
    monkeypatch.setenv("KVDRIVE_COMMIT", "0123abc")
    assert results.git_state(tmp_path) == {"commit": "0123abc", "dirty": None}
    assert results.environment()["commit"] == "0123abc"
