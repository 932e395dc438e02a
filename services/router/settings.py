"""Router settings (``PDSERVE_ROUTER_*`` variables or ``--kebab-case`` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from pdserve.config import ServiceSettings


class RouterSettings(ServiceSettings):
    """The front door: gRPC ``Router`` + OpenAI-compatible HTTP on one process."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_ROUTER_")

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    http_host: str = "0.0.0.0"
    http_port: int = Field(
        8000, ge=-1, le=65535, description="OpenAI API, /health; 0 disables, -1 picks a free port"
    )
    api_key: str | None = Field(
        None, description="when set, every call needs 'authorization: Bearer <api_key>'"
    )
    api_keys_file: Path | None = Field(
        None, description="JSON: tenants, their API keys and rate limits (see tenants.py)"
    )
    api_keys: SecretStr | None = Field(None, description="tenant=key[,tenant=key...]")
    tenant_requests_per_minute: int = Field(
        0, ge=0, description="each tenant's default request rate limit; 0: none"
    )
    tenant_tokens_per_minute: int = Field(
        0, ge=0, description="each tenant's default prompt+completion token limit; 0: none"
    )
    api_tls_cert_file: Path | None = Field(
        None, description="certificate of the public gRPC and HTTP APIs; default tls_cert_file"
    )
    api_tls_key_file: Path | None = Field(None, description="its private key")

    # The model: only its tokenizer and fingerprint are used (weights stay memory-mapped).
    model: Path | None = Field(None, description="GGUF file or safetensors dir; default model")
    model_name: str = Field("SmolLM2-135M-Instruct", description="name served on /v1/models")
    dtype: str = Field(
        "auto", description="the workers' dtype: part of the KV fingerprint (auto: as the workers)"
    )
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto",
        description="the workers' quantization (resolved as they do): part of the "
        "KV fingerprint, so the router's block keys match the blocks they publish",
    )
    block_size: int = Field(16, ge=1, le=1024, description="the workers' KV block size, tokens")
    max_model_len: int = Field(8192, ge=2, description="prompt + max_tokens cap, tokens")

    # Policy (see services/router/policy.py for the formulas).
    disagg_threshold_tokens: int = Field(
        128, ge=0, description="prefill on the decode worker when the uncached part is shorter"
    )
    disaggregation_policy: Literal["cost", "threshold"] = Field(
        "cost",
        description="cost: the faster predicted TTFT within the TPOT SLO; threshold: remote "
        "whenever the uncached part reaches disagg_threshold_tokens",
    )
    tpot_slo_s: float = Field(
        0.15, gt=0, description="decode step a local prefill must not push running streams past"
    )
    decode_step_s: float = Field(
        0.05, gt=0, description="prior for a decode worker's step until it reports one"
    )
    handoff_s: float = Field(
        0.02, ge=0, description="fixed cost of a handoff in the TTFT prediction"
    )
    handoff_s_per_token: float = Field(
        0.0, ge=0, description="transfer time per prompt token the layer pipeline does not hide"
    )
    overlap_weight: float = Field(1.0, ge=0, description="weight of the cached-prefix ratio")
    load_weight: float = Field(1.0, ge=0, description="weight of the load ratio")
    max_inflight_requests: int = Field(
        256, ge=1, description="admitted at once by all router replicas together; then 429"
    )
    max_inflight_per_worker: int = Field(64, ge=1, description="the load ratio's denominator")
    prefill_tokens_per_s: float = Field(
        2000.0, gt=0, description="prior for the TTFT prediction; refined by observation"
    )
    default_deadline_s: float = Field(120.0, gt=0, description="when the caller sets none")

    # Resilience.
    prefill_timeout_s: float = Field(60.0, gt=0, description="one Prefill RPC")
    prefill_attempts: int = Field(2, ge=1, description="a failed prefill is retried elsewhere")
    decode_first_chunk_timeout_s: float = Field(
        60.0, gt=0, description="a decode stream silent this long before its first chunk is moved"
    )
    decode_stall_timeout_s: float = Field(
        10.0, gt=0, description="a decode stream silent this long mid-stream is moved"
    )
    migration_limit: int = Field(
        3, ge=0, description="times a request may move to another decode worker mid-stream"
    )

    # Input limits (beyond them: 400 naming the field).
    max_request_bytes: int = Field(4 << 20, ge=1024, description="HTTP request body")
    max_input_chars: int = Field(
        1_000_000, ge=1, description="prompt or all messages' content, before tokenizing"
    )
    max_json_depth: int = Field(32, ge=4, description="nesting of an HTTP JSON body")
    kv_fetch_timeout_s: float = Field(0.0, ge=0, description="passed to decode; 0 = its default")
    overlap_handoff: bool = Field(
        False,
        description="start Decode with Prefill (the decode worker follows the prefill's KV; a "
        "failed prefill cancels both and they start again with another prefill worker)",
    )
    registry_refresh_s: float = Field(0.5, gt=0, description="worker list refresh period")
    affinity_capacity_blocks: int = Field(
        200_000, ge=0, description="block keys remembered per routing decision (LRU)"
    )
    max_message_bytes: int = Field(16 << 20, ge=1 << 20)
    shutdown_grace_s: float = Field(5.0, ge=0)

    # Operator console (/console; services/router/console.py).
    console_max_traces: int = Field(
        1024, ge=1, description="recent traces the console keeps in memory (and lists)"
    )
    console_jaeger_url: str | None = Field(
        None, description="Jaeger UI base URL: the console links each request's trace there"
    )

    @model_validator(mode="after")
    def _check_router(self) -> RouterSettings:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must be non-empty when set")
        if (self.api_tls_cert_file is None) != (self.api_tls_key_file is None):
            raise ValueError("api_tls_cert_file and api_tls_key_file go together")
        return self
