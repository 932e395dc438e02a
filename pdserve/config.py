"""Settings: one object per process, built once from flags and ``PDSERVE_*`` variables.

Fields every service shares live on :class:`ServiceSettings` and read the same variables in
every process (``PDSERVE_CLUSTER_NAME``, ``PDSERVE_REDIS_URL``, ``PDSERVE_NODE_ID``,
``PDSERVE_LOG_LEVEL``, ...). Each service subclasses it with its own prefix for its own
fields (``PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES``); the prefill and decode workers share
:class:`WorkerSettings` (server and engine fields) under their own prefixes. Settings are frozen and validated when
built; values discovered at run time belong in a state object, not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pdserve.engine.engine_config import EngineConfig

LogLevel = Literal["debug", "info", "warning", "error"]
S = TypeVar("S", bound="ServiceSettings")


def _shared(default: Any, name: str, description: str) -> Any:
    """A field read from ``PDSERVE_<NAME>`` whatever the subclass's prefix."""
    return Field(
        default,
        validation_alias=AliasChoices(name, f"PDSERVE_{name.upper()}"),
        description=description,
    )


def advertised_address(advertise_address: str | None, node_id: str, bound_port: int) -> str:
    """What peers dial: ``advertise_address`` with a port of 0 replaced by the port bound (a
    launcher that lets the service pick a free port), else ``node_id:bound_port``."""
    if not advertise_address:
        return f"{node_id}:{bound_port}"
    host, _, port = advertise_address.rpartition(":")
    return f"{host}:{bound_port}" if port == "0" else advertise_address


class ServiceSettings(BaseSettings):
    """Fields common to every pdserve process."""

    model_config = SettingsConfigDict(
        env_prefix="PDSERVE_", frozen=True, extra="ignore", populate_by_name=True
    )

    cluster_name: str = _shared("pdserve", "cluster_name", "namespace of every Redis key")
    redis_url: str = _shared(
        "redis://127.0.0.1:6379/0",
        "redis_url",
        "control-plane Redis; redis://[:password@]host:port/db, rediss:// for TLS",
    )
    redis_ca_file: Path | None = _shared(None, "redis_ca_file", "CA bundle for rediss://")
    redis_cert_file: Path | None = _shared(
        None, "redis_cert_file", "client certificate for rediss:// (Redis tls-auth-clients)"
    )
    redis_key_file: Path | None = _shared(None, "redis_key_file", "its private key")
    tls_cert_file: Path | None = _shared(
        None, "tls_cert_file", "this service's certificate (PEM, signed by the cluster CA)"
    )
    tls_key_file: Path | None = _shared(None, "tls_key_file", "its private key (PEM)")
    tls_ca_file: Path | None = _shared(
        None, "tls_ca_file", "the cluster CA: set with cert and key, the cluster runs on mTLS"
    )
    tls_server_name: str | None = _shared(
        None, "tls_server_name", "name every service certificate carries; unset: the dialed host"
    )
    cluster_token: SecretStr | None = _shared(
        None, "cluster_token", "without mTLS: shared secret every cluster call must carry"
    )
    node_id: str = _shared(socket.gethostname(), "node_id", "name of this host in the cluster")
    log_level: LogLevel = _shared("info", "log_level", "structlog level")
    log_json: bool | None = _shared(
        None,
        "log_json",
        "JSON log lines; false: human-readable; unset: JSON unless stderr is a TTY",
    )
    log_prompts: bool = _shared(False, "log_prompts", "allow prompt and completion text in logs")
    trace_sampling_ratio: float = _shared(
        1.0, "trace_sampling_ratio", "share of new traces recorded (a sampled parent is kept)"
    )
    trace_dir: Path | None = _shared(
        None, "trace_dir", "local span files when no OTLP endpoint is set; default ./runs/traces"
    )
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "PDSERVE_OTLP_ENDPOINT"
        ),
        description="OTLP gRPC collector (e.g. http://jaeger:4317); unset: local span files",
    )
    port_file: Path | None = _shared(
        None,
        "port_file",
        "once listening, write the ports bound here as JSON: how a launcher learns the free "
        "ports its children chose (pdserve/port_file.py)",
    )
    heartbeat_interval_s: float = _shared(2.0, "heartbeat_interval_s", "registry refresh period")
    heartbeat_ttl_s: float = _shared(10.0, "heartbeat_ttl_s", "a worker silent this long is out")

    @model_validator(mode="after")
    def _check_common(self) -> ServiceSettings:
        if not self.cluster_name or ":" in self.cluster_name:
            raise ValueError(
                f"cluster_name must be non-empty without ':' (got {self.cluster_name!r})"
            )
        if not self.node_id or ":" in self.node_id:
            raise ValueError(f"node_id must be non-empty without ':' (got {self.node_id!r})")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"redis_url must start with redis://, rediss:// or unix:// (got {self.redis_url!r})"
            )
        if not 0.0 <= self.trace_sampling_ratio <= 1.0:
            raise ValueError(
                f"trace_sampling_ratio must be in [0, 1] (got {self.trace_sampling_ratio})"
            )
        tls_files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(tls_files) and not all(tls_files):
            raise ValueError("tls_cert_file, tls_key_file and tls_ca_file go together (mTLS)")
        if (self.redis_cert_file is None) != (self.redis_key_file is None):
            raise ValueError("redis_cert_file and redis_key_file go together")
        if self.cluster_token is not None and not self.cluster_token.get_secret_value().strip():
            raise ValueError("cluster_token must be non-empty when set")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        return self

    @classmethod
    def from_args(cls: type[S], argv: list[str] | None = None, **overrides: Any) -> S:
        """Build from ``--kebab-case`` flags (``argv``, default ``sys.argv[1:]``) over the environment."""
        args = sys.argv[1:] if argv is None else argv
        return cls(
            _cli_parse_args=args, _cli_kebab_case=True, _cli_prog_name=cls.__name__, **overrides
        )


class _EngineEnv(PydanticBaseSettingsSource):
    """The engine's fields from ``<prefix><FIELD>`` variables (``PDSERVE_PREFILL_MODEL``, ...),
    gathered under ``engine``: the names operators set, for a field that is one object."""

    def get_field_value(self, field, field_name):  # the whole source is read in __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        prefix = self.settings_cls.model_config.get("env_prefix", "").upper()
        env = {k.upper(): v for k, v in os.environ.items()}
        found = {
            name: env[prefix + name.upper()]
            for name in _ENGINE_FIELDS
            if prefix + name.upper() in env
        }
        return {"engine": found} if found else {}


_ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


class WorkerSettings(ServiceSettings):
    """Fields of an engine worker (prefill or decode): its gRPC server, and its engine as one
    :class:`~pdserve.engine.engine_config.EngineConfig` (``engine``).

    The engine's fields keep their flat names everywhere an operator sets them:
    ``PDSERVE_<ROLE>_<FIELD>`` variables, ``--kebab-case`` flags, keyword arguments; they are
    gathered into ``engine`` (flags over keywords over variables) over the role's
    ``engine_defaults``. Subclasses set the prefix (``PDSERVE_PREFILL_``, ``PDSERVE_DECODE_``),
    the defaults of ``grpc_port`` and ``http_port``, and add their handoff fields."""

    engine_defaults: ClassVar[dict[str, Any]] = {}  # a role's engine defaults (decode: SLO)

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(ge=0, le=65535, description="0 picks a free port")
    http_port: int = Field(
        ge=-1, le=65535, description="Prometheus /metrics; 0 disables, -1 picks a free port"
    )
    advertise_address: str | None = Field(
        None, description="host:port the router dials (port 0: the one bound); default node_id:port"
    )
    max_message_bytes: int = Field(16 << 20, ge=1 << 20, description="gRPC send/receive limit")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="the engine (pdserve.engine.engine_config.EngineConfig); set its fields by "
        "their own names: --model, --dtype, --quantization, --device, --block-size, "
        "--kv-cache-bytes, --max-num-seqs, --max-num-batched-tokens, --max-model-len, "
        "--attention-backend, --num-threads, --target-step-s, --prompt-drain-s, "
        "--enable-prefix-caching, --seed (or the PDSERVE_<ROLE>_<NAME> variables)",
    )
    shutdown_grace_s: float = Field(5.0, ge=0)
    step_log_path: Path | None = Field(
        None,
        description="append one JSON line per engine step (shape, time, learned step costs): "
        "what `pdserve profile` calibrates the simulator from (pdserve/engine/step_log.py)",
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, _EngineEnv(settings_cls), env_settings, dotenv_settings,
                file_secret_settings)  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _gather_engine(cls, data: Any) -> Any:
        """Flat engine fields (keywords, flags) over ``engine`` (a dict from the variables, or
        an EngineConfig) over the role's defaults, as one dict for EngineConfig."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.get("engine") or {}
        if isinstance(given, EngineConfig):
            given = {name: getattr(given, name) for name in _ENGINE_FIELDS}
        flat = {name: data.pop(name) for name in _ENGINE_FIELDS if name in data}
        data["engine"] = {**cls.engine_defaults, **given, **flat}
        return data

    @classmethod
    def from_args(cls: type[S], argv: list[str] | None = None, **overrides: Any) -> S:
        """``--model X`` and the other engine flags are taken out of ``argv`` here and passed
        as keywords (they are fields of ``engine``); the rest goes to pydantic-settings."""
        parser = argparse.ArgumentParser(add_help=False)
        for name in _ENGINE_FIELDS:
            parser.add_argument("--" + name.replace("_", "-"), dest=name)
        engine_args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        given = {k: v for k, v in vars(engine_args).items() if v is not None}
        return super().from_args(rest, **given, **overrides)

    @property
    def address(self) -> str:
        return self.advertise_address or f"{self.node_id}:{self.grpc_port}"

    def engine_config(self) -> EngineConfig:
        return self.engine


class KVStoreSettings(ServiceSettings):
    """The tiered KV block store daemon (``python -m services.kvstore``)."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_KVSTORE_")

    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50081
    http_port: int = Field(
        9081, ge=-1, le=65535, description="Prometheus /metrics; 0 disables, -1 picks a free port"
    )
    advertise_address: str | None = Field(
        None, description="host:port peers dial (port 0: the one bound); default node_id:port"
    )
    grpc_workers: int = Field(16, ge=1, description="server threads (concurrent RPCs)")
    max_message_bytes: int = Field(64 << 20, ge=1 << 20, description="gRPC send/receive limit")
    chunk_bytes: int = Field(
        4 << 20, ge=1024, description="bytes per streamed chunk (a 2 MiB block: one message)"
    )

    # KV geometry: by default the store learns its block size from the model the workers
    # serve (the same variables as the prefill worker), so a model or dtype change follows.
    block_size_bytes: int | None = Field(
        None,
        gt=0,
        description="every block is exactly this long; unset: from model/dtype/block_size",
    )
    model: Path | None = Field(
        None,
        validation_alias=AliasChoices("model", "PDSERVE_KVSTORE_MODEL", "PDSERVE_PREFILL_MODEL"),
        description="the served model (GGUF or safetensors dir); default model when unset",
    )
    dtype: str = Field(
        "auto",
        validation_alias=AliasChoices("dtype", "PDSERVE_KVSTORE_DTYPE", "PDSERVE_PREFILL_DTYPE"),
        description="the workers' dtype (EngineConfig validates it); auto: bf16 on CUDA, fp32 on CPU",
    )
    block_size: int = Field(
        16,
        ge=1,
        le=1024,
        validation_alias=AliasChoices(
            "block_size", "PDSERVE_KVSTORE_BLOCK_SIZE", "PDSERVE_PREFILL_BLOCK_SIZE"
        ),
        description="KV block size, tokens",
    )
    quantization: str = Field(
        "auto",
        validation_alias=AliasChoices(
            "quantization", "PDSERVE_KVSTORE_QUANTIZATION", "PDSERVE_PREFILL_QUANTIZATION"
        ),
        description="the workers' weight quantization (it decides the KV dtype)",
    )
    device: str = Field(
        "auto",
        validation_alias=AliasChoices("device", "PDSERVE_KVSTORE_DEVICE", "PDSERVE_PREFILL_DEVICE"),
        description="the workers' device (it decides the KV dtype)",
    )
    hbm_capacity_bytes: int = Field(0, ge=0, description="CUDA tier; ignored without CUDA")
    dram_capacity_bytes: int = Field(1 << 30, ge=0, description="host pool, preallocated")
    ssd_capacity_bytes: int = Field(0, ge=0, description="0 disables the SSD tier")
    ssd_dir: Path | None = Field(None, description="SSD tier directory (required when enabled)")
    ssd_fsync: bool = Field(
        False, description="fsync each block file (checksums catch torn writes anyway)"
    )
    staging_blocks: int = Field(
        128, ge=1, description="blocks being written at once (one prefill step of 512 tokens = 32)"
    )
    staging_timeout_s: float = Field(
        30.0, gt=0, description="an unsealed block is dropped after this"
    )
    shm_enabled: bool = Field(
        True, description="put the DRAM pool in shared memory for same-host peers"
    )
    shm_dir: Path = Field(Path("/dev/shm"), description="where the shared segment lives")

    default_lease_ms: int = Field(30_000, gt=0)
    max_lease_ms: int = Field(600_000, gt=0)

    event_stream_maxlen: int = Field(
        1_000_000, gt=0, description="approximate MAXLEN of the KV event stream"
    )
    event_buffer_max: int = Field(100_000, gt=0, description="events held while Redis is down")
    shutdown_grace_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _check_kvstore(self) -> KVStoreSettings:
        if self.block_size_bytes is None:  # resolved once, here; frozen from now on
            from pdserve.engine.llm_engine import kv_block_nbytes

            engine = EngineConfig(
                model=self.model, dtype=self.dtype, block_size=self.block_size,
                quantization=self.quantization, device=self.device,
            )  # fmt: skip
            object.__setattr__(self, "block_size_bytes", kv_block_nbytes(engine))
        if self.ssd_capacity_bytes and self.ssd_dir is None:
            raise ValueError("ssd_dir is required when ssd_capacity_bytes > 0")
        for name in ("hbm_capacity_bytes", "dram_capacity_bytes", "ssd_capacity_bytes"):
            value = getattr(self, name)
            if 0 < value < self.block_size_bytes:
                raise ValueError(
                    f"{name} ({value}) is below one block ({self.block_size_bytes} bytes)"
                )
        if self.chunk_bytes + (64 << 10) > self.max_message_bytes:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must fit in max_message_bytes ({self.max_message_bytes})"
            )
        if self.default_lease_ms > self.max_lease_ms:
            raise ValueError("default_lease_ms must not exceed max_lease_ms")
        return self

    @property
    def address(self) -> str:
        return self.advertise_address or f"{self.node_id}:{self.grpc_port}"
