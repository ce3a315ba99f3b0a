// Fused layer ops on the CPU: residual add + RMSNorm, neox RoPE (optionally writing the rotated
// keys and the values straight into the paged KV cache), and SiLU(gate) * up.
//
// Each op is one pass over its rows with fp32 math, rounding to the storage dtype exactly where
// the PyTorch references in kernels/reference.py round, so bf16 results match them bit for bit
// up to summation order. At decode sizes one of these ops costs less than waking a thread, so
// rows are split over ATen's thread pool only from kParallelElements elements up.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "cpu_simd.h"

namespace {

constexpr int64_t kParallelElements = 1 << 16;

// Round to nearest even, as c10's conversions do; written with plain bit operations so the
// loops that call it vectorize.
template <typename T> inline T narrow(float x);
template <> inline float narrow<float>(float x) { return x; }
template <> inline c10::BFloat16 narrow<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded),
                       c10::BFloat16::from_bits());
}
template <> inline c10::Half narrow<c10::Half>(float x) { return c10::Half(x); }

// Runs fn(begin, end) over rows, on one thread unless the op is large enough to pay for more.
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_elements));
  if (rows <= grain) {
    fn(0, rows);
    return;
  }
  at::parallel_for(0, rows, grain, fn);
}

template <typename F>
void dispatch(at::ScalarType type, const char* op, const F& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, op, " supports float32, bfloat16 and float16, not ", type);
  }
}

// ---- residual add + RMSNorm ----

// ATen's CPU sum kernel adds 8-float vectors, on AVX-512 machines too
constexpr int kSumLanes = 8;

inline int64_t ceil_log2(int64_t x) {
  return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// The fp32 sum of squares of a row, added in the order of ATen's sum kernel (SumKernel.cpp:
// Lanes-wide vectors into four interleaved accumulators, cascaded every 2^power steps, then the
// accumulators and lanes in turn), so the norm equals torch's `pow(2).mean()` bit for bit.
template <int Lanes, typename T>
float sum_of_squares(const T* x, int64_t n) {
  const int64_t vecs = n / Lanes, steps = vecs / 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(steps) / 4);
  const int64_t level_step = int64_t{1} << power;
  float acc[4][4][Lanes] = {};  // [cascade level][accumulator][lane]
  auto add = [&](float* to, int64_t vec) {
    for (int l = 0; l < Lanes; ++l) {
      const float f = widen(x[vec * Lanes + l]);
      to[l] += f * f;
    }
  };
  int64_t i = 0;
  while (i + level_step <= steps) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) add(acc[0][k], i * 4 + k);
    for (int level = 1; level < 4; ++level) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < Lanes; ++l) {
          acc[level][k][l] += acc[level - 1][k][l];
          acc[level - 1][k][l] = 0.f;
        }
      if ((i & ((level_step - 1) << (level * power))) != 0) break;
    }
  }
  for (; i < steps; ++i)
    for (int k = 0; k < 4; ++k) add(acc[0][k], i * 4 + k);
  for (int level = 1; level < 4; ++level)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < Lanes; ++l) acc[0][k][l] += acc[level][k][l];
  for (int64_t vec = steps * 4; vec < vecs; ++vec) add(acc[0][0], vec);
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < Lanes; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t e = vecs * Lanes; e < n; ++e) {
    const float f = widen(x[e]);
    total += f * f;
  }
  for (int l = 0; l < Lanes; ++l) total += acc[0][0][l];
  return total;
}

template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, T* out, T* sum, int64_t rows,
                   int64_t hidden, float eps) {
  for_rows(rows, hidden, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * hidden;
      const T* src = x + base;
      if (residual != nullptr) {  // the sum is rounded to T before its statistics, as in torch
        const T* r = residual + base;
        T* s = sum + base;
#pragma omp simd
        for (int64_t d = 0; d < hidden; ++d) s[d] = narrow<T>(widen(src[d]) + widen(r[d]));
        src = s;
      }
      // rows shorter than a vector are summed as ATen's scalar path does: one lane
      const float squares = hidden >= kSumLanes ? sum_of_squares<kSumLanes>(src, hidden)
                                                : sum_of_squares<1>(src, hidden);
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
      T* o = out + base;
#pragma omp simd
      for (int64_t d = 0; d < hidden; ++d)
        o[d] = narrow<T>(widen(narrow<T>(widen(src[d]) * inv)) * widen(weight[d]));
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight,
                                                  double eps,
                                                  std::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "a CPU tensor [..., hidden] expected");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "weight must be [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  torch::Tensor rc, sum = x;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
    rc = residual->contiguous();
    sum = torch::empty_like(xc);
  }
  const int64_t rows = hidden == 0 ? 0 : xc.numel() / hidden;
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(xc.data_ptr<T>(), rc.defined() ? rc.data_ptr<T>() : nullptr,
                     wc.data_ptr<T>(), out.data_ptr<T>(),
                     rc.defined() ? sum.data_ptr<T>() : nullptr, rows, hidden,
                     static_cast<float>(eps));
  });
  return {out, sum};
}

// ---- RoPE, and the K/V cache write ----

// A [tokens, heads, head_dim] tensor with a contiguous last dim, read through its strides.
template <typename T>
struct Rows {
  const T* data;
  int64_t token_stride, head_stride, heads;
  const T* at(int64_t token, int64_t head) const {
    return data + token * token_stride + head * head_stride;
  }
};

template <typename T>
Rows<T> rows_of(const torch::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.size(1)};
}

// Rotates one head: out = cat(x1 cos - x2 sin, x2 cos + x1 sin), each product rounded as torch
// rounds it (the build turns off FMA contraction).
template <typename T>
inline void rotate(const T* x, const float* cos, const float* sin, T* out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = widen(x[i]), x2 = widen(x[i + half]);
    out[i] = narrow<T>(x1 * cos[i] - x2 * sin[i]);
    out[i + half] = narrow<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

void check_indices(const torch::Tensor& index, int64_t tokens, int64_t limit, bool allow_negative,
                   const char* what) {
  TORCH_CHECK(index.dim() == 1 && index.numel() == tokens && index.scalar_type() == at::kLong,
              what, " must be int64 [tokens]");
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    TORCH_CHECK(p[i] < limit && (allow_negative || p[i] >= 0), what, " ", p[i],
                " is out of range [0, ", limit, ")");
}

void check_heads(const torch::Tensor& t, const torch::Tensor& q, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(2) == q.size(2) &&
              t.stride(2) == 1 && t.scalar_type() == q.scalar_type(),
              what, " must be [tokens, heads, head_dim] like q, with a contiguous last dim");
}

// q_out gets the rotated queries; rotated keys go to k_out's rows, or with slots to the cache
// rows they name (a negative slot is skipped), where the values are copied too.
template <typename T>
void rope_rows(const int64_t* positions, const float* cos_sin, Rows<T> q, Rows<T> k,
               Rows<T> v, T* q_out, T* k_out, T* v_out, const int64_t* slots, int64_t tokens,
               int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const int64_t kv_row = k.heads * head_dim;
  for_rows(tokens, (q.heads + 2 * k.heads) * head_dim, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = cos_sin + positions[t] * head_dim;
      const float* sin = cos + half;
      T* qo = q_out + t * q.heads * head_dim;
      for (int64_t h = 0; h < q.heads; ++h) rotate(q.at(t, h), cos, sin, qo + h * head_dim, half);
      const int64_t row = slots == nullptr ? t : slots[t];
      if (row < 0) continue;
      T* ko = k_out + row * kv_row;
      for (int64_t h = 0; h < k.heads; ++h) rotate(k.at(t, h), cos, sin, ko + h * head_dim, half);
      if (v_out == nullptr) continue;
      T* vo = v_out + row * kv_row;
      for (int64_t h = 0; h < v.heads; ++h)
        std::memcpy(vo + h * head_dim, v.at(t, h), head_dim * sizeof(T));
    }
  });
}

void check_rope(const torch::Tensor& positions, const torch::Tensor& q, const torch::Tensor& k,
                const torch::Tensor& cos_sin) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1 && q.size(2) % 2 == 0,
              "q must be a CPU tensor [tokens, heads, head_dim] with an even, contiguous last dim");
  check_heads(k, q, "k");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == q.size(2) &&
              cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(),
              "the cos/sin cache must be contiguous float32 [positions, head_dim]");
  check_indices(positions, q.size(0), cos_sin.size(0), false, "position");
}

std::tuple<torch::Tensor, torch::Tensor> rope(torch::Tensor positions, torch::Tensor q,
                                              torch::Tensor k, torch::Tensor cos_sin) {
  check_rope(positions, q, k, cos_sin);
  auto q_out = torch::empty(q.sizes(), q.options());
  auto k_out = torch::empty(k.sizes(), k.options());
  dispatch(q.scalar_type(), "rope", [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(positions.data_ptr<int64_t>(), cos_sin.data_ptr<float>(), rows_of<T>(q),
                 rows_of<T>(k), rows_of<T>(k), q_out.data_ptr<T>(), k_out.data_ptr<T>(),
                 nullptr, nullptr, q.size(0), q.size(2));
  });
  return {q_out, k_out};
}

void check_cache(const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                 const torch::Tensor& k) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
              k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2) &&
              k_cache.scalar_type() == k.scalar_type() &&
              v_cache.scalar_type() == k.scalar_type(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim] of k's dtype");
}

torch::Tensor rope_write_kv(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                            torch::Tensor v, torch::Tensor cos_sin, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor slot_mapping) {
  check_rope(positions, q, k, cos_sin);
  check_heads(v, q, "v");
  check_cache(k_cache, v_cache, k);
  check_indices(slot_mapping, q.size(0), k_cache.size(0) * k_cache.size(1), true, "slot");
  auto q_out = torch::empty(q.sizes(), q.options());
  dispatch(q.scalar_type(), "rope_write_kv", [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(positions.data_ptr<int64_t>(), cos_sin.data_ptr<float>(), rows_of<T>(q),
                 rows_of<T>(k), rows_of<T>(v), q_out.data_ptr<T>(), k_cache.data_ptr<T>(),
                 v_cache.data_ptr<T>(), slot_mapping.data_ptr<int64_t>(), q.size(0), q.size(2));
  });
  return q_out;
}

void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k.device().is_cpu() && k.dim() == 3 && k.stride(2) == 1,
              "k must be a CPU tensor [tokens, kv_heads, head_dim] with a contiguous last dim");
  check_heads(v, k, "v");
  check_cache(k_cache, v_cache, k);
  const int64_t tokens = k.size(0), head_dim = k.size(2), kv_row = k.size(1) * head_dim;
  check_indices(slot_mapping, tokens, k_cache.size(0) * k_cache.size(1), true, "slot");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = head_dim * k.element_size();
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t size = k.element_size();
  for_rows(tokens, 2 * kv_row, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < k.size(1); ++h) {
        const int64_t dst = (slots[t] * kv_row + h * head_dim) * size;
        std::memcpy(kc + dst, ks + (t * k.stride(0) + h * k.stride(1)) * size, bytes);
        std::memcpy(vc + dst, vs + (t * v.stride(0) + h * v.stride(1)) * size, bytes);
      }
    }
  });
}

// ---- SiLU(gate) * up ----

template <typename T>
void silu_mul_rows(const T* x, int64_t row_stride, T* out, int64_t rows, int64_t width) {
  for_rows(rows, 2 * width, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gate = x + row * row_stride;
      const T* up = gate + width;
      T* o = out + row * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = widen(gate[i]);
        const float e = exp_nonpositive(-std::fabs(g));  // exp(-|g|): never overflows
        const float ge = g * e;  // both sides computed, then selected: the loop vectorizes
        const float silu = (g >= 0.f ? g : ge) / (1.f + e);
        o[i] = narrow<T>(widen(narrow<T>(silu)) * widen(up[i]));
      }
    }
  });
}

torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) % 2 == 0,
              "x must be a CPU tensor [tokens, 2 * width]");
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t width = x.size(1) / 2;
  auto out = torch::empty({x.size(0), width}, x.options());
  dispatch(x.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(xc.data_ptr<T>(), xc.stride(0), out.data_ptr<T>(), x.size(0), width);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "residual add + RMSNorm: (normed, new residual)");
  m.def("rope", &rope, "neox rotary embedding of q and k: (q, k)");
  m.def("rope_write_kv", &rope_write_kv,
        "neox rotary embedding of q (returned) and k, k and v written to the cache by slot");
  m.def("write_kv", &write_kv, "k and v written to the cache by slot");
  m.def("silu_mul", &silu_mul, "silu(x[:, :w]) * x[:, w:]");
}
