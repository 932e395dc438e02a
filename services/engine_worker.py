"""What the prefill and decode workers share: the engine, the thread that drives it, the job
table, the load snapshot and the heartbeat that publishes it.

Lifecycle: constructed (engine built, load published once) → ``start`` (engine thread,
heartbeat) → serving → ``stop`` (heartbeat deregisters, the engine thread ends after
shutting its jobs down, then the subclass's ``_close``).

Invariants:
- One thread (``engine-<role>``) drives the engine. Other threads hand it closures through
  ``_inbox.call_soon`` and never touch the engine themselves.
- ``_jobs`` maps request ids to the subclass's jobs; it is read and written under ``_lock``
  (from any thread); ``_snapshot_jobs`` copies it for iteration.
- ``load`` is replaced, never mutated, by the engine thread after every iteration; the
  heartbeat and the Stats RPC read the latest one.

The registry is passed in (a Redis ``WorkerRegistry`` in a service, a dict in tests), and
so are the subclasses' transports, so the workers' logic runs without Redis or gRPC.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import structlog

from pdserve import metrics
from pdserve.config import WorkerSettings
from pdserve.engine import step_log
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.kv.metadata import Heartbeat, WorkerInfo
from pdserve.model.loader import Checkpoint
from services.engine_inbox import EngineInbox

log = structlog.get_logger(__name__)


class OverloadedError(RuntimeError):
    """Too many requests in the worker; the caller should retry elsewhere (RESOURCE_EXHAUSTED)."""


class Registry(Protocol):
    """What a heartbeat needs of the worker registry (pdserve.kv.metadata.WorkerRegistry)."""

    def heartbeat(self, info: WorkerInfo) -> None: ...
    def deregister(self, worker_id: str) -> None: ...


class EngineWorker(abc.ABC):
    """The engine loop of a worker: drain the inbox, run the subclass's housekeeping, step the
    engine (or wait for work), publish the load."""

    role: str  # "prefill" | "decode": the registry role, thread name and log prefix

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        checkpoint: Checkpoint | None,
        worker_id: str,
        address: str,
        registry: Registry,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.address = address
        self.engine = LLMEngine(settings.engine_config(), checkpoint=checkpoint)
        self.block_size = settings.engine.block_size
        self._jobs: dict[str, object] = {}
        self._lock = threading.Lock()
        self._inbox = EngineInbox()
        self._last_step_ms = 0.0
        # Opt-in record of every step (pdserve profile calibrates the simulator from it).
        self._step_log = (
            step_log.StepLogWriter(settings.step_log_path) if settings.step_log_path else None
        )
        self._step_plan = None  # the plan of the step in progress, while logging
        self._slept = False  # the loop slept since the last step (step log)
        self._publish_load()
        self._heartbeat = Heartbeat(registry, self.worker_info, settings.heartbeat_interval_s)
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.role}", daemon=True)

    # ---- lifecycle (any thread) ----

    def start(self) -> None:
        self._thread.start()
        self._heartbeat.start()

    def stop(self) -> None:
        self._heartbeat.stop(deregister=True)
        self._inbox.close()
        self._thread.join(10)
        if self._step_log is not None:
            self._step_log.close()
        self._close()

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release what the subclass holds (pools, transports), after the engine thread ended."""

    # ---- the registry entry ----

    def worker_info(self) -> WorkerInfo:
        """This worker's registry entry: role, capacity, and load from the last snapshot."""
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            address=self.address,
            node_id=self.settings.node_id,
            capacity=self._capacity(),
            load={**self._load_fields(), **self.engine.cost_report()},
        )

    @abc.abstractmethod
    def _capacity(self) -> dict[str, int]: ...

    def _load_fields(self) -> dict[str, float]:
        """The load part of the registry entry, from ``self.load`` (both roles' snapshots carry
        these fields; a role adds its own)."""
        load = self.load
        return {
            "running": load.running,
            "waiting": load.waiting,
            "num_free_blocks": load.num_free_blocks,
            "step_ms": round(load.step_ms, 3),
            "pending_prompt_tokens": load.pending_prompt_tokens,
        }

    # ---- the job table (any thread) ----

    def _register(self, request_id: str, job: object) -> None:
        """Add a job; ValueError for a duplicate id, OverloadedError past max_queued_requests."""
        with self._lock:
            if request_id in self._jobs:
                raise ValueError(f"request_id {request_id!r} is already in use")
            num_active = self._num_active()
            if num_active >= self.settings.max_queued_requests:
                raise OverloadedError(f"{num_active} requests in progress (max_queued_requests)")
            self._jobs[request_id] = job
            self._on_registered()

    def _num_active(self) -> int:
        """Requests counted against max_queued_requests (caller holds ``_lock``)."""
        return len(self._jobs)

    def _on_registered(self) -> None:  # noqa: B027 - optional hook
        """A job was added (caller holds ``_lock``)."""

    def _snapshot_jobs(self) -> list:
        with self._lock:
            return list(self._jobs.values())

    # ---- engine thread ----

    def _run(self) -> None:
        while not self._inbox.closed:
            self._inbox.drain()
            self._expire()
            if self.engine.has_unfinished:
                self._step()
            if not self.engine.has_unfinished or self.engine.last_step_was_empty:
                self._inbox.wait(self._idle_wait_s())
                self._slept = True
            self._publish_load()
            self._after_iteration()
        self._shut_down_jobs()

    def _step(self) -> None:
        logging = self._step_log is not None
        started_wall_s, start = time.time(), time.perf_counter()
        try:
            outputs = self.engine.step(
                on_layer_done=self._logged_layer_done if logging else self._on_layer_done
            )
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception(f"{self.role}.step_failed")
            self._step_failed(exc)
            return
        step_s = time.perf_counter() - start
        if logging and self._step_plan is not None:
            self._step_log.write(step_log.record_of(self._step_plan, started_wall_s, step_s,
                                                    self._slept, self.engine.step_costs,
                                                    self.role))  # fmt: skip
            self._step_plan, self._slept = None, False
        metrics.STEP_DURATION.labels(self._step_phase()).observe(step_s)
        self._last_step_ms = step_s * 1000
        self._on_outputs(outputs)

    def _idle_wait_s(self) -> float:
        """How long the idle loop may sleep before its housekeeping is due again."""
        return 0.05

    def _after_iteration(self) -> None:  # noqa: B027 - optional hook
        """Periodic work after the load is published (engine thread; must not block)."""

    def _on_layer_done(self, layer: int, plan) -> None:  # noqa: B027 - optional hook
        """Called by the engine as each layer of a step finishes."""

    def _logged_layer_done(self, layer: int, plan) -> None:
        """``_on_layer_done``, keeping the step's plan for the step log."""
        self._step_plan = plan
        self._on_layer_done(layer, plan)

    def _step_phase(self) -> str:
        """The step-duration metric's label for the step that just ran."""
        return self.role

    @abc.abstractmethod
    def _expire(self) -> None:
        """Deadlines and timeouts due now (engine thread)."""

    @abc.abstractmethod
    def _step_failed(self, error: Exception) -> None:
        """The step raised: fail the requests it was running."""

    @abc.abstractmethod
    def _on_outputs(self, outputs: Sequence[RequestOutput]) -> None: ...

    @abc.abstractmethod
    def _publish_load(self) -> None:
        """Replace ``self.load`` with a snapshot and set the load gauges."""

    @abc.abstractmethod
    def _shut_down_jobs(self) -> None:
        """The worker is stopping: abort every job still in the table."""
