// Decode attention straight over the paged KV pool: one query token per sequence attends to its
// context through the block table, so the context is read once, in place, instead of being
// gathered into a contiguous copy first (the gather cost as much as the attention itself).
// The query heads that share a KV head are handled together, so each K and V row is loaded once
// per group. Scores and the softmax run in fp32; K, V, queries and output are bf16.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "vec.h"

using namespace pdk;

namespace {

// Scores of the Group query heads sharing one KV head (fp32 q, [Group][head_dim]) against one
// sequence's keys, scaled: scores [Group][context_len].
// rows[pos]: the offset of position pos's row in the pool (block-table lookups done once).
template <int Group>
void scores_for_group(const float* q, int64_t head_dim, const uint16_t* k_cache,
                      const int64_t* rows, int64_t context_len, float scale, float* scores) {
  const int64_t chunks = head_dim / kLanes;
  for (int64_t pos = 0; pos < context_len; ++pos) {
    const uint16_t* key = k_cache + rows[pos];
    vf acc[Group];
    for (int g = 0; g < Group; ++g) acc[g] = vzero();
    for (int64_t c = 0; c < chunks; ++c) {
      vf kv = vload_bf16(key + c * kLanes);
      for (int g = 0; g < Group; ++g) acc[g] = vfma(vload(q + g * head_dim + c * kLanes), kv, acc[g]);
    }
    for (int g = 0; g < Group; ++g) scores[g * context_len + pos] = vsum(acc[g]) * scale;
  }
}

// acc [Group][head_dim] = Σ_pos weights[g][pos] · V[pos], one vector of head_dim at a time so
// the Group accumulators stay in registers.
template <int Group>
void weighted_values(const float* weights, const uint16_t* v_cache, const int64_t* rows,
                     int64_t context_len, int64_t head_dim, float* acc) {
  for (int64_t c = 0; c < head_dim / kLanes; ++c) {
    vf sum[Group];
    for (int g = 0; g < Group; ++g) sum[g] = vzero();
    for (int64_t pos = 0; pos < context_len; ++pos) {
      vf value = vload_bf16(v_cache + rows[pos] + c * kLanes);
      for (int g = 0; g < Group; ++g) sum[g] = vfma(vset1(weights[g * context_len + pos]), value, sum[g]);
    }
    for (int g = 0; g < Group; ++g) vstore(acc + g * head_dim + c * kLanes, sum[g]);
  }
}

// Softmax of one row of scores in place; returns the sum of its exponentials.
float softmax_row(float* row, int64_t n) {
  float peak = -INFINITY;
  int64_t i = 0;
  if (n >= kLanes) {
    vf m = vload(row);
    for (i = kLanes; i + kLanes <= n; i += kLanes) m = vmax(m, vload(row + i));
    peak = vhmax(m);
  }
  for (; i < n; ++i) peak = std::max(peak, row[i]);
  vf total = vzero();
  const vf shift = vset1(peak);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    vf e = vexp_nonpositive(vsub(vload(row + i), shift));
    vstore(row + i, e);
    total = vadd(total, e);
  }
  float sum = vsum(total);
  for (; i < n; ++i) {
    row[i] = std::exp(row[i] - peak);
    sum += row[i];
  }
  return sum;
}

struct Geometry {
  int64_t kv_heads, head_dim, block_size;
  float scale;
};

// One (sequence, KV head): its Group query heads attend to the sequence's context.
template <int Group>
void attend(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
            const int64_t* table, int64_t context_len, const Geometry& geo, int64_t kvh,
            std::vector<float>& scratch, std::vector<int64_t>& rows, uint16_t* out) {
  const int64_t d = geo.head_dim, token_stride = geo.kv_heads * d;
  // Row offsets block by block: an integer division per position cost more than its dot products.
  rows.resize(context_len);
  for (int64_t pos = 0, block = 0; pos < context_len; ++block) {
    const int64_t base = table[block] * geo.block_size * token_stride;
    const int64_t in_block = std::min(geo.block_size, context_len - pos);
    for (int64_t offset = 0; offset < in_block; ++offset) rows[pos++] = base + offset * token_stride;
  }
  scratch.resize(Group * (2 * d + context_len));
  float* q32 = scratch.data();
  float* acc = q32 + Group * d;
  float* scores = acc + Group * d;
  for (int64_t i = 0; i < Group * d; ++i) q32[i] = bf16_to_float(q[i]);
  scores_for_group<Group>(q32, d, k_cache + kvh * d, rows.data(), context_len, geo.scale, scores);
  float inv_sum[Group];
  for (int g = 0; g < Group; ++g) inv_sum[g] = 1.0f / softmax_row(scores + g * context_len, context_len);
  weighted_values<Group>(scores, v_cache + kvh * d, rows.data(), context_len, d, acc);
  for (int g = 0; g < Group; ++g)
    for (int64_t i = 0; i < d; ++i) out[g * d + i] = float_to_bf16(acc[g * d + i] * inv_sum[g]);
}

using AttendFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*,
                          int64_t, const Geometry&, int64_t, std::vector<float>&,
                          std::vector<int64_t>&, uint16_t*);
constexpr AttendFn kAttend[] = {attend<1>, attend<2>, attend<3>, attend<4>,
                                attend<5>, attend<6>, attend<7>, attend<8>};
// Below this many context tokens in the whole call, one thread does it: waking a second thread
// costs more than the work, and on a busy machine it can wait a scheduler slice for a core.
constexpr int64_t kTokensPerThread = 2048;

}  // namespace

extern "C" int pdk_max_group() { return 8; }

// q [batch, heads, head_dim] bf16 with rows q_row_stride elements apart; k_cache, v_cache
// [num_blocks, block_size, kv_heads, head_dim] bf16; block_tables [batch, max_blocks] int64;
// context_lens [batch] int64 (each ≥ 1); out [batch, heads, head_dim] bf16 contiguous.
// When k_new is not null, row b of k_new / v_new ([kv_heads, head_dim], rows new_row_stride
// apart) is first written to pool slot slots[b] (the step's own token, the last of its context).
// head_dim must be a multiple of the vector width and heads / kv_heads at most pdk_max_group().
extern "C" void pdk_paged_decode_attention(const uint16_t* q, int64_t q_row_stride,
                                           uint16_t* k_cache, uint16_t* v_cache,
                                           const uint16_t* k_new, const uint16_t* v_new,
                                           int64_t new_row_stride, const int64_t* slots,
                                           const int64_t* block_tables, int64_t max_blocks,
                                           const int64_t* context_lens, uint16_t* out,
                                           int64_t batch, int64_t heads, int64_t kv_heads,
                                           int64_t head_dim, int64_t block_size, float scale,
                                           int num_threads) {
  const Geometry geo{kv_heads, head_dim, block_size, scale};
  const int64_t group = heads / kv_heads;
  const AttendFn attend_group = kAttend[group - 1];
  int64_t tokens = 0;
  for (int64_t b = 0; b < batch; ++b) tokens += context_lens[b];
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tokens * kv_heads / kTokensPerThread)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> scratch;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < batch * kv_heads; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      if (k_new != nullptr) {  // only this task reads this (sequence, KV head)'s slot
        const int64_t cache_at = (slots[b] * kv_heads + kvh) * head_dim;
        const int64_t new_at = b * new_row_stride + kvh * head_dim;
        std::copy(k_new + new_at, k_new + new_at + head_dim, k_cache + cache_at);
        std::copy(v_new + new_at, v_new + new_at + head_dim, v_cache + cache_at);
      }
      attend_group(q + b * q_row_stride + kvh * group * head_dim, k_cache, v_cache,
                   block_tables + b * max_blocks, context_lens[b], geo, kvh, scratch, rows,
                   out + (b * heads + kvh * group) * head_dim);
    }
  }
}
