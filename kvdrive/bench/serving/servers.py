"""The servers ``kvdrive bench serve`` measures: kvdrive's and transformers' own
(``transformers serve``), started here on a free port or already running at a URL.

A server started here is a child process with its log in a temporary file (shown when it
fails to come up) and is stopped with SIGTERM at the end. Memory is read from its
``/proc/<pid>/status`` (resident set) and, for kvdrive, from ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

from kvdrive.errors import KvdriveError


@dataclass
class Server:
    kind: str  # kvdrive | transformers
    url: str
    model: str = ""  # what requests send as ``model`` (read from /v1/models)
    max_model_len: int | None = None  # prompt + output tokens of one request, where /v1/models says
    process: subprocess.Popen | None = None
    log: str | None = None

    def rss(self) -> int | None:
        """Resident bytes of a server started here (None otherwise, or off Linux)."""
        if self.process is None:
            return None
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        """kvdrive's /metrics as sample name (with a tier label) -> value; {} for other servers."""
        if self.kind != "kvdrive":
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in family.samples:
                out[s.name + (f"[{s.labels['tier']}]" if "tier" in s.labels else "")] = s.value
        return out

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def hf_dir_of(spec: str) -> str:
    """A Hugging Face directory for ``spec``: itself, or for an embedded model or a .gguf file the
    directory kvdrive converted it into at its first load (fp32 safetensors, config, tokenizer)."""
    from pathlib import Path

    from kvdrive.models import embedded
    from kvdrive.models.gguf_loader import converted_dir

    path = embedded.path_of(spec) if spec in embedded.EMBEDDED else Path(spec).expanduser()
    if path.suffix != ".gguf":
        return str(path)
    target = converted_dir(path)
    if not (target / "config.json").exists():
        raise KvdriveError(
            f"{spec} is not converted yet: load it with kvdrive once (e.g. kvdrive generate -m {spec} "
            "hi), then its Hugging Face directory is served"
        )
    return str(target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, args: list[str], timeout: float) -> Server:
    """Start ``kvdrive serve ARGS`` or ``transformers serve ARGS`` on a free local port."""
    port = free_port()
    if kind == "kvdrive":
        cmd = [
            sys.executable,
            "-m",
            "kvdrive.cli",
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    else:
        exe = shutil.which("transformers")
        if exe is None:
            raise KvdriveError("transformers serve is not installed: pip install 'transformers[serving]'")
        cmd = [exe, "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with tempfile.NamedTemporaryFile(prefix=f"kvdrive-bench-{kind}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # the child keeps the file
    server = Server(kind, f"http://127.0.0.1:{port}", process=proc, log=log.name)
    try:
        wait_ready(server, timeout, default_model=args[0] if kind == "transformers" else None)
    except BaseException:
        server.stop()
        raise
    return server


def attach(kind: str, url: str, timeout: float) -> Server:
    server = Server(kind, url.rstrip("/"))
    wait_ready(server, timeout)
    return server


def wait_ready(server: Server, timeout: float, default_model: str | None = None) -> None:
    """Until /health answers 200, then read the model's name from /v1/models; where that lists
    none, ``default_model`` (transformers serve lists only its hub cache's models, and loads a
    directory named in a request)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process is not None and server.process.poll() is not None:
            raise KvdriveError(f"{server.kind} serve exited with {server.process.returncode}: {_tail(server.log)}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise KvdriveError(
                f"{server.kind} server at {server.url} not ready after {timeout:.0f} s: {_tail(server.log)}"
            )
        time.sleep(1.0)
    models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    if not models and default_model is not None:
        server.model = default_model
        return
    if not models:
        raise KvdriveError(f"{server.kind} server at {server.url} lists no model at /v1/models")
    server.model, server.max_model_len = models[0]["id"], models[0].get("max_model_len")


def _tail(path: str | None, n: int = 1500) -> str:
    if path is None:
        return "(no log)"
    with open(path, errors="replace") as f:
        return f.read()[-n:]
