"""Engine configuration: validated once, never mutated. Values found at run time (how many
blocks fit) live on the engine, not here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")  # device_selection.DTYPE_NAMES
_BACKENDS = ("auto", "flash", "sdpa", "reference")
_QUANTIZATION = ("auto", "none", "int8", "int4")  # pdserve.model.quant.QUANTIZATION_MODES


@dataclass(frozen=True)
class EngineConfig:
    model: str | Path | None = None  # GGUF file or safetensors directory; None = default model
    dtype: str = "auto"  # auto → bfloat16 on CUDA, float32 on the CPU (device_selection)
    # Weight precision (pdserve.model.quant): auto → int4 with bf16 activations on a CPU with
    # native bf16, else the dense weights in `dtype`; none → dense (fp32: exact, = HF).
    quantization: str = "auto"
    device: str = "auto"  # auto → cuda when available, else cpu
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None → the model's context length
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    seed: int | None = None  # seeds unseeded sampling
    num_threads: int | None = None  # CPU intra-op threads; None → torch's default
    # A step that carries prompt chunks next to running decodes aims to end within this
    # (the decode SLO); None → prompt chunks are limited by max_num_batched_tokens only.
    target_step_s: float | None = None
    # ... unless the queued prompt work would then take longer than this to compute: the step
    # grows as far as needed to drain it in time (None: the step target alone decides).
    prompt_drain_s: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.quantization not in _QUANTIZATION:
            raise ValueError(
                f"quantization must be one of {', '.join(_QUANTIZATION)}; got {self.quantization!r}"
            )
        if self.attention_backend not in _BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(_BACKENDS)}; got {self.attention_backend!r}"
            )
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.target_step_s is not None and self.target_step_s <= 0:
            raise ValueError(f"target_step_s must be > 0 when set, got {self.target_step_s}")
        if self.prompt_drain_s is not None and self.prompt_drain_s <= 0:
            raise ValueError(f"prompt_drain_s must be > 0 when set, got {self.prompt_drain_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
