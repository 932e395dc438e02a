"""Decode worker settings (``PDSERVE_DECODE_*`` variables or ``--kebab-case`` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from pdserve.config import ServiceSettings
from pdserve.engine.engine_config import EngineConfig


class DecodeSettings(ServiceSettings):
    """``python -m services.decode``: continuous batching fed by KV blocks from the kvstores."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_DECODE_")

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50071, ge=0, le=65535, description="0 picks a free port")
    http_port: int = Field(9071, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
    advertise_address: str | None = Field(
        None, description="host:port the router dials; default node_id:grpc_port"
    )
    max_message_bytes: int = Field(16 << 20, ge=1 << 20, description="gRPC send/receive limit")

    # The engine (see pdserve.engine.engine_config.EngineConfig).
    model: Path | None = Field(None, description="GGUF file or safetensors dir; default model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    block_size: int = Field(16, ge=1, le=1024, description="KV block size, tokens")
    kv_cache_bytes: int = Field(1 << 30, ge=1, description="the paged KV pool")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoding at once")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="token budget per step (local prefills are chunked to fit)"
    )
    max_model_len: int | None = Field(None, ge=2, description="None: the model's context")
    attention_backend: Literal["auto", "flash", "sdpa", "reference"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="CPU intra-op threads")

    # The handoff.
    kv_fetch_timeout_s: float = Field(
        2.0, gt=0, description="wait this long for a request's KV blocks, then recompute locally"
    )
    kv_fetch_threads: int = Field(4, ge=1, description="concurrent KV fetches")
    kv_transport: Literal["auto", "grpc"] = Field(
        "auto", description="auto: shared memory for a kvstore on this node, else gRPC"
    )
    kv_timeout_s: float = Field(
        10.0, gt=0, description="one kvstore call; a fetch is abandoned after kv_fetch_timeout_s"
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="requests waiting or running at once; more get RESOURCE_EXHAUSTED"
    )
    hbm_publish_interval_s: float = Field(
        1.0, ge=0, description="how often the cached-block inventory goes to Redis; 0 disables"
    )
    shutdown_grace_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _check_decode(self) -> DecodeSettings:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N] (got {self.device!r})")
        return self

    @property
    def address(self) -> str:
        return self.advertise_address or f"{self.node_id}:{self.grpc_port}"

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
