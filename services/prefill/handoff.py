"""Pipelined KV handoff: new blocks go to the kvstore one layer at a time while later layers
are still computing.

Lifecycle of one engine step's blocks::

    begin_step (engine thread, after layer 0 wrote its KV)  → one BlockWriter opened
    write_layer(l) for every layer (engine thread copies the layer's slices; the writer
        thread writes them at byte offset l * layer_nbytes and hashes them in order)
    end_step → each block sealed with the xxh3-64 of all its layers, the writer closed,
        each block's future resolved: True = stored (or already there), False = not stored

Layer groups (the layer pipeline's other half): with a shared-memory writer, each time the
layers written reach a group boundary (every ``group_layers`` layers, and the last layer) the
writer thread calls the step's ``on_layers`` with a :class:`LayerGroup`: the blocks, their
staging slots in the store's segment, the layer range now written, and with the last group
each block's checksum. A decode worker on this host copies those layers while the next ones
compute, so after the last layer only the last group remains to move.

Invariants:
- The engine thread only copies bytes and enqueues; it never waits on the kvstore.
- One writer thread, one queue: a step's items are handled in order, so a block is sealed
  only after its last layer was written, and steps never interleave.
- ``inflight(key)`` is the future of a block some step is writing now: a second request
  that needs the same block waits on it instead of writing it twice (the kvstore refuses
  two writers of one key).

Telemetry: each step is one ``kv.put`` span (bytes, blocks, tier, transport, node), child of
the first request's span in ``trace_contexts`` and linked to the others'; its context rides
the Put stream's metadata and header, so the kvstore's spans join the request's trace.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import structlog
import xxhash
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import metrics
from pdserve.kv.transport import BlockWriter, KVTransport
from pdserve.telemetry import Attr, extract_context, get_tracer, inject_context, links_from

log = structlog.get_logger(__name__)
tracer = get_tracer(__name__)
TraceContexts = Sequence[Mapping[str, str]]
_STOP = object()


class HandoffStats:
    def __init__(self) -> None:
        self.num_blocks_stored = 0
        self.num_blocks_failed = 0
        self.num_bytes_written = 0


@dataclass(frozen=True)
class LayerGroup:
    """Layers ``[layer_start, layer_end)`` of these blocks are in their staging slots."""

    keys: tuple[bytes, ...]
    slot_offsets: tuple[int, ...]  # byte offset of each block's slot in the store's segment
    layer_start: int
    layer_end: int
    checksums: tuple[int, ...] = ()  # with the last layer: xxh3-64 of each whole block

    def subset(self, wanted: set[bytes]) -> LayerGroup | None:
        """The same group for the blocks in ``wanted`` only (None: none of them)."""
        picked = [i for i, key in enumerate(self.keys) if key in wanted]
        if not picked:
            return None
        return LayerGroup(
            tuple(self.keys[i] for i in picked), tuple(self.slot_offsets[i] for i in picked),
            self.layer_start, self.layer_end, tuple(self.checksums[i] for i in picked)
            if self.checksums else (),
        )  # fmt: skip


OnLayers = Callable[[LayerGroup], None]


class _Step:
    def __init__(
        self, keys: list[bytes], trace_contexts: TraceContexts, on_layers: OnLayers | None = None
    ) -> None:
        self.keys = keys
        self.on_layers = on_layers
        self.layers_announced = 0  # layers [0, layers_announced) went to on_layers
        self.trace_contexts = list(trace_contexts)
        self.span: trace.Span | None = None
        self.hashers = [xxhash.xxh3_64() for _ in keys]
        self.futures: list[Future] = [Future() for _ in keys]
        self.writer: BlockWriter | None = None
        self.error: Exception | None = None
        self.transport = "grpc"
        self.num_bytes = 0
        self.started = time.perf_counter()


class KVHandoff:
    """Writes blocks to one kvstore from a dedicated thread. See the module docstring."""

    def __init__(
        self,
        transport: Callable[[], KVTransport],
        layer_nbytes: int,
        *,
        node_id: str = "",
        num_layers: int = 1,
        group_layers: int = 1,
    ) -> None:
        """``group_layers``: layers per announced group (``num_layers``: one per step)."""
        self._transport = transport  # returns a live transport or raises
        self._node_id = node_id  # the kvstore's node (span attribute)
        self._layer_nbytes = layer_nbytes
        self._num_layers = num_layers
        self._group_layers = max(1, group_layers)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: dict[bytes, Future] = {}
        self._lock = threading.Lock()
        self._current: _Step | None = None  # engine thread's view
        self.stats = HandoffStats()
        self._thread = threading.Thread(target=self._run, name="kv-handoff", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def inflight(self, key: bytes) -> Future | None:
        with self._lock:
            return self._inflight.get(key)

    # ---- engine thread ----

    def begin_step(
        self,
        keys: Sequence[bytes],
        trace_contexts: TraceContexts = (),
        on_layers: OnLayers | None = None,
    ) -> list[Future]:
        """Start writing these blocks (all computed in the current step); their futures.

        ``trace_contexts``: the requests the blocks belong to (the first is the span parent).
        ``on_layers``: told of each layer group written (writer thread; must not block)."""
        step = _Step(list(keys), trace_contexts, on_layers)
        with self._lock:
            for key, fut in zip(step.keys, step.futures, strict=True):
                self._inflight[key] = fut
        self._current = step
        self._queue.put(("begin", step))
        return step.futures

    def write_layer(self, layer: int, payloads: Sequence[bytes]) -> None:
        """One layer's slice of each block of the current step, in ``begin_step`` order."""
        self._queue.put(("layer", self._current, layer, payloads))

    def end_step(self) -> None:
        """Every layer was written: seal the blocks."""
        step, self._current = self._current, None
        if step is not None:  # nothing begun this step: nothing to seal
            self._queue.put(("end", step))

    def abort_step(self) -> None:
        """The step failed part-way: drop its unsealed blocks."""
        step, self._current = self._current, None
        if step is not None:
            step.error = step.error or RuntimeError("the engine step failed")
            self._queue.put(("end", step))

    def put_whole(
        self, blocks: Sequence[tuple[bytes, bytes]], trace_contexts: TraceContexts = ()
    ) -> list[Future]:
        """Whole blocks (cached in the engine but absent from the kvstore), written as a step."""
        futures = self.begin_step([k for k, _ in blocks], trace_contexts)
        step = self._current
        self._current = None
        self._queue.put(("whole", step, [data for _, data in blocks]))
        return futures

    # ---- writer thread ----

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            kind, step = item[0], item[1]
            try:
                if kind == "begin":
                    self._open(step)
                elif kind == "layer":
                    self._write_layer(step, item[2], item[3])
                elif kind == "whole":
                    self._open(step)
                    self._write_whole(step, item[2])
                    self._finish(step)
                else:
                    self._finish(step)
            except Exception as exc:  # noqa: BLE001 - a failed write is a miss downstream
                if step.error is None:
                    log.warning("prefill.handoff_failed", error=str(exc), num_blocks=len(step.keys))
                step.error = step.error or exc
                if kind in ("end", "whole"):
                    self._finish(step)

    def _open(self, step: _Step) -> None:
        if step.error is not None:
            return
        parent, *others = step.trace_contexts or [{}]
        step.span = tracer.start_span(
            "kv.put",
            context=extract_context(parent),
            links=links_from(*others),
            attributes={
                Attr.KV_DIRECTION: "put", Attr.KV_NODE: self._node_id,
                Attr.KV_BLOCKS: len(step.keys),
            },
        )  # fmt: skip
        with trace.use_span(step.span, end_on_exit=False):  # the Put RPC's parent
            transport = self._transport()
            step.transport = transport.kind
            step.writer = transport.open_writer(skip_existing=True, trace_context=inject_context())
            step.writer.reserve(step.keys)  # shared memory: one round trip for the whole step

    def _write_layer(self, step: _Step, layer: int, payloads: Sequence[bytes]) -> None:
        if step.error is not None or step.writer is None:
            return
        offset = layer * self._layer_nbytes
        for key, hasher, data in zip(step.keys, step.hashers, payloads, strict=True):
            step.writer.write(key, offset, data)
            hasher.update(data)
            step.num_bytes += len(data)
        end = layer + 1
        if step.on_layers is not None and (
            end % self._group_layers == 0 or end == self._num_layers
        ):
            self._announce(step, end)

    def _announce(self, step: _Step, end: int) -> None:
        """Tell the step's listener that layers up to ``end`` of its staged blocks are written
        (only blocks with a shared-memory slot: nobody else can read them before the seal)."""
        placed = [
            (i, offset)
            for i, key in enumerate(step.keys)
            if (offset := step.writer.slot_offset(key)) is not None
        ]
        start, step.layers_announced = step.layers_announced, end
        if not placed:
            return
        checksums = ()
        if end == self._num_layers:  # every layer hashed: the checksums the seal will carry
            checksums = tuple(step.hashers[i].intdigest() for i, _ in placed)
        group = LayerGroup(
            tuple(step.keys[i] for i, _ in placed), tuple(o for _, o in placed), start, end,
            checksums,
        )  # fmt: skip
        try:
            step.on_layers(group)
        except Exception:  # noqa: BLE001 - a listener's bug must not fail the kvstore write
            log.exception("prefill.layer_listener_failed")

    def _write_whole(self, step: _Step, payloads: Sequence[bytes]) -> None:
        if step.error is not None or step.writer is None:
            return
        for key, hasher, data in zip(step.keys, step.hashers, payloads, strict=True):
            step.writer.write(key, 0, data)
            hasher.update(data)
            step.num_bytes += len(data)

    def _finish(self, step: _Step) -> None:
        ok = False
        try:
            if step.error is None and step.writer is not None:
                for key, hasher in zip(step.keys, step.hashers, strict=True):
                    step.writer.seal(key, hasher.intdigest())
                result = step.writer.close()
                ok = True
                self._observe(step, result.tiers)
        except Exception as exc:  # noqa: BLE001
            with _current(step.span):
                log.warning("prefill.handoff_failed", error=str(exc), num_blocks=len(step.keys))
            step.error = exc
        finally:
            if not ok and step.writer is not None:
                step.writer.abort()
            self._end_span(step)
            self._resolve(step, ok)

    def _end_span(self, step: _Step) -> None:
        if step.span is None:
            return
        step.span.set_attribute(Attr.KV_TRANSPORT, step.transport)
        if step.error is not None:
            step.span.record_exception(step.error)
            step.span.set_status(Status(StatusCode.ERROR, f"kv put failed: {step.error}"))
        step.span.end()

    def _observe(self, step: _Step, tiers) -> None:
        self.stats.num_bytes_written += step.num_bytes
        labels = ("put", step.transport, tiers[0].label if tiers else "dram")
        if step.span is not None:
            step.span.set_attributes({Attr.KV_BYTES: step.num_bytes, Attr.KV_TIER: labels[2]})
        metrics.KV_TRANSFER_BYTES.labels(*labels).inc(step.num_bytes)
        metrics.KV_TRANSFER_BLOCKS.labels(*labels).inc(len(tiers))
        metrics.KV_TRANSFER_DURATION.labels(*labels).observe(time.perf_counter() - step.started)

    def _resolve(self, step: _Step, ok: bool) -> None:
        with self._lock:
            for key, fut in zip(step.keys, step.futures, strict=True):
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
        for fut in step.futures:
            fut.set_result(ok)
        if ok:
            self.stats.num_blocks_stored += len(step.keys)
        else:
            self.stats.num_blocks_failed += len(step.keys)


def _current(span: trace.Span | None):
    """Make ``span`` current (for log lines); a no-op context when there is none."""
    return trace.use_span(span or trace.INVALID_SPAN, end_on_exit=False)
