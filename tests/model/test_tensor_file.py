"""The aligned tensor file the quantized cache is stored in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdserve.model import tensor_file


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "odd": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=generator),
        "bf16": torch.randn(7, 9, generator=generator).to(torch.bfloat16),
        "fp32": torch.randn(4, 33, generator=generator),
        "int32": torch.randint(-9, 9, (11,), dtype=torch.int32, generator=generator),
        "empty": torch.empty(0, 8, dtype=torch.int8),
    }


def test_round_trip_gives_aligned_equal_views(tmp_path: Path) -> None:
    saved = tensors()
    tensor_file.save(saved, tmp_path, "t")
    loaded = tensor_file.load(tmp_path, "t")
    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
        if tensor.numel():
            assert loaded[name].data_ptr() % tensor_file.ALIGNMENT_BYTES == 0, name


def test_writing_to_a_loaded_tensor_leaves_the_file_alone(tmp_path: Path) -> None:
    tensor_file.save({"w": torch.zeros(16)}, tmp_path, "t")
    tensor_file.load(tmp_path, "t")["w"].fill_(1.0)
    assert torch.equal(tensor_file.load(tmp_path, "t")["w"], torch.zeros(16))


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    tensor_file.save(tensors(), tmp_path, "t")
    data = tmp_path / "t.bin"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(ValueError, match="outside the file"):
        tensor_file.load(tmp_path, "t")


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    tensor_file.save(tensors(), tmp_path, "t")
    index = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps(index | {"format": 99}))
    with pytest.raises(ValueError, match="unknown format"):
        tensor_file.load(tmp_path, "t")
