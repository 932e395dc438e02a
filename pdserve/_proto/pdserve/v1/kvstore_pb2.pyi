from pdserve._proto.pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_ENCODING_NONE: _ClassVar[KVEncoding]
    KV_ENCODING_INT8: _ClassVar[KVEncoding]
KV_ENCODING_NONE: KVEncoding
KV_ENCODING_INT8: KVEncoding

class PutHeader(_message.Message):
    __slots__ = ("trace_context", "skip_existing")
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SKIP_EXISTING_FIELD_NUMBER: _ClassVar[int]
    trace_context: _common_pb2.TraceContext
    skip_existing: bool
    def __init__(self, trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., skip_existing: _Optional[bool] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("key", "offset", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    data: bytes
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlockSeal(_message.Message):
    __slots__ = ("key", "checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    checksum: int
    def __init__(self, key: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk", "seal")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: BlockChunk
    seal: BlockSeal
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., seal: _Optional[_Union[BlockSeal, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("num_stored", "num_skipped", "tiers")
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    num_stored: int
    num_skipped: int
    tiers: _containers.RepeatedScalarFieldContainer[_common_pb2.Tier]
    def __init__(self, num_stored: _Optional[int] = ..., num_skipped: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[_common_pb2.Tier, str]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "trace_context", "chunk_bytes", "encoding", "geometry")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    trace_context: _common_pb2.TraceContext
    chunk_bytes: int
    encoding: KVEncoding
    geometry: KVGeometry
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., encoding: _Optional[_Union[KVEncoding, str]] = ..., geometry: _Optional[_Union[KVGeometry, _Mapping]] = ...) -> None: ...

class KVGeometry(_message.Message):
    __slots__ = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class GetBlockEnd(_message.Message):
    __slots__ = ("key", "found", "checksum", "tier", "wire_checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WIRE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    found: bool
    checksum: int
    tier: _common_pb2.Tier
    wire_checksum: int
    def __init__(self, key: _Optional[bytes] = ..., found: _Optional[bool] = ..., checksum: _Optional[int] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., wire_checksum: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("chunk", "end")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    chunk: BlockChunk
    end: GetBlockEnd
    def __init__(self, chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., end: _Optional[_Union[GetBlockEnd, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("tiers", "prefix_blocks")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedScalarFieldContainer[_common_pb2.Tier]
    prefix_blocks: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[_common_pb2.Tier, str]]] = ..., prefix_blocks: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("keys", "ttl_ms", "lease_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    lease_id: str
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("lease_id", "pinned", "missing", "expires_unix_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    pinned: _containers.RepeatedScalarFieldContainer[bytes]
    missing: _containers.RepeatedScalarFieldContainer[bytes]
    expires_unix_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., pinned: _Optional[_Iterable[bytes]] = ..., missing: _Optional[_Iterable[bytes]] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_deleted", "pinned")
    NUM_DELETED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    num_deleted: int
    pinned: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, num_deleted: _Optional[int] = ..., pinned: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "num_blocks", "num_evicted", "num_promoted_in", "num_demoted_in")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMOTED_IN_FIELD_NUMBER: _ClassVar[int]
    NUM_DEMOTED_IN_FIELD_NUMBER: _ClassVar[int]
    tier: _common_pb2.Tier
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    num_evicted: int
    num_promoted_in: int
    num_demoted_in: int
    def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_evicted: _Optional[int] = ..., num_promoted_in: _Optional[int] = ..., num_demoted_in: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node_id", "block_size_bytes", "tiers", "num_pinned_blocks", "num_staging_blocks", "num_hits", "num_misses", "num_corrupt", "num_leases")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_MISSES_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    block_size_bytes: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    num_pinned_blocks: int
    num_staging_blocks: int
    num_hits: int
    num_misses: int
    num_corrupt: int
    num_leases: int
    def __init__(self, node_id: _Optional[str] = ..., block_size_bytes: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., num_pinned_blocks: _Optional[int] = ..., num_staging_blocks: _Optional[int] = ..., num_hits: _Optional[int] = ..., num_misses: _Optional[int] = ..., num_corrupt: _Optional[int] = ..., num_leases: _Optional[int] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSharedMemoryResponse(_message.Message):
    __slots__ = ("available", "path", "size_bytes", "host_id", "block_size_bytes", "staging_blocks")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    available: bool
    path: str
    size_bytes: int
    host_id: str
    block_size_bytes: int
    staging_blocks: int
    def __init__(self, available: _Optional[bool] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., host_id: _Optional[str] = ..., block_size_bytes: _Optional[int] = ..., staging_blocks: _Optional[int] = ...) -> None: ...

class ReserveSharedRequest(_message.Message):
    __slots__ = ("keys", "skip_existing")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SKIP_EXISTING_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    skip_existing: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., skip_existing: _Optional[bool] = ...) -> None: ...

class SharedSlot(_message.Message):
    __slots__ = ("key", "offset", "length", "checksum", "tier", "staged")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    length: int
    checksum: int
    tier: _common_pb2.Tier
    staged: bool
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., checksum: _Optional[int] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., staged: _Optional[bool] = ...) -> None: ...

class ReserveSharedResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SharedSlot]
    def __init__(self, slots: _Optional[_Iterable[_Union[SharedSlot, _Mapping]]] = ...) -> None: ...

class SealSharedRequest(_message.Message):
    __slots__ = ("seals", "trace_context")
    SEALS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    seals: _containers.RepeatedCompositeFieldContainer[BlockSeal]
    trace_context: _common_pb2.TraceContext
    def __init__(self, seals: _Optional[_Iterable[_Union[BlockSeal, _Mapping]]] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ...) -> None: ...

class ReleaseSharedRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseSharedResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class MapSharedRequest(_message.Message):
    __slots__ = ("keys", "ttl_ms", "trace_context", "include_staged")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STAGED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    trace_context: _common_pb2.TraceContext
    include_staged: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., include_staged: _Optional[bool] = ...) -> None: ...

class StagedRange(_message.Message):
    __slots__ = ("key", "offset", "length")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    length: int
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class GetStagedRequest(_message.Message):
    __slots__ = ("ranges", "trace_context", "chunk_bytes")
    RANGES_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[StagedRange]
    trace_context: _common_pb2.TraceContext
    chunk_bytes: int
    def __init__(self, ranges: _Optional[_Iterable[_Union[StagedRange, _Mapping]]] = ..., trace_context: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class MapSharedResponse(_message.Message):
    __slots__ = ("lease_id", "slots")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    slots: _containers.RepeatedCompositeFieldContainer[SharedSlot]
    def __init__(self, lease_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[SharedSlot, _Mapping]]] = ...) -> None: ...
