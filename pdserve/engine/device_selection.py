"""Which dtype and attention backend an engine runs with, decided from plain facts about the
device. Pure (no torch import): the facts are gathered once by `attention.device_facts`, so
every rule here is unit-tested on a CPU-only machine.

Rules (flash-attn 2, upstream):
- dtype: `auto` is bf16 on a CUDA device with native bf16 (compute capability ≥ 8.0), fp16 on
  an older one, and fp32 on the CPU (exact against Hugging Face, and the fast path of the CPU
  kernels that have no bf16 support).
- flash: fp16/bf16 only, compute capability ≥ 8.0 (Ampere, Ada, Hopper), head_dim ≤ 256 and a
  multiple of 8 (the kernels pad other sizes, which a paged cache cannot be).
- flash reads the block table in place only when the block size is a multiple of 256 (its
  `page_block_size` check); smaller blocks are gathered into a contiguous buffer per step.
- `auto`: flash where all of the above hold, else sdpa; a forced backend that cannot run here
  is a ValueError saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
BACKEND_NAMES = ("auto", "flash", "sdpa", "reference")
FLASH_DTYPES = ("float16", "bfloat16")
FLASH_MIN_CAPABILITY = (8, 0)
FLASH_MAX_HEAD_DIM = 256
FLASH_HEAD_DIM_MULTIPLE = 8
FLASH_PAGE_MULTIPLE = 256


@dataclass(frozen=True)
class DeviceFacts:
    kind: str  # "cpu" or "cuda"
    capability: tuple[int, int] | None = None  # CUDA compute capability; None on the CPU
    flash_installed: bool = False  # `import flash_attn` succeeds
    name: str = ""  # e.g. "NVIDIA H200", for the log line


@dataclass(frozen=True)
class BackendChoice:
    name: str  # flash | sdpa | reference
    reason: str  # one sentence for the log line
    paged_decode: bool = False  # flash reads the block table in place (no per-step gather)


def default_dtype(facts: DeviceFacts) -> str:
    if facts.kind != "cuda":
        return "float32"
    if facts.capability is not None and facts.capability < FLASH_MIN_CAPABILITY:
        return "float16"  # no native bf16 before Ampere
    return "bfloat16"


def resolve_dtype(requested: str, facts: DeviceFacts) -> str:
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {requested!r}")
    return default_dtype(facts) if requested == "auto" else requested


def flash_unsupported(facts: DeviceFacts, dtype: str, head_dim: int) -> str | None:
    """Why flash-attn cannot run this configuration here, or None when it can."""
    if facts.kind != "cuda":
        return f"flash-attn needs CUDA (device is {facts.kind})"
    if not facts.flash_installed:
        return "the flash-attn package is not installed (pip install -e '.[cuda]')"
    if facts.capability is not None and facts.capability < FLASH_MIN_CAPABILITY:
        major, minor = facts.capability
        return f"flash-attn 2 needs compute capability >= 8.0, this GPU has {major}.{minor}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn runs float16/bfloat16 only, not {dtype}"
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim % FLASH_HEAD_DIM_MULTIPLE:
        return (
            f"flash-attn needs head_dim <= {FLASH_MAX_HEAD_DIM} and a multiple of "
            f"{FLASH_HEAD_DIM_MULTIPLE}, the model has {head_dim}"
        )
    return None


def choose_backend(
    requested: str | None, facts: DeviceFacts, dtype: str, head_dim: int, block_size: int
) -> BackendChoice:
    """The backend to run and why. Raises ValueError for an unknown name or a forced `flash`
    that cannot run on this device, dtype and model."""
    requested = requested or "auto"
    if requested not in BACKEND_NAMES:
        raise ValueError(
            f"attention backend must be one of {', '.join(BACKEND_NAMES)}; got {requested!r}"
        )
    if requested == "reference":
        return BackendChoice("reference", "requested (plain math, the tests' yardstick)")
    if requested == "sdpa":
        return BackendChoice("sdpa", "requested")
    blocker = flash_unsupported(facts, dtype, head_dim)
    if blocker is not None:
        if requested == "flash":
            raise ValueError(f"attention backend 'flash' cannot run here: {blocker}; use sdpa")
        return BackendChoice("sdpa", f"auto: not flash because {blocker}")
    paged = block_size % FLASH_PAGE_MULTIPLE == 0
    layout = (
        f"paged decode over the block table (block_size {block_size})"
        if paged
        else f"block_size {block_size} is not a multiple of {FLASH_PAGE_MULTIPLE}, "
        "so cached context is gathered per step"
    )
    how = "requested" if requested == "flash" else "auto"
    return BackendChoice("flash", f"{how}: {dtype}, head_dim {head_dim}; {layout}", paged)
