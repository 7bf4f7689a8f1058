"""``kvdrive serve``'s settings: one table, read from a YAML file, ``KVDRIVE_<NAME>`` environment
variables and ``--<name>`` flags, in that order of precedence (a flag beats the environment,
which beats the file, which beats the default).

The settings themselves are the table in ``settings.py``. A list (``disk``, ``api_key``)
is a YAML list, a comma-separated variable, or a repeated flag. The resolved settings are
a ``ServeConfig``: frozen sections (model, engine, kv, prefix, server), each value checked
once, where it is read, with an error naming the source and a value that works.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from kvdrive.errors import KvdriveError
from kvdrive.serve.settings import BY_NAME, SETTINGS, parse


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
