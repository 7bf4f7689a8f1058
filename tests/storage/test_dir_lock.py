"""Disk devices own their files: one owner per lock, and the files of owners and processes
that died are swept at the next open; a private device's extents go when it does."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import ROOT

from kvdrive.errors import KvdriveError
from kvdrive.storage.dir_lock import DirectoryInUse, DirLock, sweep_stale
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.layout import GroupLayout


def test_lock_taken_after_its_file_was_unlinked_is_the_one_on_disk(tmp_path):
    path = str(tmp_path / "x.lock")
    a = DirLock.take(path)
    a.release(unlink=True)
    b = DirLock.take(path)
    with pytest.raises(DirectoryInUse):
        DirLock.take(path)
    b.release()


def test_extents_of_a_killed_process_are_deleted_at_the_next_open(tmp_path):
    code = f"""
        import os, signal, sys, torch
        from kvdrive.storage.disk import DiskDevice
        from kvdrive.storage.layout import GroupLayout
        d = DiskDevice({str(tmp_path)!r}, GroupLayout(1, 1, 8, torch.float32, 4), 1 << 20, extent_bytes=1 << 16)
        d.alloc(20)
        print("ready", flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()
    """
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), "kill"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -9
    dead = set(os.listdir(tmp_path))
    assert len([f for f in dead if f.endswith(".extent")]) == 2
    alive = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert alive.stdout.readline().strip() == "ready"
        live = set(os.listdir(tmp_path))
        assert not live & dead and len(live) == 3  # its open swept the dead owner's files
        assert sweep_stale(str(tmp_path)) == [] and set(os.listdir(tmp_path)) == live  # a live owner's stay
    finally:
        alive.stdin.close()
        alive.wait(timeout=60)
    assert os.listdir(tmp_path) == []  # the live one removed its own at exit


def test_a_device_dropped_without_close_deletes_its_extents(tmp_path):
    layout = GroupLayout(1, 1, 8, torch.float32, 4)
    d = DiskDevice(str(tmp_path), layout, 1 << 20, extent_bytes=1 << 16)
    d.alloc(3)
    assert any(f.endswith(".extent") for f in os.listdir(tmp_path))
    del d
    import gc

    gc.collect()
    assert os.listdir(tmp_path) == []


def test_a_read_only_directory_is_refused_before_the_model_loads(tmp_path):
    from kvdrive.storage.pool import check_dir

    for bad in ("/proc", str(tmp_path / "missing")):
        with pytest.raises(KvdriveError, match="directory"):
            check_dir(bad)
    check_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_temporary_files_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    names = [
        f".kvdrive-{dead}-0123abcd.lock.tmp",
        f".kvdrive-odirect-{dead}-0123abcd",
        f".kvdrive-write-check-{dead}-0123abcd",
        f".kvdrive-odirect-{os.getpid()}-0123abcd",
        "notes.txt",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"x" * 4096)
    assert sorted(sweep_stale(str(tmp_path))) == sorted(names[:3])
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])  # a live process's probe and foreign files stay
