"""Ownership of kvdrive's files in a directory: one exclusive ``flock`` per owner.

Extent files have one owner at a time: two owners of a persistent prefix pool's extents
would hand out the same free slots and overwrite each other's chunks. The owner holds
``LOCK_EX`` on a lock file for as long as it lives; the kernel drops the lock when the
process exits, however it exits (kill -9 too), so a lock that can be taken belongs to a
dead owner and its files are stale.

* ``DirLock.take(path)``: a persistent owner's lock (``kvdrive-prefix.lock``); a second
  opener, in this process or another, gets ``DirectoryInUse`` naming the holder's pid.
  After taking it the owner checks that the path still names the file it locked (an owner
  that deletes its directory's files unlinks the lock too), else it tries again.
* ``DirLock.private(dir)``: a lock of a fresh per-process name, for extents that live as
  long as their process (the tiered cache's disk tier). It is created under a temporary
  name, locked, then renamed into place, so no other process ever sees it unlocked.
* ``sweep_stale(dir)``: delete the private extents and locks whose owner is dead, and the
  small temporary files of dead processes (a lock not yet renamed, an O_DIRECT or write probe).
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid

from kvdrive.errors import KvdriveError

# kvdrive-<pid>-<8 hex>.lock and kvdrive-<pid>-<8 hex>-<n>.extent: a private owner and its extents
_PRIVATE = re.compile(r"^kvdrive-(\d+)-([0-9a-f]{8})(?:\.lock|-\d+\.extent)$")
# temporary files named after their process: a private lock before its rename, the disk probes
_TEMPORARY = re.compile(r"^\.kvdrive-(?:(\d+)-[0-9a-f]{8}\.lock\.tmp|(?:odirect|write-check)-(\d+)-[0-9a-f]{8})$")


class DirectoryInUse(KvdriveError):
    """Another live owner holds the lock of these files."""

    def __init__(self, path: str, pid: int | None):
        self.path, self.pid = path, pid
        who = "another owner in this process" if pid == os.getpid() else f"process {pid}" if pid else "another owner"
        super().__init__(f"{os.path.dirname(path) or '.'} is in use by {who} (lock {os.path.basename(path)})")


class DirLock:
    """An exclusive ``flock`` held until ``release`` (or the process's exit)."""

    def __init__(self, path: str, fd: int, private: bool):
        self.path, self._fd, self._private = path, fd, private

    @classmethod
    def take(cls, path: str) -> DirLock:
        """Lock ``path`` (created if absent); ``DirectoryInUse`` if a live owner holds it."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as err:
                raise KvdriveError(f"cannot create the lock file {path}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise DirectoryInUse(path, pid) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its owner unlinked it while we waited: lock the file the path names now
        _write_pid(fd)
        return cls(path, fd, private=False)

    @classmethod
    def private(cls, directory: str) -> DirLock:
        """A new lock ``kvdrive-<pid>-<8 hex>.lock`` in ``directory``; ``tag`` names its extents."""
        tag = f"kvdrive-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = os.path.join(directory, f".{tag}.lock.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            raise KvdriveError(f"cannot create files in {directory}: {err.strerror or err}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh name: nobody else holds it
        _write_pid(fd)
        path = os.path.join(directory, f"{tag}.lock")
        os.rename(tmp, path)
        return cls(path, fd, private=True)

    @property
    def tag(self) -> str:
        """The name prefix of the owner's files (private locks)."""
        return os.path.basename(self.path).removesuffix(".lock")

    def release(self, unlink: bool = False) -> None:
        """Drop the lock. The file is deleted if the lock is private (its owner deleted its
        extents first) or ``unlink`` says so (an owner removing all its files)."""
        if self._fd < 0:
            return
        if self._private or unlink:
            _unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def sweep_stale(directory: str) -> list[str]:
    """Delete private extents and lock files of owners that are dead; returns what was deleted.

    An owner is dead when its lock can be taken. Extents whose lock file is gone (an owner
    killed between deleting its extents and its lock) count as dead when their pid is."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    tags: dict[str, list[str]] = {}
    removed = []
    for name in names:
        m = _PRIVATE.match(name)
        if m:
            tags.setdefault(f"kvdrive-{m[1]}-{m[2]}", []).append(name)
        t = _TEMPORARY.match(name)
        if t and not _pid_alive(int(t[1] or t[2])) and _unlink(os.path.join(directory, name)):
            removed.append(name)
    for tag, files in tags.items():
        lock = os.path.join(directory, f"{tag}.lock")
        fd = _open_existing(lock)
        if fd is None:
            if _pid_alive(int(tag.split("-")[1])):
                continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # alive
        try:
            for name in sorted(files, key=lambda n: n.endswith(".lock")):  # extents first, the lock last
                if _unlink(os.path.join(directory, name)):
                    removed.append(name)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _open_existing(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDWR)
    except OSError:
        return None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
