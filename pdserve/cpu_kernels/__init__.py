"""Native CPU kernels: 4-bit weight products for a few rows and decode attention over
the paged KV pool, in C++ with AVX-512 (with its bf16 dot product) or AVX2 intrinsics.

The sources are compiled with g++ once per instruction set into the pdserve cache
(`<cache_dir>/cpu_kernels/<key>/`, keyed by the sources, the compiler and the set), the first
time a process asks for them or by `python -m pdserve.cpu_kernels` (what `make setup` runs).
Which build runs follows the CPU's flags, widest first: `amx` (AMX tiles for products of more
than 4 rows) where the CPU has AMX-BF16 and the kernel grants tile state, `avx512_bf16` where it
has AVX-512 with bf16 arithmetic, `avx2` where it has AVX2 and FMA, none otherwise. Without a build (no compiler, an
older CPU, or PDSERVE_CPU_KERNELS=0) every caller keeps its pure-torch path, which computes the
same products.

The library shares PyTorch's OpenMP runtime (torch ships `libgomp.so.1`, which the process has
loaded by the time these load), so its threads are torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

DISABLE_ENV = "PDSERVE_CPU_KERNELS"
_SOURCES = ("quant_gemm.cpp", "paged_attention.cpp", "layer_ops.cpp")
_HEADERS = ("vec.h",)
# Built apart, against libtorch and the library above (see decode_stack.cpp).
_STACK_SOURCE = "decode_stack.cpp"
STACK_DISABLE_ENV = "PDSERVE_DECODE_STACK"
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
           "-mf16c"]  # fmt: skip
_ISA_FLAGS = {  # widest first
    "amx": [*_AVX512, "-mamx-tile", "-mamx-bf16"],
    "avx512_bf16": _AVX512,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"}
_ISA_REQUIRES = {
    "amx": {*_AVX512_FLAGS, "amx_tile", "amx_bf16"},
    "avx512_bf16": _AVX512_FLAGS,
    "avx2": {"avx2", "fma", "f16c"},
}
# Rows per product call: the kernel dequantizes each weight once per call, but from 256 rows
# on the dense bf16 copy (oneDNN on AMX) is as fast (benchmarks/cpu_kernels.py: 128 rows
# 58.9 vs 69.5 ms for every projection of SmolLM2, 256 rows 111.3 vs 108.7 ms).
MAX_KERNEL_ROWS = 128
# Without native bf16 the dense copies are fp32, and oneDNN's fp32 products overtake the AVX2
# kernel sooner (same script, AVX2 code paths: 12 rows 35.1 vs 47.0 ms, 16 rows 44.4 vs 39.5).
AVX2_MAX_KERNEL_ROWS = 12
GROUP_SIZE = 32  # inputs per 4-bit block; every kernel needs `in` to be a multiple of it
OUT_MULTIPLE = 4  # output rows the product kernels dequantize together
_INT64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isas_for(flags: frozenset[str]) -> list[str]:
    """The kernel builds `flags` can run, widest first."""
    return [isa for isa, required in _ISA_REQUIRES.items() if required <= flags]


def _build_dir(isa: str, compiler: str) -> Path:
    from pdserve.model.loader import default_cache_dir  # the model package imports this one

    digest = hashlib.blake2b(digest_size=12)
    here = Path(__file__).parent
    for name in (*_SOURCES, *_HEADERS, _STACK_SOURCE):
        digest.update((here / name).read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(f"{isa}\0{version}\0{sys.platform}".encode())
    return default_cache_dir() / "cpu_kernels" / f"{isa}-{digest.hexdigest()}"


def build(isa: str) -> Path:
    """Compile the kernels for `isa` into the cache (once) and return the library's path."""
    compiler = _compiler()
    target = _build_dir(isa, compiler) / "libpdserve_cpu.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    command = [
        compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno",
        *_ISA_FLAGS[isa], *(str(here / s) for s in _SOURCES),
    ]  # fmt: skip
    _compile(command, target, f"the {isa} kernels")
    return target


def build_decode_stack(isa: str) -> Path:
    """Compile decode_stack.cpp for `isa` against this torch (once) and return its path."""
    library = build(isa)
    torch_dir = Path(torch.__file__).parent
    target = library.parent / f"libpdserve_decode_stack-torch{torch.__version__}.so"
    if target.is_file():
        return target
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        _compiler(), "-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *_ISA_FLAGS[isa],
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
        str(Path(__file__).parent / _STACK_SOURCE),
        f"-L{library.parent}", "-lpdserve_cpu", f"-Wl,-rpath,{library.parent}",
        f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    _compile(command, target, f"the {isa} decode stack")
    return target


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    return compiler


def _compile(command: list[str], target: Path, what: str) -> None:
    """Run `command` writing to a unique temporary name beside `target`, then rename it into
    place: concurrent builders never see a torn file, and a failed build leaves nothing."""
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    result = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(partial)
        raise RuntimeError(f"building {what} failed:\n{result.stderr[-4000:]}")
    os.replace(partial, target)


class Kernels:
    """The loaded library's entry points, taking tensors."""

    def __init__(self, library: ctypes.CDLL, isa: str):
        self.isa = isa
        self._int4 = library.pdk_int4_linear
        self._int4.argtypes = [_PTR, _INT64, _INT64, _PTR, _PTR, _PTR, _INT64, _PTR, ctypes.c_int]
        self._int4_dequantize = library.pdk_int4_dequantize
        self._int4_dequantize.argtypes = [_PTR] * 3 + [_INT64, _INT64, _PTR, ctypes.c_int]
        self._attention = library.pdk_paged_decode_attention
        self._attention.argtypes = [_PTR, _INT64, _PTR, _PTR, _PTR, _PTR, _INT64, _PTR, _PTR,
                                    _INT64, _PTR, _PTR] + [_INT64] * 5 + [ctypes.c_float,
                                                                          ctypes.c_int]  # fmt: skip
        self._add_rms_norm = library.pdk_add_rms_norm
        self._add_rms_norm.argtypes = [_PTR] * 4 + [_INT64, _INT64, ctypes.c_float, ctypes.c_int]
        self._rope = library.pdk_rope
        self._rope.argtypes = [_PTR] + [_INT64] * 4 + [_PTR] * 3 + [ctypes.c_int]
        self._silu_mul = library.pdk_silu_mul
        self._silu_mul.argtypes = [_PTR, _PTR, _INT64, _INT64, ctypes.c_int]
        self.max_group = library.pdk_max_group()
        self.lanes = 8 if isa == "avx2" else 16
        # The most rows a 4-bit product runs natively; the dense copy beyond.
        self.max_product_rows = AVX2_MAX_KERNEL_ROWS if isa == "avx2" else MAX_KERNEL_ROWS

    def int4_linear(self, x, qs, scales, mins) -> torch.Tensor:
        """x [rows, in] bf16 contiguous; qs [out, in / 2] uint8 in GGUF block order; scales,
        mins [out, in / 32] fp32 (w = q · scale + min) → [rows, out] bf16."""
        rows, in_features = x.shape
        out = torch.empty(rows, qs.shape[0], dtype=torch.bfloat16)
        self._int4(x.data_ptr(), rows, in_features, qs.data_ptr(), scales.data_ptr(),
                   mins.data_ptr(), qs.shape[0], out.data_ptr(), torch.get_num_threads())  # fmt: skip
        return out

    def int4_dequantize(self, qs, scales, mins) -> torch.Tensor:
        """The same blocks as dense bf16 weights [out, in]."""
        out_features, in_features = qs.shape[0], qs.shape[1] * 2
        dense = torch.empty(out_features, in_features, dtype=torch.bfloat16)
        self._int4_dequantize(qs.data_ptr(), scales.data_ptr(), mins.data_ptr(), out_features,
                              in_features, dense.data_ptr(), torch.get_num_threads())  # fmt: skip
        return dense

    def add_rms_norm(self, h, delta, weight, eps: float) -> torch.Tensor:
        """h [rows, n] bf16 contiguous, updated in place to h + delta (delta None: unchanged);
        returns RMSNorm(h) · weight, rounded as Hugging Face's bf16 LlamaRMSNorm rounds."""
        rows, n = h.shape
        out = torch.empty_like(h)
        self._add_rms_norm(h.data_ptr(), None if delta is None else delta.data_ptr(),
                           weight.data_ptr(), out.data_ptr(), rows, n, eps,
                           torch.get_num_threads())  # fmt: skip
        return out

    def rope(self, x, heads: int, head_dim: int, positions, cos, sin) -> None:
        """Rotates the first `heads` heads of every row of x [rows, width] bf16 (rows
        contiguous) in place; cos/sin [positions, head_dim] fp32 contiguous."""
        self._rope(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, positions.data_ptr(),
                   cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())  # fmt: skip

    def silu_mul(self, gate_up) -> torch.Tensor:
        """gate_up [rows, 2n] bf16 contiguous → silu(gate) · up [rows, n]."""
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=torch.bfloat16)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2,
                       torch.get_num_threads())  # fmt: skip
        return out

    def supports_attention(self, heads: int, kv_heads: int, head_dim: int) -> bool:
        return head_dim % self.lanes == 0 and heads // kv_heads <= self.max_group

    def paged_decode_attention(
        self, q, k_cache, v_cache, block_tables, context_lens, scale: float, new_kv=None
    ) -> torch.Tensor:
        """q [B, H, D] bf16 (rows may be strided); caches [blocks, block_size, KVH, D] bf16;
        block_tables [B, max] int64; context_lens [B] int64 → [B, H, D] bf16 contiguous.
        new_kv = (k, v, slots): each sequence's new token ([B, KVH, D], rows may be strided;
        slots [B] int64), written into the pool before it is attended to."""
        batch, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        tables, lens = block_tables.contiguous(), context_lens.contiguous()
        k_new = v_new = slots = None
        new_stride = 0
        if new_kv is not None:
            k, v, slots = new_kv
            if k.stride()[1:] != (head_dim, 1) or v.stride() != k.stride():
                k, v = k.contiguous(), v.contiguous()
            slots = slots.contiguous()
            k_new, v_new, new_stride = k.data_ptr(), v.data_ptr(), k.stride(0)
        out = torch.empty(batch, heads, head_dim, dtype=torch.bfloat16)
        self._attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_new,
                        v_new, new_stride, None if slots is None else slots.data_ptr(),
                        tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(), batch,
                        heads, kv_heads, head_dim, block_size, scale,
                        torch.get_num_threads())  # fmt: skip
        return out


@cache
def kernels() -> Kernels | None:
    """This CPU's kernels, built on first use; None where they cannot run (see module doc)."""
    requested = os.environ.get(DISABLE_ENV, "1")
    if requested == "0":
        return None
    isas = isas_for(cpu_flags())
    if requested in _ISA_FLAGS:  # one build only: A/B runs of a narrower ISA on a wider CPU
        isas = [isa for isa in isas if isa == requested]
    if not isas:
        log.info("cpu_kernels.unavailable", reason="the CPU has neither AVX-512 BF16 nor AVX2")
        return None
    for isa in isas:
        try:
            library = ctypes.CDLL(str(build(isa)))
        except (OSError, RuntimeError) as exc:
            log.warning("cpu_kernels.unavailable", isa=isa, reason=str(exc)[:2000])
            continue
        # The kernel must grant AMX tile state to the process (Linux 5.16+, not every VM).
        if isa == "amx" and library.pdk_request_amx() != 0:
            log.info("cpu_kernels.skipped", isa=isa, reason="the kernel refused AMX tile state")
            continue
        log.info("cpu_kernels.loaded", isa=isa)
        return Kernels(library, isa)
    return None


@cache
def decode_stack_class():
    """torch.classes.pdserve.DecodeStack, built on first use; None where the kernels do not
    load, it does not build, or PDSERVE_DECODE_STACK=0."""
    native = kernels()
    if native is None or os.environ.get(STACK_DISABLE_ENV, "1") == "0":
        return None
    try:
        torch.ops.load_library(str(build_decode_stack(native.isa)))
    except (OSError, RuntimeError) as exc:
        log.warning("cpu_kernels.decode_stack_unavailable", reason=str(exc)[:2000])
        return None
    log.info("cpu_kernels.decode_stack_loaded", isa=native.isa)
    return torch.classes.pdserve.DecodeStack
