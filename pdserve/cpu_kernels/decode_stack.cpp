// A pure-decode step's decoder layers in one call from Python. At a few rows per step the
// matrix products take ~10 ms and everything between them is tiny, but in Python each layer
// cost ~40 µs of interpreter, wrapper and dispatch time around its eight calls (over 1 ms a
// step): this loop makes the same calls, in the same order with the same inputs, from C++.
// It is built against this process's libtorch (PyTorch's own int4 kernel is the fastest for a
// few rows) and the kernel library of the same instruction set, and registered as the
// TorchScript class torch.classes.pdserve.DecodeStack.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

extern "C" {
void pdk_add_rms_norm(uint16_t* h, const uint16_t* delta, const uint16_t* weight, uint16_t* y,
                      int64_t rows, int64_t n, float eps, int num_threads);
void pdk_rope(uint16_t* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
              const int64_t* positions, const float* cos, const float* sin, int num_threads);
void pdk_silu_mul(const uint16_t* gate_up, uint16_t* out, int64_t rows, int64_t n,
                  int num_threads);
void pdk_int4_linear(const uint16_t* x, int64_t rows, int64_t in, const uint8_t* qs,
                     const float* scales, const float* mins, int64_t out_features, uint16_t* y,
                     int num_threads);
void pdk_paged_decode_attention(const uint16_t* q, int64_t q_row_stride, uint16_t* k_cache,
                                uint16_t* v_cache, const uint16_t* k_new, const uint16_t* v_new,
                                int64_t new_row_stride, const int64_t* slots,
                                const int64_t* block_tables, int64_t max_blocks,
                                const int64_t* context_lens, uint16_t* out, int64_t batch,
                                int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, float scale, int num_threads);
}

namespace {

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// One projection in the forms pdserve.model.quant keeps, chosen by row count as
// Int4Linear / DenseLinear choose (an empty tensor: that form is absent).
struct Projection {
  at::Tensor packed, scales_and_zeros;  // PyTorch's int4 layout (≤ max_quantized_rows)
  at::Tensor qs, scales, mins;          // GGUF blocks for the native product (≤ max_kernel_rows)
  at::Tensor dense;                     // [out, in], bf16 or fp32 (quant.dense_dtype)

  int64_t out_features() const { return dense.size(0); }
};

constexpr int kTensorsPerProjection = 6;
constexpr int kProjectionsPerLayer = 4;  // qkv, o, gate_up, down
constexpr int kTensorsPerLayer = 2 + kProjectionsPerLayer * kTensorsPerProjection;

struct Layer {
  at::Tensor input_norm, post_norm;
  Projection qkv, o, gate_up, down;
};

enum Dim {
  kLayers, kHeads, kKvHeads, kHeadDim, kHidden, kIntermediate,
  kMaxQuantizedRows, kMaxKernelRows, kGroupSize, kNumDims
};

}  // namespace

struct DecodeStack : torch::CustomClassHolder {
  std::vector<Layer> layers;
  at::Tensor final_norm, cos, sin;
  std::vector<int64_t> dims;
  double eps, scale;

  // tensors: per layer [input_norm, post_norm, then qkv, o, gate_up, down as (packed,
  // scales_and_zeros, qs, scales, mins, dense)], then final_norm, cos, sin.
  // dims: see Dim; scalars: [rms_norm_eps, softmax scale].
  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> dims_,
              std::vector<double> scalars)
      : dims(std::move(dims_)), eps(scalars.at(0)), scale(scalars.at(1)) {
    TORCH_CHECK(dims.size() == kNumDims, "DecodeStack: expected ", int(kNumDims), " dims");
    const int64_t num_layers = dims[kLayers];
    TORCH_CHECK(static_cast<int64_t>(tensors.size()) == num_layers * kTensorsPerLayer + 3,
                "DecodeStack: wrong number of tensors");
    auto projection = [&](int64_t at) {
      return Projection{tensors[at], tensors[at + 1], tensors[at + 2],
                        tensors[at + 3], tensors[at + 4], tensors[at + 5]};
    };
    for (int64_t l = 0; l < num_layers; ++l) {
      const int64_t base = l * kTensorsPerLayer;
      const int64_t p = base + 2;
      layers.push_back(Layer{tensors[base], tensors[base + 1], projection(p),
                             projection(p + kTensorsPerProjection),
                             projection(p + 2 * kTensorsPerProjection),
                             projection(p + 3 * kTensorsPerProjection)});
    }
    const int64_t tail = num_layers * kTensorsPerLayer;
    final_norm = tensors[tail];
    cos = tensors[tail + 1];
    sin = tensors[tail + 2];
  }

  at::Tensor product(const Projection& p, const at::Tensor& x, int threads) const {
    const int64_t rows = x.size(0);
    if (p.packed.numel() > 0 && rows <= dims[kMaxQuantizedRows])
      return at::_weight_int4pack_mm_for_cpu(x, p.packed, dims[kGroupSize], p.scales_and_zeros);
    if (p.qs.numel() > 0 && rows <= dims[kMaxKernelRows]) {
      at::Tensor y = at::empty({rows, p.out_features()}, x.options());
      pdk_int4_linear(ptr<uint16_t>(x), rows, x.size(1), ptr<uint8_t>(p.qs), ptr<float>(p.scales),
                      ptr<float>(p.mins), p.out_features(), ptr<uint16_t>(y), threads);
      return y;
    }
    if (p.dense.scalar_type() == x.scalar_type()) return at::linear(x, p.dense);
    return at::linear(x.to(p.dense.scalar_type()), p.dense).to(x.scalar_type());
  }

  // h [rows, hidden] bf16 (the embedded tokens; updated in place as the residual stream);
  // kv_pool [layers, 2, blocks, block_size, kv_heads, head_dim] bf16; block_tables
  // [rows, max_blocks], context_lens, slots, positions [rows] int64.
  // Returns the final RMSNorm of the last hidden state, [rows, hidden] bf16.
  at::Tensor forward(at::Tensor h, at::Tensor positions, at::Tensor kv_pool,
                     at::Tensor block_tables, at::Tensor context_lens, at::Tensor slots) const {
    const int threads = at::get_num_threads();
    h = h.contiguous();
    positions = positions.contiguous();
    block_tables = block_tables.contiguous();
    context_lens = context_lens.contiguous();
    slots = slots.contiguous();
    const int64_t rows = h.size(0), hidden = dims[kHidden], heads = dims[kHeads];
    const int64_t kv_heads = dims[kKvHeads], head_dim = dims[kHeadDim];
    const int64_t block_size = kv_pool.size(3);
    const float eps_f = static_cast<float>(eps);
    uint16_t* pool = ptr<uint16_t>(kv_pool);
    at::Tensor delta;  // the previous layer's MLP output, added to h by the next norm
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& layer = layers[l];
      at::Tensor x = at::empty({rows, hidden}, h.options());
      pdk_add_rms_norm(ptr<uint16_t>(h), delta.defined() ? ptr<uint16_t>(delta) : nullptr,
                       ptr<uint16_t>(layer.input_norm), ptr<uint16_t>(x), rows, hidden, eps_f,
                       threads);
      at::Tensor qkv = product(layer.qkv, x, threads);
      uint16_t* q = ptr<uint16_t>(qkv);
      const int64_t qkv_stride = qkv.stride(0);
      pdk_rope(q, rows, qkv_stride, heads + kv_heads, head_dim, ptr<int64_t>(positions),
               ptr<float>(cos), ptr<float>(sin), threads);
      at::Tensor attended = at::empty({rows, heads * head_dim}, h.options());
      uint16_t* k_cache = pool + l * kv_pool.stride(0);
      pdk_paged_decode_attention(
          q, qkv_stride, k_cache, k_cache + kv_pool.stride(1), q + heads * head_dim,
          q + (heads + kv_heads) * head_dim, qkv_stride, ptr<int64_t>(slots),
          ptr<int64_t>(block_tables), block_tables.size(1), ptr<int64_t>(context_lens),
          ptr<uint16_t>(attended), rows, heads, kv_heads, head_dim, block_size,
          static_cast<float>(scale), threads);
      at::Tensor o = product(layer.o, attended, threads);
      at::Tensor x2 = at::empty({rows, hidden}, h.options());
      pdk_add_rms_norm(ptr<uint16_t>(h), ptr<uint16_t>(o), ptr<uint16_t>(layer.post_norm),
                       ptr<uint16_t>(x2), rows, hidden, eps_f, threads);
      at::Tensor gate_up = product(layer.gate_up, x2, threads);
      at::Tensor act = at::empty({rows, dims[kIntermediate]}, h.options());
      pdk_silu_mul(ptr<uint16_t>(gate_up), ptr<uint16_t>(act), rows, dims[kIntermediate],
                   threads);
      delta = product(layer.down, act, threads);
    }
    at::Tensor out = at::empty({rows, hidden}, h.options());
    pdk_add_rms_norm(ptr<uint16_t>(h), delta.defined() ? ptr<uint16_t>(delta) : nullptr,
                     ptr<uint16_t>(final_norm), ptr<uint16_t>(out), rows, hidden, eps_f, threads);
    return out;
  }
};

TORCH_LIBRARY(pdserve, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("forward", &DecodeStack::forward);
}
