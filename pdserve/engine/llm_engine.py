"""The offline engine: `add_request` → `step` (schedule, execute, update) → outputs.

Request lifecycle: added (validated, WAITING) → admitted (blocks allocated, prefix reused) →
running (prefill chunks, then one token per step) → finished (stop, length, abort, error).
Every path to finished releases the request's blocks through `Scheduler.finish`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_hash import BlockKey, chain_block_keys, root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.model_runner import ModelRunner, model_block_nbytes
from pdserve.engine.sampler import SampledToken, Sampler, SamplingRow, make_generator
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerPlan
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.model.loader import Checkpoint, load_checkpoint

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


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = _resolve_device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.checkpoint = checkpoint or load_checkpoint(config.model, dtype=self.dtype)
        self.model_config = self.checkpoint.config
        self.tokenizer = self.checkpoint.tokenizer
        self.fingerprint = self.checkpoint.fingerprint
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
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.sampler = Sampler(config.seed)
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._request_ids = itertools.count()
        self._prefilled: list[tuple[str, SampledToken]] = []
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
    ) -> str:
        """Queue a request. `first_token` is a token already sampled for this prompt elsewhere
        (disaggregated prefill): it is emitted by the next `step` and decoding continues from it."""
        params = params or SamplingParams()
        token_ids = self.encode_prompt(prompt, messages)
        self.validate_prompt(token_ids, params)
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
            self._prefilled.append((request_id, first_token))
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request at any point; its blocks are freed at once. False if unknown."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
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
        each layer finishes writing this step's KV (the pipelined-handoff hook)."""
        pending = self._emit_prefilled()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return pending + self._fail_unschedulable()
        hook = None if on_layer_done is None else (lambda layer: on_layer_done(layer, plan))
        try:
            result = self.runner.execute(plan, hook)
            rows = [self._sampling_row(rid) for rid in result.request_ids]
            sampled = self.sampler.sample(result.logits, rows)
        except Exception:
            self._fail(plan)
            raise
        return pending + self._update(plan, dict(zip(result.request_ids, sampled, strict=True)))

    def _emit_prefilled(self) -> list[RequestOutput]:
        """Outputs for first tokens sampled elsewhere (by a prefill worker), once each."""
        outputs = []
        while self._prefilled:
            request_id, token = self._prefilled.pop()
            request = self._requests.get(request_id)
            if request is not None:
                outputs.append(self._postprocess(request, token))
        return outputs

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
        self.scheduler.update(plan, {rid: s.token_id for rid, s in sampled.items()})
        outputs = []
        for request_id, token in sampled.items():
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
            if request is not None:
                self.scheduler.finish(request.seq, FinishReason.ERROR)

    def _fail_unschedulable(self) -> list[RequestOutput]:
        if not self.scheduler.has_unfinished:
            return []
        # Nothing fits even with every block free: the head request can never run.
        seq = self.scheduler.waiting[0]
        self._requests.pop(seq.request_id, None)
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
