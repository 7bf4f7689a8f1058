"""``kvdrive serve``'s settings: one table, read from a YAML file, ``KVDRIVE_<NAME>`` environment
variables and ``--<name>`` flags, in that order of precedence (a flag beats the environment,
which beats the file, which beats the default).

Every setting has one name in all three places: ``max_num_seqs`` in the file,
``KVDRIVE_MAX_NUM_SEQS`` in the environment, ``--max-num-seqs`` on the command line.
Names shared with ``vllm serve`` mean what they mean there. A list (``disk``, ``api_key``)
is a YAML list, a comma-separated variable, or a repeated flag. The resolved settings are
a ``ServeConfig``: frozen sections (model, engine, kv, prefix, server), each value checked
once, where it is read, with an error naming the source and a value that works.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
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
        "groups quantized on the GPU, widened when fetched; the same host and disk bytes hold more tokens; "
        "docs/compression.md)",
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


@dataclass(frozen=True)
class ModelSettings:
    model: str | None
    served_model_name: str | None
    device: str
    dtype: str | None
    max_model_len: int | None
    seed: int

    @property
    def name(self) -> str:
        """What clients send as ``model``."""
        return self.served_model_name or self.model or "smollm2"


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int


@dataclass(frozen=True)
class KVSettings:
    budget: float | str | None  # "auto": the model's measured budget
    gpu_cache_tokens: int | str
    disk: tuple[str, ...]
    disk_gib: float
    host_gib: float | None
    disk_misses: str
    kv_dtype: str = "bf16"

    def __post_init__(self):
        if self.budget is None and (self.disk or self.host_gib):
            raise KvdriveError("disk and host_gib belong to the tiered cache: set budget too (e.g. budget: 2048)")
        if self.budget is None and self.kv_dtype != "bf16":
            raise KvdriveError("kv_dtype is the tiered cache's storage format: set budget too (e.g. budget: 2048)")
        if self.disk and not self.host_gib:
            raise KvdriveError("disk needs host_gib: the pinned host arena in front of the disks (e.g. host_gib: 8)")
        if self.host_gib and not self.disk:
            raise KvdriveError("host_gib sizes the arena in front of disk directories: set disk too, or drop it")

    def tiered(self):
        """The ``TieredConfig`` these settings describe, or None (all KV on the device)."""
        if self.budget is None:
            return None
        from kvdrive.cache.sparse import SparseConfig
        from kvdrive.storage.pool import PoolPath
        from kvdrive.tiered.config import TieredConfig

        disk = tuple(PoolPath(d, int(self.disk_gib * 2**30)) for d in self.disk)
        return TieredConfig(
            SparseConfig(budget=None if self.budget == "auto" else self.budget, sink_tokens=64, window_tokens=256),
            cache_tokens=self.gpu_cache_tokens,
            disk=disk,
            host_bytes=int((self.host_gib or 0) * 2**30),
            disk_misses=self.disk_misses,
            kv_dtype=self.kv_dtype,
        )


@dataclass(frozen=True)
class PrefixSettings:
    prefix_disk: tuple[str, ...]
    prefix_disk_gib: float
    prefix_host_gib: float
    prefix_chunk_tokens: int
    prefix_admit_after: int
    prefix_remote_master: str | None
    prefix_remote_metadata: str
    prefix_remote_protocol: str
    prefix_kv_dtype: str

    @property
    def enabled(self) -> bool:
        return bool(self.prefix_disk) or self.prefix_host_gib > 0 or self.prefix_remote_master is not None

    def config(self):
        """The ``PrefixConfig`` these settings describe, or None (no prefix pool)."""
        if not self.enabled:
            return None
        from kvdrive.prefix.config import RemoteConfig
        from kvdrive.prefix.pool import PrefixConfig
        from kvdrive.storage.pool import PoolPath

        remote = None
        if self.prefix_remote_master is not None:
            remote = RemoteConfig(
                master=self.prefix_remote_master,
                metadata=self.prefix_remote_metadata,
                protocol=self.prefix_remote_protocol,
            )
        return PrefixConfig(
            disks=tuple(PoolPath(d, int(self.prefix_disk_gib * 2**30)) for d in self.prefix_disk),
            host_bytes=int(self.prefix_host_gib * 2**30),
            chunk_tokens=self.prefix_chunk_tokens,
            admit_after=self.prefix_admit_after,
            remote=remote,
            kv_dtype=self.prefix_kv_dtype,
        )


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    api_key: tuple[str, ...]
    log_level: str


SECTIONS = {
    "model": ModelSettings,
    "engine": EngineSettings,
    "kv": KVSettings,
    "prefix": PrefixSettings,
    "server": ServerSettings,
}


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSettings
    engine: EngineSettings
    kv: KVSettings
    prefix: PrefixSettings
    server: ServerSettings
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # name -> where its value came from

    def value(self, name: str):
        return getattr(getattr(self, BY_NAME[name].section), name)

    def as_dict(self) -> dict[str, Any]:
        return {s.name: _plain(self.value(s.name)) for s in SETTINGS}

    def render(self) -> str:
        """The resolved settings as a YAML file, each line saying where its value came from."""
        import json

        lines = ["# kvdrive serve settings (precedence: default < file < environment < flag)"]
        for s in SETTINGS:
            value = self.as_dict()[s.name]
            if s.name == "api_key" and value:
                value = ["<set>"] * len(value)
            text = "null" if value is None else json.dumps(value)  # JSON scalars and lists are YAML
            lines.append(f"{s.name}: {text}".ljust(40) + f"  # {self.sources.get(s.name, 'default')}")
        return "\n".join(lines) + "\n"


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# -- reading values ----------------------------------------------------------------------------


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


def read_file(path: str) -> dict[str, Any]:
    """A YAML file of ``name: value`` lines (the names of ``SETTINGS``)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise KvdriveError(f"cannot read the config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise KvdriveError(f"the config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KvdriveError(f"the config file {path} must be a mapping of setting: value, e.g. 'port: 8000'")
    for key in data:
        if key not in BY_NAME:
            near = difflib.get_close_matches(str(key), BY_NAME, 1)
            raise KvdriveError(
                f"the config file {path}: unknown setting {key!r}"
                + (f"; did you mean {near[0]!r}?" if near else "; kvdrive serve --help lists them")
            )
    return data


def resolve(
    file: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
    file_name: str = "config file",
) -> ServeConfig:
    """Settings from the defaults, then ``file`` (YAML values), ``env`` (``KVDRIVE_<NAME>`` ->
    text) and ``flags`` (name -> value already parsed), each overriding the one before."""
    values = {s.name: s.default for s in SETTINGS}
    sources: dict[str, str] = {}
    for name, raw in (file or {}).items():
        values[name], sources[name] = parse(BY_NAME[name], raw, f"{file_name}: {name}"), f"file {file_name}"
    for s in SETTINGS:
        if s.env in (env or {}):
            values[s.name], sources[s.name] = parse(s, env[s.env], s.env), f"environment {s.env}"
    for name, value in (flags or {}).items():
        values[name], sources[name] = value, f"flag {BY_NAME[name].flag}"
    sections = {sec: cls(**{f.name: values[f.name] for f in fields(cls)}) for sec, cls in SECTIONS.items()}
    return ServeConfig(**sections, sources=sources)
