"""Decode worker settings (``PDSERVE_DECODE_*`` variables or ``--kebab-case`` flags)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pdserve.config import WorkerSettings

# A decode worker beside prefill workers still prefills what the router keeps local (short
# prompts, long ones while the prefill pool is busy); its prompt chunks then stall every
# running stream for a step, and a 512-token chunk takes 0.6-1.2 s on one CPU core. At 64
# tokens a step its streams' ITL p99 was 0.24-0.30x colocated's at equal or better goodput;
# at 128, 0.42-0.61x (README, "Serving benchmark at equal cores"). The router reads the cap
# from the worker's heartbeat and predicts its local prefills with it. `pdserve up` sets it;
# `pdserve sim` simulates it.
DISAGGREGATED_MAX_NUM_BATCHED_TOKENS = 64


def stack_decode_budget(num_prefill_workers: int) -> int | None:
    """The token budget `pdserve up` gives a decode worker: the cap beside prefill workers,
    None (the engine's own) in a colocated stack."""
    return DISAGGREGATED_MAX_NUM_BATCHED_TOKENS if num_prefill_workers else None


class DecodeSettings(WorkerSettings):
    """``python -m services.decode``: continuous batching fed by KV blocks from the kvstores."""

    model_config = SettingsConfigDict(env_prefix="PDSERVE_DECODE_")

    # The decode SLO a locally prefilled prompt must respect: its chunks are sized from the
    # measured step costs so that a step next to running streams aims to end within
    # target_step_s, growing so that queued prompts are computed within prompt_drain_s.
    engine_defaults: ClassVar[dict[str, Any]] = {"target_step_s": 0.1, "prompt_drain_s": 0.5}

    grpc_port: int = Field(50071, ge=0, le=65535, description="0 picks a free port")
    http_port: int = Field(
        9071, ge=-1, le=65535, description="Prometheus /metrics; 0 disables, -1 picks a free port"
    )

    # The handoff.
    kv_fetch_timeout_s: float = Field(
        2.0, gt=0, description="wait this long for a request's KV blocks, then recompute locally"
    )
    kv_fetch_threads: int = Field(4, ge=1, description="concurrent KV fetches")
    handoff_wait_s: float = Field(
        5.0, gt=0, description="overlapped handoff: wait this long for the prefill to start"
    )
    handoff_timeout_s: float = Field(
        300.0, gt=0, description="overlapped handoff: follow a prefill at most this long"
    )
    kv_transport: Literal["auto", "grpc"] = Field(
        "auto", description="auto: shared memory for a kvstore on this node, else gRPC"
    )
    kv_timeout_s: float = Field(
        10.0, gt=0, description="one kvstore call; a fetch is abandoned after kv_fetch_timeout_s"
    )
    kv_compression: Literal["none", "int8"] = Field(
        "none",
        description="int8: blocks from another node's kvstore cross the wire as int8 with a "
        "scale per layer, K/V and head (lossy; 2-4x fewer bytes); shared memory stays exact",
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="requests waiting or running at once; more get RESOURCE_EXHAUSTED"
    )
    hbm_publish_interval_s: float = Field(
        1.0, ge=0, description="how often the cached-block inventory goes to Redis; 0 disables"
    )
