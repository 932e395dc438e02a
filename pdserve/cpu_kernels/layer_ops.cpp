// The elementwise work of a decoder layer in one call each: residual add + RMSNorm, rotary
// embedding of q and k in place, SiLU(gate) · up. In eager torch each of these is 3–8 kernel
// launches of microseconds apiece on a few rows, which at batch 1 added up to as much time as
// the matrix products. bf16 in and out, fp32 inside, rounded once per output.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "vec.h"

using namespace pdk;

namespace {

// Elements below which one thread does the whole call (waking a second costs more).
constexpr int64_t kElementsPerThread = 1 << 16;

int threads_for(int64_t elements, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, elements / kElementsPerThread)));
}

}  // namespace

// h [rows, n] bf16 (updated in place to h + delta when delta is not null, rounded to bf16 as a
// bf16 add is); y [rows, n] = bf16(bf16(h · rsqrt(mean(h²) + eps)) · weight), the rounding of
// Hugging Face's LlamaRMSNorm in bf16. n must be a multiple of the vector width.
extern "C" void pdk_add_rms_norm(uint16_t* h, const uint16_t* delta, const uint16_t* weight,
                                 uint16_t* y, int64_t rows, int64_t n, float eps, int num_threads) {
  const int threads = threads_for(rows * n, num_threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* hr = h + r * n;
    if (delta != nullptr) {
      const uint16_t* dr = delta + r * n;
      for (int64_t i = 0; i < n; i += kLanes) vstore_bf16(hr + i, vadd(vload_bf16(hr + i), vload_bf16(dr + i)));
    }
    vf squares = vzero();
    for (int64_t i = 0; i < n; i += kLanes) {
      vf x = vload_bf16(hr + i);
      squares = vfma(x, x, squares);
    }
    const vf inv_rms = vset1(1.0f / std::sqrt(vsum(squares) / static_cast<float>(n) + eps));
    alignas(64) uint16_t normed[kLanes];
    for (int64_t i = 0; i < n; i += kLanes) {
      vstore_bf16(normed, vmul(vload_bf16(hr + i), inv_rms));
      vstore_bf16(y + r * n + i, vmul(vload_bf16(normed), vload_bf16(weight + i)));
    }
  }
}

// Rotates the first `heads` heads of each row of x [rows, row_stride] bf16 in place: for a head
// v of head_dim d with halves a = v[:d/2], b = v[d/2:], v ← (a·cos − b·sin, b·cos + a·sin),
// cos/sin [positions, d] fp32 indexed by positions[row] (the rotate-half convention).
extern "C" void pdk_rope(uint16_t* x, int64_t rows, int64_t row_stride, int64_t heads,
                         int64_t head_dim, const int64_t* positions, const float* cos,
                         const float* sin, int num_threads) {
  const int64_t half = head_dim / 2;
  const int threads = threads_for(rows * heads * head_dim, num_threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + positions[r] * head_dim;
    const float* s = sin + positions[r] * head_dim;
    for (int64_t hd = 0; hd < heads; ++hd) {
      uint16_t* v = x + r * row_stride + hd * head_dim;
      int64_t i = 0;
      for (; i + kLanes <= half; i += kLanes) {
        vf a = vload_bf16(v + i), b = vload_bf16(v + half + i);
        vf lo = vsub(vmul(a, vload(c + i)), vmul(b, vload(s + i)));
        vf hi = vfma(a, vload(s + half + i), vmul(b, vload(c + half + i)));
        vstore_bf16(v + i, lo);
        vstore_bf16(v + half + i, hi);
      }
      for (; i < half; ++i) {
        float a = bf16_to_float(v[i]), b = bf16_to_float(v[half + i]);
        v[i] = float_to_bf16(a * c[i] - b * s[i]);
        v[half + i] = float_to_bf16(b * c[half + i] + a * s[half + i]);
      }
    }
  }
}

// gate_up [rows, 2·n] bf16 (gate then up) → out [rows, n] = bf16(silu(gate) · up). n must be a
// multiple of the vector width.
extern "C" void pdk_silu_mul(const uint16_t* gate_up, uint16_t* out, int64_t rows, int64_t n,
                             int num_threads) {
  const int threads = threads_for(rows * n, num_threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* gate = gate_up + r * 2 * n;
    const uint16_t* up = gate + n;
    for (int64_t i = 0; i < n; i += kLanes)
      vstore_bf16(out + r * n + i, vmul(vsilu(vload_bf16(gate + i)), vload_bf16(up + i)));
  }
}
