"""A directory of named tensors, each at a 64-byte aligned offset of one memory-mapped file.

The quantized projections' cache uses it instead of safetensors: safetensors packs tensors
back to back, and PyTorch's weight-only kernels need aligned operands (a segmentation fault in
`_weight_int4pack_mm_for_cpu` on a mapped safetensors tensor), so every cached load had to copy
them. Here a load maps the file and returns views; pages come in on first use.

Layout: `<name>.json` holds {"format", "tensors": {name: {dtype, shape, offset, nbytes}}};
`<name>.bin` the bytes. Loading checks that every tensor lies inside the file.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch

ALIGNMENT_BYTES = 64
FORMAT = 1
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int32,
        torch.int8,
        torch.uint8,
    )
}


def save(tensors: dict[str, torch.Tensor], directory: Path, name: str) -> None:
    index = {}
    with open(directory / f"{name}.bin", "wb") as data:
        offset = 0
        for key, tensor in tensors.items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {key!r}: dtype {tensor.dtype} cannot be saved")
            raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
            padding = -offset % ALIGNMENT_BYTES
            data.write(b"\0" * padding)
            offset += padding
            data.write(memoryview(raw))
            index[key] = {
                "dtype": dtype,
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": raw.nbytes,
            }
            offset += raw.nbytes
    (directory / f"{name}.json").write_text(json.dumps({"format": FORMAT, "tensors": index}))


def load(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """Views of the mapped file (copy-on-write: writing to one never reaches the file).
    Raises OSError or ValueError for a missing, truncated or malformed pair of files."""
    index = json.loads((directory / f"{name}.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory / name}.json: unknown format {index.get('format')!r}")
    with open(directory / f"{name}.bin", "rb") as data:
        size = data.seek(0, 2)
        mapped = mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    tensors = {}
    for key, entry in index["tensors"].items():
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        if offset % ALIGNMENT_BYTES or offset < 0 or offset + nbytes > size:
            raise ValueError(f"{directory / name}.bin: tensor {key!r} lies outside the file")
        raw = (
            torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors[key] = raw.view(_DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors
