"""The offline engine: `add_request` → `step` (schedule, execute, update) → outputs.

Request lifecycle: added (validated, WAITING) → admitted (blocks allocated, prefix reused) →
running (prefill chunks, then one token per step) → finished (stop, length, abort, error).
Every path to finished releases the request's blocks through `Scheduler.finish`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from pdserve.engine.attention import device_facts
from pdserve.engine.block_hash import BlockKey, chain_block_keys, next_block_key, root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.device_selection import resolve_dtype
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.kv_connector import KVLoad, KVSaver, SaveBlock
from pdserve.engine.layer_copy import make_layer_copier
from pdserve.engine.model_runner import ModelRunner, model_block_nbytes
from pdserve.engine.sampler import SampledToken, Sampler, SamplingRow, make_generator
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerPlan
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.engine.step_costs import StepCosts
from pdserve.kv.blocks import model_block_nbytes as model_block_nbytes_from_file
from pdserve.model.loader import Checkpoint, load_model, load_quantized
from pdserve.model.quant import compute_dtype, resolve_quantization, variant_fingerprint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text_delta: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[SampledToken] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[SampledToken] = field(default_factory=list)


@dataclass
class EngineStats:
    num_prompt_tokens_computed: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def requested_dtype(config: EngineConfig) -> torch.dtype:
    """What `config.dtype` stands for on the engine's device (`auto`: bf16 on CUDA, fp32 on the
    CPU; see `device_selection.default_dtype`)."""
    facts = device_facts(_resolve_device(config.device))
    return _DTYPES[resolve_dtype(config.dtype, facts)]


def kv_dtype(config: EngineConfig) -> torch.dtype:
    """The KV cache dtype of an engine built from `config` (quantized weights compute in bf16)."""
    mode = resolve_quantization(config.quantization, _resolve_device(config.device))
    return compute_dtype(mode, requested_dtype(config))


def kv_block_nbytes(config: EngineConfig) -> int:
    """Bytes of one KV block of the engine `config` describes, from the model's config alone:
    the one geometry the kvstore, the handoff and the engine agree on."""
    name = next(k for k, v in _DTYPES.items() if v == kv_dtype(config))
    return model_block_nbytes_from_file(config.model, name, config.block_size)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        checkpoint: Checkpoint | None = None,
        *,
        kv_saver: KVSaver | None = None,
        progress: bool = False,
    ):
        """`kv_saver` receives every step's completed blocks layer by layer (kv_connector.py);
        `progress` shows a progress bar on stderr while the model loads."""
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = _resolve_device(config.device)
        # Quantized weights compute (and cache KV) in bf16 and give other tokens than the exact
        # path, so their KV blocks carry a fingerprint of their own.
        self.quantization = resolve_quantization(config.quantization, self.device)
        if checkpoint is None:
            checkpoint, linears = load_model(
                config.model, requested_dtype(config), self.quantization, progress=progress
            )
        elif self.quantization == "none":
            if not checkpoint.projections:
                raise ValueError(
                    "the unquantized path needs a checkpoint with its projections "
                    "(loaded with projections=True)"
                )
            linears = None
        else:
            linears = load_quantized(checkpoint, self.quantization)
        self.checkpoint = checkpoint
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.dtype = compute_dtype(self.quantization, requested_dtype(config))
        self.fingerprint = variant_fingerprint(checkpoint.fingerprint, self.quantization)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.block_bytes = model_block_nbytes(self.model_config, config.block_size, self.dtype)
        num_blocks = max(1, config.kv_cache_bytes // self.block_bytes)
        self.runner = ModelRunner(
            self.model_config,
            self.checkpoint.weights,
            num_blocks,
            config.block_size,
            self.device,
            self.dtype,
            None if config.attention_backend == "auto" else config.attention_backend,
            linears,
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.sampler = Sampler(config.seed)
        self.stats = EngineStats()
        self.step_costs = StepCosts()
        # The last step scheduled nothing: what runs the engine should wait for news (a KV load
        # committing, a new request) rather than step again at once.
        self.last_step_was_empty = False
        self._requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._request_ids = itertools.count()
        self.kv_saver = kv_saver
        # First tokens sampled elsewhere, emitted by the step whose plan schedules the request.
        self._first_tokens: dict[str, SampledToken] = {}
        self.eos_token_ids = frozenset(
            self.model_config.eos_token_ids or self.tokenizer.eos_token_ids
        )

    # -- requests --------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | SequenceABC[int] | None = None, messages: list[dict] | None = None
    ) -> list[int]:
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        vocab = self.model_config.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        return token_ids

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens; the model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate"
            )
        max_total = min(len(token_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(max_total) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({max_total} tokens) does not fit the KV cache "
                f"({self.block_manager.num_blocks * self.config.block_size} tokens)"
            )

    def add_request(
        self,
        prompt: str | SequenceABC[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        first_token: SampledToken | None = None,
        resume_token_ids: SequenceABC[int] = (),
        kv_load: KVLoad | None = None,
        num_loaded_blocks: int = 0,
    ) -> str:
        """Queue a request. `first_token` is a token already sampled for this prompt elsewhere
        (disaggregated prefill): the step that first schedules the request emits it, and
        decoding continues from it. `kv_load` (from `start_load`) is committed first: its first
        `num_loaded_blocks` blocks enter the prefix cache, the rest of its blocks are freed.
        `resume_token_ids` are output tokens another engine already produced and delivered (a
        migrated request): they are recomputed one per step through the decode path (so their
        KV is bit-for-bit the first engine's), never emitted, and the next token is sampled at
        output position len(resume_token_ids), as the first engine would have."""
        if kv_load is not None:
            self._commit_load(kv_load, num_loaded_blocks)
        params = params or SamplingParams()
        token_ids = self.encode_prompt(prompt, messages)
        self.validate_prompt(token_ids, params)
        resumed = self._check_resume(resume_token_ids, first_token, params)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=token_ids,
            max_tokens=params.max_tokens,
            root_key=root_key(self.fingerprint, cache_salt),
            arrival_index=next(self._arrivals),
        )
        self._requests[request_id] = _Request(
            seq,
            params,
            make_generator(params.seed),
            IncrementalDetokenizer(self.tokenizer, token_ids, params),
        )
        if first_token is not None:
            if not 0 <= first_token.token_id < self.model_config.vocab_size:
                raise ValueError(f"first token id must be in [0, {self.model_config.vocab_size})")
            seq.output_token_ids.append(first_token.token_id)
            self._first_tokens[request_id] = first_token
        if resumed:
            seq.output_token_ids.extend(resumed)
            seq.replay_output = True
            for token_id in resumed:  # their text reached the client from the first engine
                self._requests[request_id].detokenizer.add_token(token_id)
        self.scheduler.add(seq)
        return request_id

    def emit_first_token(self, request_id: str) -> RequestOutput | None:
        """The output for a just-added request's `first_token` (sampled elsewhere), now rather
        than with the token its first step samples: a decode worker streams it at admission,
        before that step runs (the step then emits only the second token). None: it has none,
        or it was emitted already."""
        first = self._first_tokens.pop(request_id, None)
        if first is None:
            return None
        return self._postprocess(self._requests[request_id], first)

    def _check_resume(
        self, resume_token_ids: SequenceABC[int], first_token: SampledToken | None, params
    ) -> list[int]:
        resumed = self.encode_prompt(list(resume_token_ids)) if resume_token_ids else []
        if resumed and first_token is not None:
            raise ValueError("give at most one of first_token and resume_token_ids")
        if len(resumed) >= params.max_tokens:
            raise ValueError(
                f"{len(resumed)} resumed tokens leave nothing of max_tokens ({params.max_tokens})"
            )
        return resumed

    def abort(self, request_id: str) -> bool:
        """Stop a request at any point; its blocks are freed at once. False if unknown."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self._first_tokens.pop(request_id, None)
        self.scheduler.finish(request.seq, FinishReason.ABORT)
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # -- the loop --------------------------------------------------------------------------
    def step(
        self, on_layer_done: Callable[[int, SchedulerPlan], None] | None = None
    ) -> list[RequestOutput]:
        """One iteration: schedule, execute, update. `on_layer_done(layer, plan)` is called as
        each layer finishes writing this step's KV (telemetry), before the `kv_saver` sees it."""
        plan = self.scheduler.schedule(self._prompt_budget())
        self.last_step_was_empty = plan.is_empty
        if plan.is_empty:
            return self._fail_unschedulable()
        started_s = time.perf_counter()
        save = _StepSave(self, plan) if self.kv_saver is not None else None
        hook = _layer_hook(plan, on_layer_done, save)
        try:
            result = self.runner.execute(plan, hook)
            rows = [self._sampling_row(rid) for rid in result.request_ids]
            sampled = self.sampler.sample(result.logits, rows)
        except Exception as exc:
            if save is not None:
                save.end(exc)
            self._fail(plan)
            raise
        if save is not None:
            save.end(None)
        num_decodes = sum(1 for c in plan.chunks if c.is_decode)
        self.step_costs.record(plan.num_prompt_tokens, num_decodes, time.perf_counter() - started_s)
        return self._update(plan, dict(zip(result.request_ids, sampled, strict=True)))

    def _prompt_budget(self) -> int | None:
        """Prompt tokens the next step may carry next to running decodes (None: no step target)."""
        c = self.config
        return self.step_costs.step_budget(
            c.target_step_s,
            c.prompt_drain_s,
            c.max_num_batched_tokens,
            self.scheduler.num_pending_prompt_tokens,
        )

    def cost_report(self) -> dict[str, float]:
        """What the router's cost model reads from the heartbeat: the learned step costs and
        how this engine chunks prompts (its token budget per step; 0: no step target, no drain
        time)."""
        c = self.config
        return {
            **self.step_costs.report(),
            "max_num_batched_tokens": c.max_num_batched_tokens,
            "target_step_s": c.target_step_s or 0.0,
            "prompt_drain_s": c.prompt_drain_s or 0.0,
        }

    def _completed_blocks(self, plan: SchedulerPlan) -> list[SaveBlock]:
        """Every full block this step's chunks complete, with its chain key."""
        bs, out = self.config.block_size, []
        for chunk in plan.chunks:
            seq = chunk.seq
            parent = seq.block_keys[-1] if seq.block_keys else seq.root_key
            for i in range(len(seq.block_keys), (chunk.start + chunk.num_tokens) // bs):
                parent = next_block_key(parent, seq.tokens_in_range(i * bs, (i + 1) * bs))
                if i >= chunk.start // bs:
                    out.append(SaveBlock(seq.request_id, i, parent))
        return out

    def _sampling_row(self, request_id: str) -> SamplingRow:
        request = self._requests[request_id]
        seq = request.seq
        return SamplingRow(
            request.params, request.generator, seq.prompt_token_ids, seq.output_token_ids
        )

    def _update(self, plan: SchedulerPlan, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        self.stats.num_steps += 1
        for chunk in plan.chunks:
            if chunk.seq.num_computed_tokens < chunk.seq.num_prompt_tokens:
                self.stats.num_prompt_tokens_computed += min(
                    chunk.num_tokens, chunk.seq.num_prompt_tokens - chunk.start
                )
        outputs = []
        for chunk in plan.chunks:  # first tokens sampled elsewhere come before this step's
            first = self._first_tokens.pop(chunk.seq.request_id, None)
            if first is not None:
                outputs.append(self._postprocess(self._requests[chunk.seq.request_id], first))
        # A request the first token finished drops the token this step sampled for it.
        live = {rid: s for rid, s in sampled.items() if rid in self._requests}
        self.scheduler.update(plan, {rid: s.token_id for rid, s in live.items()})
        for request_id, token in live.items():
            self.stats.num_generation_tokens += 1
            outputs.append(self._postprocess(self._requests[request_id], token))
        return outputs

    def _postprocess(self, request: _Request, token: SampledToken) -> RequestOutput:
        seq, params = request.seq, request.params
        reason = self._stop_reason(seq, params, token.token_id)
        if reason is FinishReason.STOP:
            # A stop or EOS token ends the text without being part of it.
            text = request.detokenizer.finish()
        else:
            update = request.detokenizer.add_token(token.token_id)
            text = update.text_delta
            if update.stopped_by is not None:
                reason = FinishReason.STOP
            elif reason is not None:
                text += request.detokenizer.finish()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            text_delta=text,
            new_token_ids=[token.token_id],
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            new_logprobs=[token] if params.logprobs is not None else [],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _stop_reason(
        self, seq: Sequence, params: SamplingParams, token_id: int
    ) -> FinishReason | None:
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, plan: SchedulerPlan) -> None:
        for chunk in plan.chunks:
            request = self._requests.pop(chunk.seq.request_id, None)
            self._first_tokens.pop(chunk.seq.request_id, None)
            if request is not None:
                self.scheduler.finish(request.seq, FinishReason.ERROR)

    def _fail_unschedulable(self) -> list[RequestOutput]:
        if not self.scheduler.has_unfinished:
            return []
        if self.block_manager.num_reserved_blocks:
            # KV loads hold blocks they give back when they commit or are released: the head
            # request waits for them instead of failing as if it could never fit.
            return []
        # Nothing fits even with every block free: the head request can never run.
        seq = self.scheduler.waiting[0]
        self._requests.pop(seq.request_id, None)
        self._first_tokens.pop(seq.request_id, None)
        self.scheduler.finish(seq, FinishReason.ERROR)
        return [RequestOutput(seq.request_id, "", [], True, FinishReason.ERROR.value)]

    # -- conveniences ----------------------------------------------------------------------
    def generate(
        self,
        prompts: SequenceABC[str | SequenceABC[int]],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[Completion]:
        params_list = list(params) if isinstance(params, SequenceABC) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results = {rid: Completion(rid, "", [], "", 0, 0) for rid in ids}
        while self.has_unfinished:
            for out in self.step():
                self._accumulate(results[out.request_id], out)
        return [results[rid] for rid in ids]

    def stream(
        self,
        prompt: str | SequenceABC[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield this request's outputs as they are produced (other queued requests advance in
        the same steps). Closing the iterator early aborts the request."""
        request_id = self.add_request(prompt, params, messages=messages, cache_salt=cache_salt)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(request_id)

    @staticmethod
    def _accumulate(completion: Completion, out: RequestOutput) -> None:
        completion.text += out.text_delta
        completion.token_ids.extend(out.new_token_ids)
        completion.logprobs.extend(out.new_logprobs)
        completion.num_prompt_tokens = out.num_prompt_tokens
        completion.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            completion.finish_reason = out.finish_reason or ""

    # -- KV blocks as bytes (the handoff unit) ---------------------------------------------
    def block_keys(
        self, token_ids: SequenceABC[int], cache_salt: str | None = None
    ) -> list[BlockKey]:
        return chain_block_keys(
            token_ids, self.config.block_size, root_key(self.fingerprint, cache_salt)
        )

    def export_blocks(self, keys: SequenceABC[BlockKey]) -> list[bytes]:
        """Bytes of each cached block, `[layers, 2, block_size, kv_heads, head_dim]` in the
        model dtype. Raises KeyError for a key that is not cached."""
        block_ids = []
        for key in keys:
            block_id = self.block_manager.cached_block(key)
            if block_id is None:
                raise KeyError(f"block {key.hex()} is not cached")
            block_ids.append(block_id)
        return self.runner.read_blocks(block_ids)

    def import_blocks(
        self, token_ids: SequenceABC[int], keys: SequenceABC[BlockKey], payloads: SequenceABC[bytes]
    ) -> int:
        """Insert blocks produced elsewhere into the prefix cache. `token_ids` are the tokens the
        blocks cover (block i holds tokens[i*bs:(i+1)*bs]); they are stored for the hit check.
        Returns how many blocks were inserted (already-cached keys are skipped)."""
        if len(keys) != len(payloads):
            raise ValueError("keys and payloads must have the same length")
        bs = self.config.block_size
        if len(token_ids) < len(keys) * bs:
            raise ValueError("token_ids do not cover every block")
        for payload in payloads:
            if len(payload) != self.block_bytes:
                raise ValueError(
                    f"KV block payload must be {self.block_bytes} bytes, got {len(payload)}"
                )
        inserted = 0
        for i, (key, payload) in enumerate(zip(keys, payloads, strict=True)):
            block_id = self.block_manager.insert_cached_block(key, token_ids[i * bs : (i + 1) * bs])
            if block_id is None:
                continue
            self.runner.write_block(block_id, payload)
            inserted += 1
        return inserted

    def cached_prefix_blocks(self, keys: SequenceABC[BlockKey]) -> int:
        """How many leading `keys` this engine's prefix cache holds. Any thread: a hint (a dict
        read), so a stale answer only costs a fetch or a recompute."""
        n = 0
        while n < len(keys) and self.block_manager.cached_block(keys[n]) is not None:
            n += 1
        return n

    # -- the KV-connector load side (see kv_connector.py) ----------------------------------
    def start_load(
        self, request_id: str, token_ids: SequenceABC[int], num_blocks: int, cache_salt=None
    ) -> KVLoad:
        """Scheduler side (engine thread): of the prompt's first `num_blocks` full blocks, skip
        the ones cached here and reserve pool blocks for the rest, as many as fit."""
        bs = self.config.block_size
        tokens = tuple(token_ids[: num_blocks * bs])
        keys = self.block_keys(tokens, cache_salt)
        first = 0
        while first < len(keys):
            if (
                self.block_manager.lookup(keys[first], tokens[first * bs : (first + 1) * bs])
                is None
            ):
                break
            first += 1
        block_ids = self.block_manager.reserve(len(keys) - first)
        return KVLoad(request_id, tokens, tuple(keys), first, block_ids)

    def load_layer(self, load: KVLoad, layer: int, start: int, payloads: SequenceABC) -> None:
        """Worker side (any thread): layer `layer` of blocks `keys_to_load[start:]`."""
        with load.lock:
            self._check_open(load)
            self.runner.write_layer(layer, load.block_ids[start : start + len(payloads)], payloads)

    def load_layers(self, load: KVLoad, layers: range, start: int, data) -> None:
        """Worker side (any thread): layers `layers` of blocks `keys_to_load[start:]` in one
        copy; `data` holds each block's slices of those layers, block after block."""
        num_blocks = len(data) // (len(layers) * self.layer_nbytes)
        with load.lock:
            self._check_open(load)
            self.runner.write_layers(layers, load.block_ids[start : start + num_blocks], data)

    def load_blocks(self, load: KVLoad, start: int, payloads: SequenceABC) -> None:
        """Worker side (any thread): whole blocks `keys_to_load[start:]`."""
        with load.lock:
            self._check_open(load)
            block_ids = load.block_ids[start : start + len(payloads)]
            for block_id, payload in zip(block_ids, payloads, strict=True):
                self.runner.write_block(block_id, payload)

    def release_load(self, load: KVLoad) -> None:
        """Give a load's blocks back without caching them (engine thread; idempotent)."""
        with load.lock:
            if not load.done:
                load.done = True
                self.block_manager.release_reserved(load.block_ids, [])

    def _commit_load(self, load: KVLoad, num_loaded_blocks: int) -> None:
        if not 0 <= num_loaded_blocks <= load.num_to_load:
            raise ValueError(f"num_loaded_blocks must be in [0, {load.num_to_load}]")
        bs, first = self.config.block_size, load.first
        cached = [
            (load.keys[first + i], load.token_ids[(first + i) * bs : (first + i + 1) * bs])
            for i in range(num_loaded_blocks)
        ]
        with load.lock:
            self._check_open(load)
            load.done = True
            self.block_manager.release_reserved(load.block_ids, cached)

    @staticmethod
    def _check_open(load: KVLoad) -> None:
        if load.done:
            raise ValueError(
                f"the KV load of {load.request_id!r} was already committed or released"
            )

    # -- what the services publish (engine thread) -----------------------------------------
    @property
    def layer_nbytes(self) -> int:
        return self.runner.layer_nbytes

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_free_kv_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_cached_kv_blocks(self) -> int:
        return self.block_manager.num_cached_blocks

    def cached_keys(self) -> list[BlockKey]:
        return self.block_manager.cached_keys()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_pending_prompt_tokens(self) -> int:
        return self.scheduler.num_pending_prompt_tokens


class _StepSave:
    """One step's save side: which blocks the saver picked and their pool blocks."""

    def __init__(self, engine: LLMEngine, plan: SchedulerPlan) -> None:
        self.engine, self.plan = engine, plan
        self.block_ids: list[int] = []
        self.begun = False
        # CUDA: side-stream copies into pinned memory, handed on as they complete (layer_copy)
        self.copier = make_layer_copier(engine.device)

    def layer(self, layer: int) -> None:
        saver, engine = self.engine.kv_saver, self.engine
        if layer == 0:
            self.begun = True
            picked = saver.begin_save(engine._completed_blocks(self.plan))
            tables = {c.seq.request_id: c.seq.block_table for c in self.plan.chunks}
            self.block_ids = [tables[b.request_id][b.index] for b in picked]
        if self.block_ids:
            self.copier.start(layer, engine.runner.kv_pool[layer], self.block_ids)
            for done, payloads in self.copier.ready():
                saver.save_layer(done, payloads)

    def end(self, error: Exception | None) -> None:
        if self.begun:
            in_flight = self.copier.drain()  # on a failed step too: no copy is left running
            for done, payloads in in_flight if error is None else ():
                self.engine.kv_saver.save_layer(done, payloads)
            self.engine.kv_saver.end_save(error)


def _layer_hook(plan, on_layer_done, save: _StepSave | None) -> Callable[[int], None] | None:
    if on_layer_done is None and save is None:
        return None

    def hook(layer: int) -> None:
        if on_layer_done is not None:
            on_layer_done(layer, plan)
        if save is not None:
            save.layer(layer)

    return hook
