"""The committed stubs under pdserve/_proto must match protos/ (run `make protos`)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from google.protobuf import descriptor_pb2

from pdserve import _protogen


def _module_for(proto_name: str):
    module = "pdserve._proto." + proto_name.removesuffix(".proto").replace("/", ".") + "_pb2"
    return importlib.import_module(module)


def _drop_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")


def test_committed_descriptors_match_sources():
    fresh = descriptor_pb2.FileDescriptorSet.FromString(_protogen.descriptor_set())
    assert fresh.file, "no .proto files found"
    for file in fresh.file:
        _drop_json_names(file)  # protoc adds them to descriptor sets, not to generated code
        committed = descriptor_pb2.FileDescriptorProto.FromString(
            _module_for(file.name).DESCRIPTOR.serialized_pb
        )
        assert committed == file, f"{file.name}: stubs are stale, run `make protos`"


_VERSION_LINES = re.compile(
    r"^# Protobuf Python Version:.*$|^GRPC_GENERATED_VERSION = .*$"
    r"|^_runtime_version\.ValidateProtobufRuntimeVersion\((?:\n    .*)*\n\)$",
    re.MULTILINE,
)


def _normalized(text: str) -> str:
    """Generated text without the generator's version stamps (CI may run a newer one)."""
    return _VERSION_LINES.sub("", text)


def test_committed_files_match_regeneration(tmp_path: Path):
    out = tmp_path / "_proto"
    _protogen.generate(out_root=out)
    fresh = {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(_protogen.OUT_ROOT): p.read_text()
        for p in _protogen.OUT_ROOT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), "stub file list is stale, run `make protos`"
    for name, text in fresh.items():
        assert _normalized(committed[name]) == _normalized(text), (
            f"pdserve/_proto/{name} is stale, run `make protos`"
        )
