"""Prefill worker settings (``PDSERVE_PREFILL_*`` variables or ``--kebab-case`` flags)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from pdserve.config import WorkerSettings


class PrefillSettings(WorkerSettings):
    """``python -m services.prefill``: batched prompt passes that hand KV blocks to the kvstore."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_PREFILL_")

    grpc_port: int = Field(50061, ge=0, le=65535, description="0 picks a free port")
    http_port: int = Field(
        9061, ge=-1, le=65535, description="Prometheus /metrics; 0 disables, -1 picks a free port"
    )

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
    # Opt-in: with both workers on one core the handoff measured 1.07x colocated with 4 groups
    # against 1.04x without (benchmarks/handoff.py, leased pulls): on a shared core an early
    # pull takes the core from the next layers' compute. The default waits for a measurement
    # with the workers on their own cores that favours them.
    handoff_layer_groups: int = Field(
        0, ge=0,
        description="a step's layers are announced to a following decode worker in this many "
        "groups as they are written (1: after its last layer; 0: never, blocks move after "
        "their step's seal)",
    )  # fmt: skip
    max_queued_requests: int = Field(
        256, ge=1, description="prompts waiting or running at once; more get RESOURCE_EXHAUSTED"
    )

    @model_validator(mode="after")
    def _check_prefill(self) -> PrefillSettings:
        if ":" not in self.kvstore_address:
            raise ValueError(f"kvstore_address must be host:port (got {self.kvstore_address!r})")
        return self

    @property
    def kv_node_id(self) -> str:
        return self.kvstore_node_id or self.node_id
