from pdserve._proto.pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandoffRequest(_message.Message):
    __slots__ = ("request_id", "wait_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class HandoffEvent(_message.Message):
    __slots__ = ("kv", "done", "trace", "layers")
    KV_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    kv: _common_pb2.KVSource
    done: PrefillResponse
    trace: _common_pb2.TraceContext
    layers: _containers.RepeatedCompositeFieldContainer[HandoffLayers]
    def __init__(self, kv: _Optional[_Union[_common_pb2.KVSource, _Mapping]] = ..., done: _Optional[_Union[PrefillResponse, _Mapping]] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[HandoffLayers, _Mapping]]] = ...) -> None: ...

class HandoffLayers(_message.Message):
    __slots__ = ("block_keys", "slot_offsets", "layer_start", "layer_end", "layer_nbytes", "checksums")
    BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    SLOT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    LAYER_NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    block_keys: _containers.RepeatedScalarFieldContainer[bytes]
    slot_offsets: _containers.RepeatedScalarFieldContainer[int]
    layer_start: int
    layer_end: int
    layer_nbytes: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_keys: _Optional[_Iterable[bytes]] = ..., slot_offsets: _Optional[_Iterable[int]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., layer_nbytes: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "cache_salt", "trace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    cache_salt: str
    trace: _common_pb2.TraceContext
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "kv", "num_cached_tokens", "num_computed_tokens", "worker_id", "trace")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    kv: _common_pb2.KVSource
    num_cached_tokens: int
    num_computed_tokens: int
    worker_id: str
    trace: _common_pb2.TraceContext
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., kv: _Optional[_Union[_common_pb2.KVSource, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., worker_id: _Optional[str] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ...) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsResponse(_message.Message):
    __slots__ = ("worker_id", "running", "waiting", "num_prompt_tokens_computed", "num_prompt_tokens_cached")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_CACHED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    running: int
    waiting: int
    num_prompt_tokens_computed: int
    num_prompt_tokens_cached: int
    def __init__(self, worker_id: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., num_prompt_tokens_computed: _Optional[int] = ..., num_prompt_tokens_cached: _Optional[int] = ...) -> None: ...
