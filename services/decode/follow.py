"""Following a prefill worker's handoff (``Prefill.Handoff``) from the decode worker.

The router starts the Decode call together with the Prefill call; the decode worker then
follows the prefill here: each event names the prompt blocks sealed in the kvstore so far
and the layer groups written to staging slots since the last event (layers.py), the last one
carries the first token. The stream is a plain blocking iterator, run on the
decode worker's fetch pool; ``cancel`` ends it from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from pdserve import wire
from pdserve._proto.pdserve.v1 import prefill_pb2, prefill_pb2_grpc
from pdserve.engine.sampler import SampledToken
from pdserve.tls import ClusterSecurity
from services.decode.layers import StagedLayers


@dataclass(frozen=True)
class HandoffProgress:
    kv: wire.KVSource  # the sealed prefix of the prompt's blocks
    first_token: SampledToken | None = None  # set on the last event
    num_cached_tokens: int | None = None  # the last event: prompt tokens the prefill loaded
    trace: dict[str, str] = field(default_factory=dict)  # the prefill's request span
    layers: tuple[StagedLayers, ...] = ()  # layer groups written since the previous event


class HandoffStream:
    """One Handoff call: iterate for progress; ``cancel`` from any thread."""

    def __init__(self, call, vocab_size: int) -> None:
        self._call = call
        self._vocab_size = vocab_size

    def __iter__(self) -> Iterator[HandoffProgress]:
        for event in self._call:
            kv = wire.kv_source_from_proto(event.kv) or wire.KVSource((), "", "")
            first, num_cached = None, None
            if event.HasField("done"):
                done = event.done
                logprob = done.first_logprob if done.HasField("first_logprob") else None
                first = wire.sampled_token_from_proto(
                    done.first_token_id, logprob, vocab_size=self._vocab_size
                )
                num_cached = done.num_cached_tokens
            trace = wire.trace_from_proto(event.trace) if event.HasField("trace") else {}
            layers = tuple(_staged(group) for group in event.layers)
            yield HandoffProgress(kv, first, num_cached, trace, layers)

    def cancel(self) -> None:
        self._call.cancel()


def _staged(group: prefill_pb2.HandoffLayers) -> StagedLayers:
    return StagedLayers(
        tuple(group.block_keys), tuple(group.slot_offsets), group.layer_start, group.layer_end,
        group.layer_nbytes, tuple(group.checksums),
    )  # fmt: skip


class PrefillFollower:
    """Channels to prefill workers by address (built lazily; thread-safe)."""

    def __init__(
        self, vocab_size: int, security: ClusterSecurity, *, max_message_bytes: int = 16 << 20
    ) -> None:
        self._vocab_size = vocab_size
        self._security = security
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                # Untraced: an intercepted stream is a plain generator, which cannot be
                # cancelled from another thread (a cancelled decode must end its follow now).
                channel = self._security.channel(address, self._options)
                self._channels[address] = channel
        return prefill_pb2_grpc.PrefillStub(channel)

    def follow(
        self, address: str, request_id: str, *, wait_s: float, timeout_s: float
    ) -> HandoffStream:
        request = prefill_pb2.HandoffRequest(request_id=request_id, wait_s=wait_s)
        call = self._stub(address).Handoff(request, timeout=timeout_s)
        return HandoffStream(call, self._vocab_size)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
