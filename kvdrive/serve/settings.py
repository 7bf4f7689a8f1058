"""The table of ``kvdrive serve``'s settings: each one's name, section, type, default, bounds
and help, and ``parse``, which reads a raw value (environment or flag text, or a YAML value) as
its type.

Every setting has one name in all three places: ``max_num_seqs`` in the file,
``KVDRIVE_MAX_NUM_SEQS`` in the environment, ``--max-num-seqs`` on the command line.
Names shared with ``vllm serve`` mean what they mean there; ``kvdrive serve --help`` is
built from this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvdrive.errors import KvdriveError

DTYPES = ("float32", "bfloat16", "float16")
DISK_MISSES = ("wait", "defer")  # TieredConfig.disk_misses' choices, spelled here: importing it loads torch
KV_DTYPES = ("bf16", "fp8", "int8", "int4")  # kvdrive.quant.formats.KV_DTYPES, spelled here for the same reason
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class Setting:
    name: str
    section: str
    kind: str  # str | int | float | choice | list | count_or_auto | float_or_auto
    default: Any
    help: str
    low: float | None = None  # smallest value (numbers)
    high: float | None = None
    choices: tuple[str, ...] = ()
    example: str = ""

    @property
    def env(self) -> str:
        return "KVDRIVE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    # model
    Setting(
        "model",
        "model",
        "str",
        None,
        "model to serve: smollm2 (default), gemma3, a .gguf file, a Hugging Face "
        "directory or random:PRESET (as kvdrive generate -m)",
        example="smollm2",
    ),
    Setting(
        "served_model_name",
        "model",
        "str",
        None,
        "the name clients send as `model` (default: the model spec)",
        example="smollm2",
    ),
    Setting("device", "model", "str", "auto", "cpu, cuda, cuda:N or auto (CUDA when present)", example="cuda"),
    Setting(
        "dtype",
        "model",
        "choice",
        None,
        "weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)",
        choices=DTYPES,
    ),
    Setting(
        "max_model_len",
        "model",
        "int",
        None,
        "prompt + output tokens of one request (default: the model's context); each sequence's KV is sized for it",
        low=1,
        example="8192",
    ),
    Setting("seed", "model", "int", 0, "seed of random:PRESET weights", low=0, example="0"),
    # engine
    Setting(
        "max_num_seqs",
        "engine",
        "int",
        16,
        "sequences decoding at once (fewer if memory holds fewer); more requests wait",
        low=1,
        example="16",
    ),
    Setting(
        "max_num_batched_tokens",
        "engine",
        "int",
        2048,
        "tokens one engine step runs, decode and prefill "
        "together: a long prompt is prefilled in chunks of what is left between decode steps, "
        "each at most this many tokens (larger: faster prefill, longer gaps for running streams)",
        low=1,
        example="2048",
    ),
    Setting(
        "max_waiting",
        "engine",
        "int",
        256,
        "requests that may wait for a sequence slot; more are answered 429 with Retry-After",
        low=0,
        example="256",
    ),
    # kv: the tiered cache
    Setting(
        "budget",
        "kv",
        "float_or_auto",
        None,
        "turns on the tiered cache: tokens attended per decode step, a fraction of the context "
        "if < 1, or auto (the model's measured budget: 0.375 for SmolLM2, 0.5 otherwise; docs/eval.md) "
        "(default: all KV on the device, exact attention)",
        low=0,
        example="auto",
    ),
    Setting(
        "gpu_cache_tokens",
        "kv",
        "count_or_auto",
        "auto",
        "GPU selection cache per sequence and layer, in tokens, or auto (80% of the free GPU memory)",
        example="8192",
    ),
    Setting(
        "disk",
        "kv",
        "list",
        (),
        "keep the KV on these directories too (striped); needs host_gib",
        example="/mnt/nvme/kv",
    ),
    Setting("disk_gib", "kv", "float", 64.0, "disk budget per disk directory, GiB", low=0, example="64"),
    Setting("host_gib", "kv", "float", None, "pinned host arena in front of the disks, GiB", low=0, example="8"),
    Setting(
        "disk_misses",
        "kv",
        "choice",
        "wait",
        "selected groups only on disk: wait (exact) or defer (attend without them this step)",
        choices=DISK_MISSES,
    ),
    Setting(
        "kv_dtype",
        "kv",
        "choice",
        "bf16",
        "storage format of the tiered cache's host and disk tiers: bf16 (the model dtype), fp8, int8 or int4 (full "
        "groups quantized on the GPU, widened when fetched; the same host and disk bytes hold ~1.6x (fp8, int8) "
        "or ~2.6x (int4) the tokens; int8 is the most accurate per byte; docs/compression.md)",
        choices=KV_DTYPES,
        example="fp8",
    ),
    # prefix pool
    Setting(
        "prefix_disk",
        "prefix",
        "list",
        (),
        "prefix pool directories: repeated prompt prefixes load their KV from here instead of being recomputed",
        example="/mnt/nvme/prefix",
    ),
    Setting("prefix_disk_gib", "prefix", "float", 64.0, "prefix pool budget per directory, GiB", low=0, example="64"),
    Setting(
        "prefix_host_gib",
        "prefix",
        "float",
        0.0,
        "prefix pool's pinned host arena, GiB (with no directory: a host-only pool)",
        low=0,
        example="4",
    ),
    Setting("prefix_chunk_tokens", "prefix", "int", 256, "tokens per stored prefix chunk", low=1, example="256"),
    Setting(
        "prefix_admit_after",
        "prefix",
        "int",
        2,
        "stores of a chunk before it is written to disk (1: at once)",
        low=1,
        example="2",
    ),
    Setting(
        "prefix_remote_master",
        "prefix",
        "str",
        None,
        "a Mooncake master (host:port) whose store every serving node shares, behind the pool's host arena and "
        "disks (the remote extra; docs/scale-out.md)",
        example="10.0.0.5:50051",
    ),
    Setting(
        "prefix_remote_metadata",
        "prefix",
        "str",
        "P2PHANDSHAKE",
        "the transfer engine's metadata server of that store (http://host:port/metadata) or P2PHANDSHAKE",
        example="http://10.0.0.5:8080/metadata",
    ),
    Setting(
        "prefix_remote_protocol",
        "prefix",
        "choice",
        "tcp",
        "how the remote store's bytes move",
        choices=("tcp", "rdma"),
        example="tcp",
    ),
    Setting(
        "prefix_kv_dtype",
        "prefix",
        "choice",
        "bf16",
        "storage format of the pool's chunks: bf16 (the model dtype), fp8, int8 or int4 (quantized when stored, "
        "dequantized when loaded; docs/compression.md)",
        choices=KV_DTYPES,
        example="fp8",
    ),
    # server
    Setting("host", "server", "str", "127.0.0.1", "address to listen on (0.0.0.0: every interface)", example="0.0.0.0"),
    Setting("port", "server", "int", 8000, "port to listen on (0: any free port)", low=0, high=65535, example="8000"),
    Setting(
        "api_key",
        "server",
        "list",
        (),
        "accepted API keys (Authorization: Bearer KEY); none: no key needed. Each key is its own prefix pool tenant",
        example="sk-local",
    ),
    Setting("log_level", "server", "choice", "info", "server log level", choices=LOG_LEVELS),
)
BY_NAME = {s.name: s for s in SETTINGS}


def parse(setting: Setting, raw: Any, source: str):
    """``raw`` (text from the environment or a flag, or a YAML value) as ``setting``'s type;
    a ``KvdriveError`` naming ``source`` and a value that works otherwise."""

    def bad(what: str):
        example = f" (e.g. {setting.example})" if setting.example else ""
        return KvdriveError(f"{source}: {raw!r} is not {what}{example}")

    if raw is None:
        return None
    k = setting.kind
    if k == "list":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in items):
            raise bad("a list of non-empty strings")
        return tuple(i.strip() for i in items)
    if k in ("str", "choice"):
        if not isinstance(raw, str) or not raw:
            raise bad("a non-empty string")
        if k == "choice" and raw not in setting.choices:
            raise bad(f"one of {', '.join(setting.choices)}")
        return raw
    if k in ("count_or_auto", "float_or_auto") and raw == "auto":
        return "auto"
    kind = float if k in ("float", "float_or_auto") else int
    value = _number(raw, kind)
    if (
        value is None
        or (setting.low is not None and (value <= setting.low if kind is float else value < setting.low))
        or (setting.high is not None and value > setting.high)
    ):
        span = (f" > {setting.low:g}" if kind is float else f" >= {setting.low:g}") if setting.low is not None else ""
        span += f" and <= {setting.high:g}" if setting.high is not None else ""
        what = "a finite number" if kind is float else "an integer"
        raise bad(f"{what}{span}" + (" or auto" if k.endswith("_or_auto") else ""))
    return value


def _number(raw, kind):
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        try:
            raw = kind(raw)
        except ValueError:
            return None
    if kind is int and isinstance(raw, int):
        return raw
    if kind is float and isinstance(raw, (int, float)) and math.isfinite(raw):
        return float(raw)
    return None
