// y = x · Wᵀ for a few rows of bf16 activations x [rows, in] and weights stored in the GGUF's
// own 4-bit blocks. Each thread dequantizes a tile of
// kTileOut weight rows into a small bf16 (AVX-512) or fp32 (AVX2) buffer that stays in L1, then
// runs every activation row against it, so the weights are read from memory once per call
// whatever the number of rows: PyTorch's weight-only kernels re-read them per row and fall
// behind a dense bf16 product beyond 4 rows.
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "vec.h"

using namespace pdk;

namespace {

constexpr int64_t kGroup = 32;    // inputs per 4-bit block
constexpr int64_t kTileOut = 4;   // weight rows dequantized together
constexpr int64_t kTileRows = 4;  // activation rows per register tile (AVX-512)

struct Int4Rows {
  const uint8_t* qs;      // [out, in / 32, 16]: byte j holds element j (low) and j + 16 (high)
  const float* scales;    // [out, in / 32]
  const float* mins;      // [out, in / 32]: w = q · scale + min
  int64_t groups;
};


#if defined(__AVX512BF16__)
using WeightT = uint16_t;  // dequantized weights as bf16, for the bf16 dot-product instruction

// Group g (32 inputs) of weight row n as 32 bf16.
inline __m512i dequant_group(const Int4Rows& w, int64_t n, int64_t g) {
  const int64_t block = n * w.groups + g;
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + block * 16)));
  vf scale = vset1(w.scales[block]), min = vset1(w.mins[block]);
  vf lo = vfma(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0f))), scale, min);
  vf hi = vfma(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), scale, min);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

void dequant_row(const Int4Rows& w, int64_t n, uint16_t* dst) {
  for (int64_t g = 0; g < w.groups; ++g) _mm512_storeu_si512(dst + g * kGroup, dequant_group(w, n, g));
}

// acc[t][r] += x[t] · w[r] over `in` inputs, 32 at a time with vdpbf16ps.
template <int64_t Rows>
void tile_dot(const uint16_t* x, int64_t in, const uint16_t* w, float* result /* [Rows][4] */) {
  __m512 acc[Rows][kTileOut];
  for (int64_t t = 0; t < Rows; ++t)
    for (int64_t r = 0; r < kTileOut; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += kGroup) {
    __m512bh wv[kTileOut];
    for (int64_t r = 0; r < kTileOut; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * in + k);
    for (int64_t t = 0; t < Rows; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * in + k);
      for (int64_t r = 0; r < kTileOut; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  for (int64_t t = 0; t < Rows; ++t)
    for (int64_t r = 0; r < kTileOut; ++r) result[t * kTileOut + r] = _mm512_reduce_add_ps(acc[t][r]);
}
using InputT = uint16_t;

#if defined(__AMX_BF16__)
// AMX: C [16 activation rows][16 weight rows] += A [16 activation rows][32 inputs] · B, where B
// holds 32 inputs of 16 weight rows in the tile unit's pair layout ([16 pairs][16 rows][2]).
// A is read straight from the activations; each thread dequantizes 16 weight rows at a time
// and transposes them into B, for every group of inputs, before it runs the activation tiles.
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxMinRows = 4;  // up to this many rows the vector kernel wastes less
constexpr int64_t kAmxTilesPerPass = 4;  // C in tiles 0..3, B in tile 4, A in tiles 5 and 6

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// rows[i] (16 dwords each) → rows[j] = column j: a 16 × 16 transpose of 32-bit elements, here
// pairs of bf16 inputs, so row p of the result is input pair p of all 16 weight rows.
void transpose16(__m512i* rows) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    rows[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    rows[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    rows[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    rows[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// Weight rows n0..n0+15 → b [groups][16 pairs][16 rows][2] bf16.
void pack_weight_tile(const Int4Rows& w, int64_t n0, int64_t groups, uint16_t* b) {
  for (int64_t g = 0; g < groups; ++g) {
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = dequant_group(w, n0 + r, g);
    transpose16(rows);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(b + (g * 16 + p) * 32, rows[p]);
  }
}

template <int Tiles>
void amx_pass(const uint16_t* x, int64_t in, const uint16_t* b, int64_t groups, float* c /* [Tiles][16][16] */) {
  const int64_t stride = in * 2, a_tile = kAmxRows * in;
  if (Tiles > 0) _tile_zero(0);
  if (Tiles > 1) _tile_zero(1);
  if (Tiles > 2) _tile_zero(2);
  if (Tiles > 3) _tile_zero(3);
  for (int64_t g = 0; g < groups; ++g) {
    _tile_loadd(4, b + g * 512, 64);
    const uint16_t* a = x + g * kGroup;
    _tile_loadd(5, a, stride);
    _tile_dpbf16ps(0, 5, 4);
    if (Tiles > 1) { _tile_loadd(6, a + a_tile, stride); _tile_dpbf16ps(1, 6, 4); }
    if (Tiles > 2) { _tile_loadd(5, a + 2 * a_tile, stride); _tile_dpbf16ps(2, 5, 4); }
    if (Tiles > 3) { _tile_loadd(6, a + 3 * a_tile, stride); _tile_dpbf16ps(3, 6, 4); }
  }
  _tile_stored(0, c, 64);
  if (Tiles > 1) _tile_stored(1, c + 256, 64);
  if (Tiles > 2) _tile_stored(2, c + 512, 64);
  if (Tiles > 3) _tile_stored(3, c + 768, 64);
}

void gemm_amx(const uint16_t* x, int64_t rows, int64_t in, int64_t out_features, const Int4Rows& w,
              uint16_t* y, int num_threads) {
  const int64_t groups = in / kGroup, row_tiles = (rows + kAmxRows - 1) / kAmxRows;
  // Whole tiles of rows: the last one padded with zeros rather than read past the end.
  std::vector<uint16_t> padded;
  if (rows % kAmxRows) {
    padded.assign(row_tiles * kAmxRows * in, 0);
    std::copy(x, x + rows * in, padded.begin());
    x = padded.data();
  }
#pragma omp parallel num_threads(num_threads)
  {
    configure_tiles();
    std::vector<uint16_t> b(kAmxRows * in);
    alignas(64) float c[kAmxTilesPerPass * kAmxRows * kAmxRows];
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < out_features; n0 += kAmxRows) {
      pack_weight_tile(w, n0, groups, b.data());
      for (int64_t t0 = 0; t0 < row_tiles; t0 += kAmxTilesPerPass) {
        const int64_t tiles = std::min<int64_t>(kAmxTilesPerPass, row_tiles - t0);
        const uint16_t* xt = x + t0 * kAmxRows * in;
        switch (tiles) {
          case 4: amx_pass<4>(xt, in, b.data(), groups, c); break;
          case 3: amx_pass<3>(xt, in, b.data(), groups, c); break;
          case 2: amx_pass<2>(xt, in, b.data(), groups, c); break;
          default: amx_pass<1>(xt, in, b.data(), groups, c); break;
        }
        const int64_t last = std::min<int64_t>(rows, (t0 + tiles) * kAmxRows);
        for (int64_t t = t0 * kAmxRows; t < last; ++t) {
          __m512 row = _mm512_load_ps(c + (t - t0 * kAmxRows) * kAmxRows);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + t * out_features + n0), (__m256i)_mm512_cvtneps_pbh(row));
        }
      }
    }
    _tile_release();
  }
}
#endif
#else
using WeightT = float;  // no bf16 arithmetic: weights dequantized to fp32, activations widened

void dequant_row(const Int4Rows& w, int64_t n, float* dst) {
  const uint8_t* qs = w.qs + n * w.groups * 16;
  const __m256i low_nibble = _mm256_set1_epi32(0x0f);
  for (int64_t g = 0; g < w.groups; ++g) {
    vf scale = vset1(w.scales[n * w.groups + g]), min = vset1(w.mins[n * w.groups + g]);
    for (int64_t half = 0; half < 2; ++half) {
      __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + g * 16 + half * 8)));
      vf lo = vfma(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble)), scale, min);
      vf hi = vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), scale, min);
      vstore(dst + g * kGroup + half * 8, lo);
      vstore(dst + g * kGroup + 16 + half * 8, hi);
    }
  }
}

template <int64_t Rows>
void tile_dot(const float* x, int64_t in, const float* w, float* result) {
  __m256 acc[Rows][kTileOut];
  for (int64_t t = 0; t < Rows; ++t)
    for (int64_t r = 0; r < kTileOut; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; k += 8) {
    __m256 wv[kTileOut];
    for (int64_t r = 0; r < kTileOut; ++r) wv[r] = _mm256_loadu_ps(w + r * in + k);
    for (int64_t t = 0; t < Rows; ++t) {
      __m256 xv = _mm256_loadu_ps(x + t * in + k);
      for (int64_t r = 0; r < kTileOut; ++r) acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  for (int64_t t = 0; t < Rows; ++t)
    for (int64_t r = 0; r < kTileOut; ++r) result[t * kTileOut + r] = vsum(acc[t][r]);
}
using InputT = float;
#endif

void gemm(const uint16_t* x_bf16, int64_t rows, int64_t in, int64_t out_features, const Int4Rows& w,
          uint16_t* y, int num_threads) {
#if defined(__AMX_BF16__)
  if (rows > kAmxMinRows && out_features % kAmxRows == 0)
    return gemm_amx(x_bf16, rows, in, out_features, w, y, num_threads);
#endif
#if defined(__AVX512BF16__)
  const InputT* x = x_bf16;
#else
  std::vector<float> widened(rows * in);
  for (int64_t i = 0; i < rows * in; ++i) widened[i] = bf16_to_float(x_bf16[i]);
  const InputT* x = widened.data();
#endif
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<WeightT> tile(kTileOut * in);
    float result[kTileRows * kTileOut];
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < out_features; n0 += kTileOut) {
      for (int64_t r = 0; r < kTileOut; ++r) dequant_row(w, n0 + r, tile.data() + r * in);
      for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
        const int64_t tile_rows = std::min<int64_t>(kTileRows, rows - t0);
        const InputT* xt = x + t0 * in;
        switch (tile_rows) {
          case 4: tile_dot<4>(xt, in, tile.data(), result); break;
          case 3: tile_dot<3>(xt, in, tile.data(), result); break;
          case 2: tile_dot<2>(xt, in, tile.data(), result); break;
          default: tile_dot<1>(xt, in, tile.data(), result); break;
        }
        for (int64_t t = 0; t < tile_rows; ++t)
          for (int64_t r = 0; r < kTileOut; ++r)
            y[(t0 + t) * out_features + n0 + r] = float_to_bf16(result[t * kTileOut + r]);
      }
    }
  }
}

}  // namespace

// The weights themselves as bf16 [out, in] (the dense copy that long prefill chunks run).
extern "C" void pdk_int4_dequantize(const uint8_t* qs, const float* scales, const float* mins,
                                    int64_t out_features, int64_t in, uint16_t* dense,
                                    int num_threads) {
  const Int4Rows w{qs, scales, mins, in / kGroup};
#pragma omp parallel num_threads(num_threads)
  {
#if defined(__AVX512BF16__)
#pragma omp for schedule(static)
    for (int64_t n = 0; n < out_features; ++n) dequant_row(w, n, dense + n * in);
#else
    std::vector<float> row(in);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < out_features; ++n) {
      dequant_row(w, n, row.data());
      for (int64_t k = 0; k < in; ++k) dense[n * in + k] = float_to_bf16(row[k]);
    }
#endif
  }
}

// x [rows, in] bf16 → y [rows, out] bf16. in must be a multiple of 32 and out of 4.
extern "C" void pdk_int4_linear(const uint16_t* x, int64_t rows, int64_t in, const uint8_t* qs,
                                const float* scales, const float* mins, int64_t out_features,
                                uint16_t* y, int num_threads) {
  gemm(x, rows, in, out_features, Int4Rows{qs, scales, mins, in / kGroup}, y, num_threads);
}

// AMX tile data must be requested from the kernel once per process (Linux ≥ 5.16); 0 on success.
extern "C" int pdk_request_amx() {
#if defined(__AMX_BF16__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return static_cast<int>(syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata));
#else
  return -1;
#endif
}
