"""A Mooncake Store on this machine, for tests, benchmarks and one-machine trials.

    with LocalMooncake(segment_bytes=1 << 30) as mc:      # master + pool holder, loopback
        remote = RemoteConfig(master=mc.master, metadata=mc.metadata)

Starts ``mooncake_master`` with its HTTP metadata server, and a ``mooncake_client`` that
lends ``segment_bytes`` of memory to the pool (the data outlives the kvdrive processes that
wrote it), each on free loopback ports, in its own session; ``stop`` (and leaving the
``with`` block, also on an error) ends them: SIGTERM, then SIGKILL after a grace period.
The binaries are those of the installed wheel (``pip install 'kvdrive[remote]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

from kvdrive.errors import KvdriveError
from kvdrive.prefix.remote_store import INSTALL_HINT

STOP_GRACE_S = 5.0


def binary(name: str) -> str:
    """Path of a binary shipped in the ``mooncake`` wheel (mooncake_master, mooncake_client, transfer_engine_bench)."""
    spec = importlib.util.find_spec("mooncake")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            if not os.access(path, os.X_OK):
                os.chmod(path, os.stat(path).st_mode | 0o111)
            return path
    raise KvdriveError(f"{name} not found: the Mooncake wheel is not installed; {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    """This environment with the transfer engine's RPC bound to 127.0.0.1: by default it binds
    to the first non-loopback interface, and fails ("not valid LAN address found") where none is up."""
    return {**os.environ, "MC_TCP_BIND_ADDRESS": os.environ.get("MC_TCP_BIND_ADDRESS", "127.0.0.1")}


def _get(url: str, timeout: float = 0.5) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


class LocalMooncake:
    """A master and (``segment_bytes`` > 0) a pool holder on 127.0.0.1 (see the module doc).
    ``master``/``metadata`` are what ``RemoteConfig`` takes; logs go to ``log_dir`` (or nowhere)."""

    def __init__(self, segment_bytes: int = 256 << 20, log_dir: str | None = None, master_args: tuple = ()):
        self.segment_bytes, self.log_dir, self.master_args = segment_bytes, log_dir, tuple(master_args)
        self.rpc_port, self.meta_port, self.metrics_port = free_port(), free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.meta_port}/metadata"

    def metric(self, name: str) -> float | None:
        """A value of the master's Prometheus text (e.g. ``master_key_count``), None if unreachable."""
        text = _get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text or "", re.M)
        return float(m.group(1)) if m else None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(
                [binary(name), *args],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=loopback_env(),
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 30.0) -> LocalMooncake:
        try:
            self.start_master(timeout)
            if self.segment_bytes:
                self._spawn(
                    "mooncake_client",
                    [
                        "--host=127.0.0.1",
                        f"--port={free_port()}",
                        f"--global_segment_size={self.segment_bytes}",
                        f"--master_server_address={self.master}",
                        f"--metadata_server={self.metadata}",
                        "--protocol=tcp",
                    ],
                )
                self._wait(
                    lambda: (self.metric("master_total_capacity_bytes") or 0) >= self.segment_bytes,
                    timeout,
                    "the pool holder (mooncake_client) to mount its segment",
                )
        except BaseException:
            self.stop()
            raise
        return self

    def start_master(self, timeout: float = 30.0) -> None:
        self._spawn(
            "mooncake_master",
            [
                "--rpc_address=127.0.0.1",
                f"--rpc_port={self.rpc_port}",
                "--enable_http_metadata_server=true",
                "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.meta_port}",
                "--metrics_host=127.0.0.1",
                f"--metrics_port={self.metrics_port}",
                *self.master_args,
            ],
        )
        self._wait(lambda: _get(f"http://127.0.0.1:{self.metrics_port}/health") is not None, timeout, "mooncake_master")

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > end:
                why = f"{', '.join(dead)} exited" if dead else f"not ready in {timeout:.0f} s"
                logs = f" (logs: {self.log_dir})" if self.log_dir else ""
                raise KvdriveError(f"local Mooncake: waiting for {what}: {why}{logs}")
            time.sleep(0.1)

    def kill_master(self) -> None:
        """SIGKILL the master (a crash); the pool holder and clients stay up."""
        proc = self.procs.pop("mooncake_master")
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """SIGTERM every process (holder first), SIGKILL what is left after the grace period."""
        for name in sorted(self.procs, key=lambda n: n == "mooncake_master"):
            with contextlib.suppress(ProcessLookupError):
                self.procs[name].send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> LocalMooncake:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
