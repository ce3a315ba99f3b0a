// Paged decode attention on the CPU: one query token per sequence, keys and values read straight
// from the paged cache through the block table (no gather copy).
//
// One work item is (sequence, KV head): it scores every cached key against all query heads of
// that KV head's group (GQA), so each key and value is read once per step. Items run in
// parallel on ATen's thread pool; the inner loops over head_dim are SIMD-vectorized, with
// bf16 widened to fp32 on load. Softmax and accumulation are fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(c10::Half x) { return static_cast<float>(x); }

// exp for x <= 0 (softmax after subtracting the max): 2^n * 2^f with f in [-0.5, 0.5] and a
// degree-6 polynomial for 2^f, about 1e-7 relative error; vectorizes, unlike std::exp.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t - 0.5f));  // round, as t <= 0
  const float f = (t - n) * 0.693147180559945309f;
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f +
                  f * (8.3333338e-3f + f * 1.3888889e-3f)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
void decode(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
            const int32_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t table_width,
            float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;  // between tokens of one block
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const int64_t head0 = kv_head * group;
      T* o = out + (seq * num_heads + head0) * head_dim;
      if (len <= 0) {  // padded rows stay finite
        std::fill(o, o + group * head_dim, T(0));
        continue;
      }
      const T* qs = q + (seq * num_heads + head0) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = widen(qs[i]) * scale;
      scores.resize(group * len);
      const int32_t* table = block_tables + seq * table_width;
      const int64_t kv_offset = kv_head * head_dim;

      for (int64_t t = 0; t < len; ++t) {  // scores[g][t] = q_g . k_t
        const T* k = k_cache + table[t / block_size] * block_stride +
                     (t % block_size) * token_stride + kv_offset;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * widen(k[d]);
          scores[g * len + t] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax, left unnormalized until the end
        float* s = scores.data() + g * len;
        float mx = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = exp_nonpositive(s[t] - mx);
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {  // acc[g] += p[g][t] * v_t
        const T* v = v_cache + table[t / block_size] * block_stride +
                     (t % block_size) * token_stride + kv_offset;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * widen(v[d]);
        }
      }
      for (int64_t i = 0; i < group * head_dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [seqs, heads, dim] and caches [blocks, block_size, kv_heads, dim] expected");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
              q.scalar_type() == v_cache.scalar_type(), "q and caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0,
              "head_dim or GQA group mismatch");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
              seq_lens.numel() == num_seqs, "one block table row and length per sequence");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(qc);
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    decode<T>(qc.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
              tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<T>(), num_seqs,
              num_heads, num_kv_heads, head_dim, k_cache.size(1), tables.size(1),
              static_cast<float>(scale));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU)");
}
