"""Dtype and attention-backend choice per device (pure; runs on a CPU-only machine)."""

import pytest

from pdserve.engine.device_selection import (
    BackendChoice,
    DeviceFacts,
    choose_backend,
    default_dtype,
    flash_unsupported,
    resolve_dtype,
)

CPU = DeviceFacts("cpu")
H200 = DeviceFacts("cuda", (9, 0), flash_installed=True, name="NVIDIA H200")
H200_NO_FLASH = DeviceFacts("cuda", (9, 0), flash_installed=False, name="NVIDIA H200")
T4 = DeviceFacts("cuda", (7, 5), flash_installed=True, name="Tesla T4")


@pytest.mark.parametrize(
    "facts,expected",
    [(CPU, "float32"), (H200, "bfloat16"), (H200_NO_FLASH, "bfloat16"), (T4, "float16")],
)
def test_auto_dtype_per_device(facts, expected):
    assert default_dtype(facts) == expected
    assert resolve_dtype("auto", facts) == expected


def test_explicit_dtype_is_kept_and_unknown_rejected():
    assert resolve_dtype("float32", H200) == "float32"
    assert resolve_dtype("bfloat16", CPU) == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        resolve_dtype("fp8", H200)


def test_auto_picks_flash_on_h200_bf16_with_the_layout_named():
    small = choose_backend("auto", H200, "bfloat16", 128, 16)
    assert small == BackendChoice(
        "flash",
        "auto: bfloat16, head_dim 128; block_size 16 is not a multiple of 256, "
        "so cached context is gathered per step",
        paged_decode=False,
    )
    paged = choose_backend(None, H200, "bfloat16", 128, 256)
    assert paged.name == "flash" and paged.paged_decode
    assert "paged decode over the block table (block_size 256)" in paged.reason


@pytest.mark.parametrize(
    "facts,dtype,head_dim,why",
    [
        (CPU, "float32", 64, "flash-attn needs CUDA (device is cpu)"),
        (H200_NO_FLASH, "bfloat16", 64, "the flash-attn package is not installed"),
        (T4, "float16", 64, "compute capability >= 8.0, this GPU has 7.5"),
        (H200, "float32", 64, "float16/bfloat16 only, not float32"),
        (H200, "bfloat16", 320, "head_dim <= 256 and a multiple of 8, the model has 320"),
        (H200, "float16", 60, "the model has 60"),
    ],
)
def test_auto_falls_back_to_sdpa_saying_why(facts, dtype, head_dim, why):
    choice = choose_backend("auto", facts, dtype, head_dim, 16)
    assert choice.name == "sdpa" and not choice.paged_decode
    assert choice.reason.startswith("auto: not flash because ") and why in choice.reason
    with pytest.raises(ValueError, match="attention backend 'flash' cannot run here: .*; use sdpa"):
        choose_backend("flash", facts, dtype, head_dim, 16)


def test_fp32_on_cuda_never_reaches_flash():
    """The bug this issue names: fp32 on a CUDA host with flash-attn installed picked flash."""
    assert flash_unsupported(H200, "float32", 64) is not None
    assert choose_backend("auto", H200, "float32", 64, 16).name == "sdpa"


def test_forced_backends_and_unknown_names():
    assert choose_backend("flash", H200, "float16", 256, 512).name == "flash"
    assert choose_backend("sdpa", H200, "bfloat16", 64, 16) == BackendChoice("sdpa", "requested")
    assert choose_backend("reference", CPU, "float32", 64, 16).name == "reference"
    with pytest.raises(ValueError, match="one of auto, flash, sdpa, reference; got 'triton'"):
        choose_backend("triton", H200, "bfloat16", 64, 16)
