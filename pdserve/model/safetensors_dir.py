"""A Hugging Face Llama checkpoint directory: config.json, *.safetensors (one file or sharded
with model.safetensors.index.json), optional generation_config.json, and tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdserve.model.config import ModelConfig

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama",)
# Checkpoint entries that are not weights of the model (old transformers saved these buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(directory: Path) -> ModelConfig:
    raw = _read_json(directory / CONFIG_FILE)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{directory}: model_type {model_type!r} is not supported (only 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"{directory}: {flag}=true is not supported")
    generation = _read_json(directory / GENERATION_CONFIG_FILE, missing_ok=True)
    num_heads = int(raw["num_attention_heads"])
    hidden_size = int(raw["hidden_size"])
    rope_parameters = raw.get("rope_parameters") or {}  # transformers >= 5 keeps theta in here
    rope_theta = float(raw.get("rope_theta", rope_parameters.get("rope_theta", 10000.0)))
    eos = generation.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = (
        () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    )
    bos = raw.get("bos_token_id", generation.get("bos_token_id"))
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        rope_scaling=normalize_rope_scaling(raw.get("rope_scaling") or rope_parameters),
        name=directory.name,
    )


def normalize_rope_scaling(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """HF rope_scaling / rope_parameters -> {"rope_type": ..., params} or None for plain rope."""
    if not raw:
        return None
    scaling = {k: v for k, v in raw.items() if k not in ("rope_theta", "type")}
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    scaling["rope_type"] = kind
    return scaling


_PROJECTION_LEAVES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def is_projection(name: str) -> bool:
    """Whether HF weight `name` is one of the matrices a quantized model replaces (the layers'
    projections and an untied output projection; not the embedding, which it looks rows up in)."""
    return name == "lm_head.weight" or name.endswith(_PROJECTION_LEAVES)


def expected_weight_shapes(
    config: ModelConfig, projections: bool = True
) -> dict[str, tuple[int, ...]]:
    """Every weight a Llama of this config has, with its HF shape ([out, in] for matrices);
    without the projections (`is_projection`) if `projections` is False."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update(
            {
                prefix + "input_layernorm.weight": (h,),
                prefix + "post_attention_layernorm.weight": (h,),
                prefix + "self_attn.q_proj.weight": (config.num_heads * d, h),
                prefix + "self_attn.k_proj.weight": (config.num_kv_heads * d, h),
                prefix + "self_attn.v_proj.weight": (config.num_kv_heads * d, h),
                prefix + "self_attn.o_proj.weight": (h, config.num_heads * d),
                prefix + "mlp.gate_proj.weight": (i, h),
                prefix + "mlp.up_proj.weight": (i, h),
                prefix + "mlp.down_proj.weight": (h, i),
            }
        )
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    if not projections:
        return {name: shape for name, shape in shapes.items() if not is_projection(name)}
    return shapes


def check_weights(
    weights: dict[str, Any], config: ModelConfig, source: Path, projections: bool = True
) -> None:
    """Exactly the expected names with the expected shapes, or a ValueError saying what differs."""
    expected = expected_weight_shapes(config, projections)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config"
            + (f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
            + (
                f"; unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                if unexpected
                else ""
            )
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {shape}"
            )


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{directory}: shard {file.name} listed in {INDEX_FILE} is missing")
    return files


def load_weights(
    directory: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # a tied head some writers store anyway; it is embed_tokens
                weights[name] = f.get_tensor(name).to(dtype)
                if on_tensor is not None:
                    on_tensor(name)
    check_weights(weights, config, directory)
    return weights


def source_files(directory: Path) -> list[Path]:
    """Every file whose contents define the model (for the content digest)."""
    names = [
        CONFIG_FILE,
        GENERATION_CONFIG_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        INDEX_FILE,
    ]
    files = [directory / n for n in names if (directory / n).is_file()]
    return files + weight_files(directory)


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
