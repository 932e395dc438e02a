"""Prefill worker settings (``PDSERVE_PREFILL_*`` variables or ``--kebab-case`` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from pdserve.config import ServiceSettings
from pdserve.engine.engine_config import EngineConfig


class PrefillSettings(ServiceSettings):
    """``python -m services.prefill``: batched prompt passes that hand KV blocks to the kvstore."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_PREFILL_")

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50061, ge=0, le=65535, description="0 picks a free port")
    http_port: int = Field(9061, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
    advertise_address: str | None = Field(
        None, description="host:port the router dials; default node_id:grpc_port"
    )
    max_message_bytes: int = Field(16 << 20, ge=1 << 20, description="gRPC send/receive limit")

    # The engine (see pdserve.engine.engine_config.EngineConfig).
    model: Path | None = Field(None, description="GGUF file or safetensors dir; default model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    block_size: int = Field(16, ge=1, le=1024, description="KV block size, tokens")
    kv_cache_bytes: int = Field(1 << 30, ge=1, description="the worker's own paged KV pool")
    max_num_seqs: int = Field(64, ge=1, description="prompts in one batch at most")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="token budget per step (longer prompts are chunked)"
    )
    max_model_len: int | None = Field(None, ge=2, description="None: the model's context")
    attention_backend: Literal["auto", "flash", "sdpa", "reference"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="CPU intra-op threads")

    # The handoff.
    kvstore_address: str = Field(
        "127.0.0.1:50081", description="this node's kvstore (where new blocks are written)"
    )
    kvstore_node_id: str | None = Field(
        None, description="node of that kvstore, sent in KVSource; default node_id"
    )
    kv_transport: Literal["auto", "grpc"] = Field(
        "auto", description="auto: shared memory when the kvstore is on this host, else gRPC"
    )
    kv_timeout_s: float = Field(30.0, gt=0, description="one kvstore call (lookup, get, put)")
    max_queued_requests: int = Field(
        256, ge=1, description="prompts waiting or running at once; more get RESOURCE_EXHAUSTED"
    )
    shutdown_grace_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _check_prefill(self) -> PrefillSettings:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N] (got {self.device!r})")
        if ":" not in self.kvstore_address:
            raise ValueError(f"kvstore_address must be host:port (got {self.kvstore_address!r})")
        return self

    @property
    def address(self) -> str:
        return self.advertise_address or f"{self.node_id}:{self.grpc_port}"

    @property
    def kv_node_id(self) -> str:
        return self.kvstore_node_id or self.node_id

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            attention_backend=self.attention_backend,
            num_threads=self.num_threads,
        )
