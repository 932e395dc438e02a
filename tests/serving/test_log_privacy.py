"""No prompt or completion text in any log line, tracebacks included (their frame locals hold
both), unless ``log_prompts`` is set: the router's core runs its failure paths (a failed
prefill, a decode worker dying mid-stream, an internal error, a refused request) with the
services' JSON and console logging, and the output is searched for the text."""

from __future__ import annotations

import logging

import pytest
import structlog

from pdserve import telemetry
from pdserve.errors import Failure, InternalError, InvalidRequest
from tests.serving.router_fakes import FakeDecode
from tests.serving.test_router_core import make_router, run

PROMPT = "SECRET-PROMPT-7f3a " * 20  # 380 tokens: disaggregated
COMPLETION = "SECRET-COMPLETION-9c1d"


class Leaky(FakeDecode):
    """Sends the marker as text, and fails the way a buggy worker could: with the prompt in
    a local variable and in the exception's message."""

    def __init__(self, follow=None) -> None:
        super().__init__(follow)
        self.crash = False

    async def stream(self, call):
        prompt_text = bytes(call.prompt_token_ids).decode()  # a local a traceback could show
        if self.crash:
            raise RuntimeError(f"cannot decode {prompt_text}")
        async for chunk in super().stream(call):
            yield type(chunk)(chunk.token_ids, COMPLETION, chunk.logprobs, chunk.finish_reason,
                              chunk.usage)  # fmt: skip


@pytest.fixture
def logging_reset():
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, telemetry._HANDLER_MARK, False)]:
        root.removeHandler(handler)
    structlog.reset_defaults()


def _failure_paths() -> None:
    router, clients = make_router(prefill=("p0", "p1"), overlap_handoff=False)
    workers = {w: Leaky(clients._handoff) for w in clients.decode_workers}
    clients.decode_workers = workers
    clients.prefill_workers["p0"].fail = Failure.UNAVAILABLE
    workers["d0"].die_after = 3
    assert len(run(router, prompt=PROMPT)) == 12  # a prefill retry and a migration
    workers["d0"].crash = workers["d1"].crash = True
    with pytest.raises(InternalError):
        run(router, prompt=PROMPT)
    with pytest.raises(InvalidRequest):
        run(router, prompt=PROMPT, max_tokens=10_000)
    try:
        raise ValueError("boom")
    except ValueError:
        prompt_text = PROMPT  # noqa: F841 - a frame local the traceback must not show
        structlog.get_logger("tests").exception("router.example_failure")
        logging.getLogger("grpc.example").exception("a library logs an exception")


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "console"])
def test_no_prompt_or_completion_text_reaches_the_logs(as_json, capsys, logging_reset):
    # Configured here, not in a fixture: the loggers write to the stderr capsys installs.
    telemetry.configure_logging("debug", json=as_json, service="pdserve-router")
    _failure_paths()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "router.migrated" in text and "router.prefill_failed" in text
    assert "Traceback" in text or "exception" in text  # the tracebacks were rendered
    assert "SECRET-PROMPT" not in text and COMPLETION not in text
