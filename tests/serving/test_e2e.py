"""End to end: the real stack (`pdserve up`'s launcher: Redis, kvstore, 2 prefill, 2 decode,
router as child processes) against the offline engine, the SDK and the official openai package.

One stack for the module; fault-injection tests run last (they kill workers).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import pytest

from pdserve.client import AsyncClient, Client, InvalidArgument
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect
from pdserve.launcher import Stack, StackConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

THRESHOLD = 64
BLOCK_BYTES = 737_280
STACK_ENV = {
    "PDSERVE_ROUTER_DISAGG_THRESHOLD_TOKENS": str(THRESHOLD),
    # The static rule, so that a long prompt is disaggregated on an idle stack (the cost
    # policy would prefill it on the idle decode worker: faster by the handoff).
    "PDSERVE_ROUTER_DISAGGREGATION_POLICY": "threshold",
    "PDSERVE_ROUTER_DECODE_STALL_TIMEOUT_S": "20",
    "PDSERVE_PREFILL_KV_CACHE_BYTES": str(160 * BLOCK_BYTES),
    "PDSERVE_DECODE_KV_CACHE_BYTES": str(400 * BLOCK_BYTES),
    "PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES": str(600 * BLOCK_BYTES),
    "PDSERVE_PREFILL_NUM_THREADS": "1",
    "PDSERVE_DECODE_NUM_THREADS": "1",
    "PDSERVE_LOG_LEVEL": "info",
    # The exact fp32 path, as the offline oracle below: "auto" is int4 with bf16 activations on
    # a CPU with native bf16, whose kernels are not batch-invariant (nor its KV fingerprint).
    "PDSERVE_PREFILL_QUANTIZATION": "none",
    "PDSERVE_DECODE_QUANTIZATION": "none",
    "PDSERVE_ROUTER_QUANTIZATION": "none",
}
LONG_PREFIX = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how knowledge travelled across Europe. "
) * 12
SHARED_PREFIX = (
    "Rivers carve valleys over millions of years, and mountains rise where plates collide. "
) * 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if os.environ.get("PDSERVE_E2E", "1") != "1":
        pytest.skip("PDSERVE_E2E=0")
    config = StackConfig(
        num_prefill=2, num_decode=2, default_ports=False, env=STACK_ENV,
        log_dir=tmp_path_factory.mktemp("stack-logs"), startup_timeout_s=240,
        cluster_name="e2e",
    )  # fmt: skip
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(checkpoint) -> LLMEngine:
    """The offline engine on the exact path, as the stack runs (overrides conftest's)."""
    config = EngineConfig(kv_cache_bytes=96 * BLOCK_BYTES, enable_prefix_caching=False,
                          quantization="none")  # fmt: skip
    return LLMEngine(config, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.grpc_address, timeout_s=120) as c:
        yield c


def greedy(oracle, prompt_ids: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return oracle.generate([prompt_ids], params)[0].token_ids


def worker_ids(stack) -> dict[str, str]:
    """Child name (prefill-0, decode-1, ...) -> registry worker id."""
    registry = WorkerRegistry(connect(stack.redis_url), RedisLayout("e2e"), 10)
    by_port = {int(w.address.rsplit(":", 1)[1]): w.worker_id for w in registry.workers()}
    return {c.name: by_port[c.grpc_port] for c in stack.children if c.grpc_port in by_port}


def test_greedy_tokens_equal_offline_engine_for_1_and_1000_plus_tokens(client, oracle):
    tok = oracle.tokenizer
    long_ids = tok.encode(LONG_PREFIX * 5)[:1100]
    assert len(long_ids) == 1100
    for ids in ([tok.encode("Hello")[0]], long_ids):
        done = client.generate(list(ids), max_tokens=8, temperature=0.0, ignore_eos=True)
        assert done.token_ids == greedy(oracle, list(ids), 8), done.route
        assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 8
        if len(ids) == 1:
            assert not done.route.disaggregated and "< threshold" in done.route.reason
        else:
            assert done.route.disaggregated and done.route.prefill_worker
            assert ">= threshold" in done.route.reason


def test_shared_prefix_prefills_only_the_suffix_on_the_decode_worker_holding_it(client, oracle):
    tok = oracle.tokenizer
    first = client.generate(SHARED_PREFIX + " Question one: who built it?", max_tokens=4,
                            temperature=0.0)  # fmt: skip
    assert first.route.disaggregated
    suffix = " Now a long new question. " + "Describe the workshop in detail. " * 12
    second = client.generate(SHARED_PREFIX + suffix, max_tokens=4, temperature=0.0)
    prefix_tokens = len(tok.encode(SHARED_PREFIX)) // 16 * 16
    assert second.route.decode_worker == first.route.decode_worker
    assert second.usage.cached_tokens >= prefix_tokens - 16, second.route
    assert second.route.uncached_tokens <= second.route.prompt_tokens - prefix_tokens + 32
    ids = tok.encode(SHARED_PREFIX + suffix)
    assert second.token_ids == greedy(oracle, ids, 4)[: len(second.token_ids)]


def test_64_concurrent_streams_all_correct(stack, oracle):
    prompts = [f"Count to ten in language number {i}:" for i in range(8)]
    expected = {p: greedy(oracle, oracle.tokenizer.encode(p), 4) for p in prompts}

    async def one(client, prompt):
        tokens = []
        async for chunk in client.stream(prompt, max_tokens=4, temperature=0.0, ignore_eos=True):
            tokens.extend(chunk.token_ids)
        return prompt, tokens

    async def main():
        async with AsyncClient(stack.grpc_address, timeout_s=240) as client:
            return await asyncio.gather(*(one(client, prompts[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, tokens in results:
        assert tokens == expected[prompt]


def test_official_openai_package_completes_and_streams(stack):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="x", max_retries=0)
    model = api.models.list().data[0].id
    done = api.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                  temperature=0)  # fmt: skip
    assert done.choices[0].text and done.usage.completion_tokens <= 5
    parts = list(api.completions.create(model=model, prompt="The capital of France is",
                                        max_tokens=5, temperature=0, stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in parts if p.choices) == done.choices[0].text
    chat = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
        temperature=0, seed=1,
    )  # fmt: skip
    streamed = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
        temperature=0, seed=1, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content and text


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_logprobs_and_top_logprobs_through_the_router(stack, oracle):
    """Both HTTP flavors: one entry per token, n alternatives each, the greedy token the best
    of them, and the same tokens as the offline engine."""
    prompt = "The capital of France is"
    expected = greedy(oracle, oracle.tokenizer.encode(prompt), 4)

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(stack.http_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    common = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    done = post("/v1/completions", {"prompt": prompt, "logprobs": 2, **common})
    lp = done["choices"][0]["logprobs"]
    assert lp["tokens"] == [oracle.tokenizer.decode([t], skip_special_tokens=False)
                            for t in expected]  # fmt: skip
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) == 2 and chosen <= 0 and chosen == max(top.values())
    chat = post("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                         "logprobs": True, "top_logprobs": 3, **common})  # fmt: skip
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])


def test_bad_input_is_rejected_and_the_stack_stays_healthy(stack, client):
    bad = [
        b'{"prompt": ""}', b'{"prompt": "x" , "max_tokens": -3}', b'{"prompt": 5}',
        b'{"prompt": "x", "model": "nope"}', b"{oops", b'{"prompt": "x", "top_p": 7}',
    ]  # fmt: skip
    for body in bad:
        status, reply = _post(stack.http_url + "/v1/completions", body)
        assert status == 400, (body, reply)
        assert reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    status, reply = _post(stack.http_url + "/v1/chat/completions", b'{"messages": "hi"}')
    assert status == 400
    for kwargs in ({"max_tokens": -1}, {"temperature": -2.0}, {"model": "nope"}):
        with pytest.raises(InvalidArgument):
            client.generate("x", **kwargs)
    with pytest.raises(InvalidArgument, match="context"):
        client.generate("hello " * 9000, max_tokens=4)
    # ignore_eos: an unseeded sample may be EOS first, which would end after one token.
    alive = client.generate("Still alive?", max_tokens=2, ignore_eos=True)
    assert alive.usage.completion_tokens == 2
    with urllib.request.urlopen(stack.http_url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_docs_sdk_examples_run(stack, capsys):
    """The Python examples of the README's serving section, pointed at this stack."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    text = readme.split("\n## Serving:", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    for code in blocks:
        code = code.replace("127.0.0.1:50051", stack.grpc_address)
        code = code.replace("http://127.0.0.1:8000", stack.http_url)
        exec(compile(code, "README.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert "stop" in out or "length" in out


def test_killed_prefill_worker_costs_no_request(stack, client, oracle):
    """Deterministic: both prefill workers idle, the smaller worker id wins the tie. It is
    SIGKILLed while the router still lists it, so the next long request is sent there; the
    failed prefill is retried on the other worker (with the overlapped handoff, the default,
    the decode call that followed it is cancelled and restarted with the retry). Every
    request completes with the offline engine's tokens."""
    ids = worker_ids(stack)
    victim_name = min(("prefill-0", "prefill-1"), key=lambda n: ids[n])
    victim, survivor = ids[victim_name], ids[({"prefill-0", "prefill-1"} - {victim_name}).pop()]
    stack.kill(victim_name)
    prompt = "A request after a crash. " + LONG_PREFIX
    done = client.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert done.token_ids == greedy(oracle, oracle.tokenizer.encode(prompt), 4)
    assert done.route.prefill_worker == survivor and done.route.prefill_attempts == 2
    assert done.route.reason.startswith(f"prefill on {victim} failed (unavailable)")
    for i in range(2):
        prompt = f"Next {i}. " + LONG_PREFIX
        again = client.generate(prompt, max_tokens=2, temperature=0.0, ignore_eos=True)
        assert again.token_ids == greedy(oracle, oracle.tokenizer.encode(prompt), 2)


def test_decode_worker_killed_mid_stream_under_concurrent_streams_loses_nothing(stack, oracle):
    """SIGKILL one decode worker while greedy streams run on both: every stream completes
    with exactly the offline engine's tokens (migrated ones included), and no error. The
    killed worker is the one of a long, disaggregated prompt, so its migration takes the
    prompt's blocks from the KV store, where the prefill worker stored them."""
    ids = worker_ids(stack)
    by_id = {v: k for k, v in ids.items()}
    water = "The water runs over stones and under bridges toward the distant sea. " * 8
    prompts = [f"A river story, never told before. {water}Tell a long story about it."]
    prompts += [f"Tell a long story about river number {i}." for i in range(1, 3)]
    num_tokens = 48
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    done = oracle.generate([oracle.tokenizer.encode(p) for p in prompts], params)
    expected = {p: c.token_ids for p, c in zip(prompts, done, strict=True)}
    workers: dict[str, str] = {}  # prompt -> the decode worker its stream started on
    disaggregated: dict[str, bool] = {}
    migrated = _scrape_migrations(stack)

    async def one(client, prompt, started):
        tokens = []
        async for chunk in client.stream(prompt, max_tokens=num_tokens, temperature=0.0,
                                         ignore_eos=True, timeout_s=300):  # fmt: skip
            if prompt not in workers:  # the route rides the first chunk only
                workers[prompt] = chunk.route.decode_worker
                disaggregated[prompt] = chunk.route.disaggregated
            tokens.extend(chunk.token_ids)
            if len(tokens) >= 4:
                started.set()
        return prompt, tokens

    async def main():
        async with AsyncClient(stack.grpc_address, timeout_s=300) as client:
            events = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(one(client, p, e))
                     for p, e in zip(prompts, events, strict=True)]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 240)
            assert not any(t.done() for t in tasks), "a stream finished before the kill"
            stack.kill(by_id[workers[prompts[0]]])
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for prompt, tokens in results:
        assert tokens == expected[prompt], prompt
    assert disaggregated[prompts[0]]
    moved = [p for p in prompts if workers[p] == workers[prompts[0]]]
    assert _scrape_migrations(stack) - migrated >= len(moved)
    with Client(stack.grpc_address) as client:
        done = client.generate("After the crash", max_tokens=3, ignore_eos=True)
    assert done.usage.completion_tokens == 3


def _scrape_migrations(stack) -> float:
    with urllib.request.urlopen(stack.http_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pdserve_router_migrations_total{")
    )


def test_pdserve_up_colocated_demo_and_clean_sigterm(tmp_path):
    """`pdserve up --prefill 0 --demo` serves, answers the demo, and SIGTERM leaves nothing."""
    import re
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    cluster = f"up{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "up", "--prefill", "0", "--demo", "--http-port", "0",
         "--grpc-port", "0", "--cluster-name", cluster, "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PDSERVE_DECODE_NUM_THREADS": "1"},
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("demo short route:"):  # the last route the demo prints
            break
    output = "\n".join(lines)
    assert "ready" in lines, output
    assert "demo long answer:" in output and "demo short answer:" in output, output
    assert "demo long route: local prefill on decode" in output, output
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]
    assert len(ports) >= 5, output
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            s.bind(("127.0.0.1", port))  # raises if anything still listens there
    leftovers = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PDSERVE_CLUSTER_NAME={cluster}".encode() in environ.read_bytes():
                leftovers.append(environ.parent.name)
        except OSError:
            continue
    assert leftovers == []
